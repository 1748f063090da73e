"""Flower messages for the strategy and privacy tests: a global model, instructions, replies.

The messages need a run id; the ``task_identity`` fixture (tests/unit/conftest.py) gives them one
outside a Flower run.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, MetricRecord, RecordDict

from common.arrays import array_specs, pack
from server_app.strategy import RoundReport

# The global model every reply is an update of: one 2x2 zero array.
GLOBAL = ArrayRecord({"w": Array(np.zeros((2, 2), np.float32))})


def instruction(node: int) -> Message:
    """The server's ``train`` message to ``node``, with the id a grid gives it when sent."""
    message = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    message.metadata.__dict__["_message_id"] = f"to-node-{node}"
    return message


def reply(node: int, value: float, weight, shape=(2, 2), index: int | None = None) -> Message:
    """``node``'s reply: array ``w`` filled with ``value``, ``weight`` examples, loss ``value``.

    Packed, as a ClientApp sends it.

    It answers for hospital ``index`` (default: ``node - 1``, so nodes 1..n are hospitals 0..n-1).
    """
    content = RecordDict(
        {
            "arrays": pack(ArrayRecord({"w": Array(np.full(shape, value, np.float32))})),
            "metrics": MetricRecord(
                {
                    "num-examples": weight,
                    "train-loss": value,
                    "hospital-index": node - 1 if index is None else index,
                }
            ),
        }
    )
    return Message(content=content, reply_to=instruction(node))


def prepare(strategy, global_arrays: ArrayRecord = GLOBAL):
    """Set what ``configure_train`` records for a round: the global model and its specs."""
    strategy._reference = array_specs(global_arrays)
    strategy._global = global_arrays
    strategy._claims = {}
    strategy.report = RoundReport()
    return strategy


def failed(node: int, reason: str = "HospitalDataError: 1 truncated_image") -> Message:
    """``node``'s error reply, as a ClientApp that raised sends it."""
    return Message(Error(code=0, reason=reason), reply_to=instruction(node))
