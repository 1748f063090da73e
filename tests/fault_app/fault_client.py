"""The real ClientApp, made to fail on demand and to record its replies, for fault tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client_app.app import _setup, site_private
from client_app.app import evaluate as real_evaluate
from client_app.app import train as real_train
from common.arrays import tensor_specs, to_state_dict, unpack
from common.data.readers import _load_cached
from common.data.tensors import _TENSOR_CACHE

app = ClientApp()


@site_private
def _fail(msg: Message, context: Context) -> Message:
    # A realistic leak: the text names a patient file on the hospital's disk.
    raise OSError("cannot read /srv/hospital/patient_JohnDoe_1234.bmp")


def _partitions(context: Context, key: str) -> set[int]:
    return {int(p) for p in str(context.run_config[key]).split(",") if p}


def _should_fail(msg: Message, context: Context) -> bool:
    server_round = int(msg.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    return partition in _partitions(context, "fail-partitions") and server_round >= int(
        context.run_config["fail-round"]
    )


def _straggle(msg: Message, context: Context) -> None:
    server_round = int(msg.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    if partition not in _partitions(context, "slow-partitions") or server_round != int(
        context.run_config["slow-round"]
    ):
        return
    # Waiting for the server's own sign that the round closed makes the reply late for certain,
    # whatever the machine's load; slow-seconds caps the wait.
    until = str(context.run_config["slow-until"])
    deadline = time.monotonic() + float(context.run_config["slow-seconds"])
    while time.monotonic() < deadline and not (until and Path(until).exists()):
        time.sleep(0.2)


def _corrupt_data(msg: Message, context: Context) -> None:
    """Truncate a file of this hospital's data mid-run and drop the process's cached copy.

    A deployed SuperNode starts a new ClientApp process per message, so it re-reads its data
    every round; simulation keeps the Ray actors and their caches, so the caches are cleared here.
    """
    server_round = int(msg.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    if partition != int(context.run_config["corrupt-partition"]) or server_round < int(
        context.run_config["corrupt-round"]
    ):
        return
    path = Path(str(context.run_config["corrupt-file"]))
    if str(context.run_config["corrupt-kind"]) == "drop-label":
        # The label file loses its last row: that image no longer has a label.
        rows = path.read_text(encoding="utf-8").splitlines()
        if len(rows) > 2:
            path.write_text("\n".join(rows[:-1]) + "\n", encoding="utf-8")
    else:
        with path.open("r+b") as handle:
            handle.truncate(int(context.run_config["corrupt-bytes"]))
    _TENSOR_CACHE.clear()
    _load_cached.cache_clear()


def _bad_kind(msg: Message, context: Context) -> str | None:
    """What this partition breaks in its reply this round (run config ``bad-updates``)."""
    if int(msg.content["config"]["server-round"]) != int(context.run_config["bad-round"]):
        return None
    partition = str(context.node_config["partition-id"])
    for entry in str(context.run_config["bad-updates"]).split(","):
        if entry and entry.split(":")[0] == partition:
            return entry.split(":")[1]
    return None


def _wait_for_dump(context: Context, server_round: int, partition: int) -> None:
    """Wait until ``partition`` has replied this round (so that this reply comes second)."""
    dumps = Path(str(context.run_config["dump-dir"]))
    dump = dumps / f"round{server_round}_partition{partition}.pt"
    deadline = time.monotonic() + 300
    while not dump.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)


def _break(reply: Message, kind: str, msg: Message, context: Context) -> None:
    """Turn an honest train reply into the bad update ``kind`` names, in place.

    The reply is packed (common.arrays.pack), so each kind is one flat array. nan: one NaN;
    shape: the floating values as a (1,) array (it would broadcast); huge: every value 1e30
    (finite) with num-examples 1e15, the takeover of docs/reliability.md; inflate: honest arrays
    with num-examples 1e15; impostor: the reply claims hospital-index 0, after partition 0's;
    oversize: an extra 64 MB array next to the honest ones.
    """
    arrays = {k: a.numpy().copy() for k, a in reply.content["arrays"].items()}
    metrics = reply.content["metrics"]
    first = next(iter(arrays))
    if kind == "nan":
        arrays[first].flat[0] = np.nan
    elif kind == "shape":
        arrays[first] = np.zeros((1,), arrays[first].dtype)
    elif kind == "huge":
        arrays = {k: np.full_like(a, 1e30) for k, a in arrays.items()}
        metrics["num-examples"] = 1e15
    elif kind == "inflate":
        metrics["num-examples"] = 1e15
    elif kind == "oversize":
        arrays["padding"] = np.zeros(16 * 2**20, np.float32)
    elif kind == "impostor":
        metrics["hospital-index"] = 0
        _wait_for_dump(context, int(msg.content["config"]["server-round"]), 0)
    else:
        raise ValueError(f"unknown bad update {kind!r}")
    reply.content["arrays"] = ArrayRecord({k: Array(a) for k, a in arrays.items()})


def _hold_evaluate(msg: Message, context: Context) -> None:
    """In hold-round, partition 0 evaluates only after the others have, then waits hold-seconds.

    The test stops another hospital's SuperNode in that gap, while it holds no message.
    """
    server_round = int(msg.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    if partition != 0 or server_round != int(context.run_config["hold-round"]):
        return
    dumps = Path(str(context.run_config["dump-dir"]))
    others = int(context.node_config["num-partitions"]) - 1
    deadline = time.monotonic() + 300
    while len(list(dumps.glob(f"evaluated_round{server_round}_*"))) < others:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    time.sleep(float(context.run_config["hold-seconds"]))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fail when configured; otherwise run the real handler, save its reply, maybe break it."""
    if _should_fail(msg, context):
        return _fail(msg, context)
    _straggle(msg, context)
    _corrupt_data(msg, context)
    reply = real_train(msg, context)
    dump_dir = Path(str(context.run_config["dump-dir"]))
    server_round = int(msg.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    # The reply is packed; the hospital's own model gives the layout to unpack it by.
    layout = tensor_specs(_setup(msg, context)[3].state_dict())
    torch.save(
        {
            "state_dict": to_state_dict(unpack(reply.content["arrays"], layout)),
            "num-examples": reply.content["metrics"]["num-examples"],
            # What Ray left of the GPUs this ClientApp may use (None: as its parent process).
            "cuda-visible-devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        },
        dump_dir / f"round{server_round}_partition{partition}.pt",
    )
    kind = _bad_kind(msg, context)
    if kind is not None:
        _break(reply, kind, msg, context)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The real evaluate handler, on corrupted data or held when configured; leaves a marker."""
    _corrupt_data(msg, context)
    _hold_evaluate(msg, context)
    reply = real_evaluate(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    dumps = Path(str(context.run_config["dump-dir"]))
    (dumps / f"evaluated_round{server_round}_partition{partition}").touch()
    return reply
