"""The real ClientApp, made to fail on demand and to record its replies, for fault tests."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client_app.app import evaluate as real_evaluate
from client_app.app import site_private
from client_app.app import train as real_train
from common.arrays import to_state_dict
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
    if partition in _partitions(context, "slow-partitions") and server_round == int(
        context.run_config["slow-round"]
    ):
        time.sleep(float(context.run_config["slow-seconds"]))


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
    with Path(str(context.run_config["corrupt-file"])).open("r+b") as handle:
        handle.truncate(int(context.run_config["corrupt-bytes"]))
    _TENSOR_CACHE.clear()
    _load_cached.cache_clear()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fail when configured; otherwise run the real handler and save its reply."""
    if _should_fail(msg, context):
        return _fail(msg, context)
    _straggle(msg, context)
    _corrupt_data(msg, context)
    reply = real_train(msg, context)
    dump_dir = Path(str(context.run_config["dump-dir"]))
    server_round = int(msg.content["config"]["server-round"])
    partition = int(context.node_config["partition-id"])
    torch.save(
        {
            "state_dict": to_state_dict(reply.content["arrays"]),
            "num-examples": reply.content["metrics"]["num-examples"],
        },
        dump_dir / f"round{server_round}_partition{partition}.pt",
    )
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The real evaluate handler, on corrupted data when configured."""
    _corrupt_data(msg, context)
    return real_evaluate(msg, context)
