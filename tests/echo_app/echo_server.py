"""Send one large state dict to one SuperNode and check the echo bit for bit, both ways."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from digests import array_digests
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

app = ServerApp()
TENSOR_MB = 100


def state_dict(total_mb: int) -> dict[str, torch.Tensor]:
    """Random float32 tensors of 100 MB each (the last smaller), ``total_mb`` MB in all."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    remaining = total_mb * 10**6 // 4
    while remaining:
        count = min(remaining, TENSOR_MB * 10**6 // 4)
        tensors[f"blocks.{len(tensors)}.weight"] = torch.randn(count, generator=generator)
        remaining -= count
    return tensors


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Round-trip the payload through the SuperLink and a SuperNode; write the verdict."""
    config = context.run_config
    timeout = float(config["timeout-s"])
    deadline = time.monotonic() + timeout
    while not (nodes := list(grid.get_node_ids())):
        if time.monotonic() > deadline:
            raise TimeoutError("no SuperNode connected")
        time.sleep(1.0)
    record = ArrayRecord(state_dict(int(config["payload-mb"])))
    sent = array_digests(record)
    message = Message(RecordDict({"arrays": record}), dst_node_id=nodes[0], message_type="query")
    started = time.perf_counter()
    (reply,) = grid.send_and_receive([message], timeout=timeout)
    seconds = time.perf_counter() - started
    if reply.has_error():
        raise RuntimeError(f"the echo failed: {reply.error.reason}")
    verdict = {
        "bytes": sum(array.numpy().nbytes for array in record.values()),
        "arrays": len(sent),
        "round_trip_seconds": round(seconds, 2),
        "downlink_exact": dict(reply.content["received"]) == sent,
        "uplink_exact": array_digests(reply.content["arrays"]) == sent,
    }
    Path(str(config["result-file"])).write_text(json.dumps(verdict) + "\n", encoding="utf-8")
