"""FedAvg that checks every reply before averaging and refuses to close a round short of replies."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.arrays import (
    WEIGHT_KEY,
    ArraySpec,
    array_specs,
    check_metrics_reply,
    check_update,
    record_bytes,
    upcast_reply,
    weighted_average,
)

log = logging.getLogger(__name__)


class TooFewRepliesError(RuntimeError):
    """A round ended with fewer good replies than the configured minimum."""


@dataclass
class RoundReport:
    """What the last round's replies said, for the per-round log line and metrics row."""

    good: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    per_hospital: dict[int, dict[str, float]] = field(default_factory=dict)
    # Array bytes of the messages sent to / received from each node this round (train and
    # evaluate), measured on the messages themselves; metric records are not counted.
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)


def _metrics_of(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()))


def _scores(metrics: MetricRecord) -> dict[str, float]:
    """A reply's numeric scores, without the bookkeeping keys (weight, hospital index)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key not in (WEIGHT_KEY, "hospital-index") and isinstance(value, int | float)
    }


def weighted_metrics(replies: list[Message]) -> dict[str, float]:
    """Per-key weighted mean over the replies that carry the key.

    Hospitals without masks report no localization score; Flower's default aggregation would
    reject the round for inconsistent keys, this averages each score over those that have it.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for msg in replies:
        metrics = _metrics_of(msg)
        weight = float(metrics[WEIGHT_KEY])
        for key, value in _scores(metrics).items():
            if not math.isfinite(value):
                continue
            sums[key] = sums.get(key, 0.0) + weight * value
            weights[key] = weights.get(key, 0.0) + weight
    return {key: sums[key] / weights[key] for key in sums}


class GuardedFedAvg(FedAvg):
    """Weighted FedAvg over every hospital, with reply checks and a minimum-replies rule."""

    def __init__(
        self,
        *,
        num_hospitals: int,
        min_replies: int,
        round_offset: int = 0,
        transport_dtype: str = "float32",
    ) -> None:
        if not 1 <= min_replies <= num_hospitals:
            raise ValueError(f"min_replies must be in 1..{num_hospitals}, got {min_replies}")
        # Every connected hospital is sampled (fraction 1.0); a round starts once min_replies
        # of them are connected, so one hospital down does not stall the federation forever.
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_replies,
            min_evaluate_nodes=min_replies,
            min_available_nodes=min_replies,
            weighted_by_key=WEIGHT_KEY,
        )
        self.min_replies = min_replies
        # Rounds already done by the run this one resumes: clients see the true round number,
        # which places them in the learning-rate schedule and seeds their shuffling.
        self.round_offset = round_offset
        # float16: hospitals reply in half precision (federation.transport_dtype), upcast here.
        self.transport_dtype = transport_dtype
        self.report = RoundReport()
        self._reference: dict[str, ArraySpec] = {}
        self._sent: list[Message] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model's shapes and dtypes: every reply must match them."""
        self._reference = array_specs(arrays)
        self.report = RoundReport()
        return self._remember(
            super().configure_train(server_round + self.round_offset, arrays, config, grid)
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Tell clients the true round number when resuming."""
        return self._remember(
            super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)
        )

    def _remember(self, messages: Iterable[Message]) -> list[Message]:
        """Keep the outgoing messages: the grid gives them ids when it sends them.

        A reply that Flower makes up for an unreachable node carries the SuperLink as its
        source, so failures are attributed through the message they answer instead.
        """
        self._sent = list(messages)
        for msg in self._sent:
            node = msg.metadata.dst_node_id
            sent = self.report.bytes_sent
            sent[node] = sent.get(node, 0) + record_bytes(msg.content)
        return self._sent

    def _node_of(self, reply: Message) -> int:
        answered = reply.metadata.reply_to_message_id
        for sent in self._sent:
            if sent.metadata.message_id == answered:
                return sent.metadata.dst_node_id
        return reply.metadata.src_node_id

    def _sort_replies(self, replies: Iterable[Message], check_arrays: bool) -> list[Message]:
        good = []
        for msg in replies:
            node = self._node_of(msg)
            if msg.has_error():
                self.report.failed[node] = msg.error.reason
                log.warning("node %d failed: %s", node, msg.error.reason)
                continue
            received = self.report.bytes_received
            received[node] = received.get(node, 0) + record_bytes(msg.content)
            if check_arrays and self.transport_dtype != "float32":
                upcast_reply(msg.content, self._reference)
            reason = (
                check_update(msg.content, self._reference)
                if check_arrays
                else check_metrics_reply(msg.content)
            )
            if reason is not None:
                self.report.rejected[node] = reason
                log.warning("node %d: reply rejected before averaging: %s", node, reason)
                continue
            good.append(msg)
        return good

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the sound replies, or stop the run when fewer than the minimum remain."""
        good = self._sort_replies(replies, check_arrays=True)
        self.report.good = len(good)
        if len(good) < self.min_replies:
            raise TooFewRepliesError(
                f"round {server_round + self.round_offset}: {len(good)} good replies, "
                f"at least {self.min_replies} required (failed nodes: "
                f"{sorted(self.report.failed)}, rejected nodes: {sorted(self.report.rejected)}); "
                "the last good checkpoint is kept"
            )
        arrays = weighted_average([m.content for m in good], self._reference)
        self.report.train = weighted_metrics(good)
        self._record_hospitals(good)
        return arrays, MetricRecord(self.report.train)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Weighted mean of each validation score over the hospitals that report it."""
        good = self._sort_replies(replies, check_arrays=False)
        self.report.evaluate = weighted_metrics(good)
        self._record_hospitals(good)
        return MetricRecord(self.report.evaluate) if self.report.evaluate else None

    def _record_hospitals(self, replies: list[Message]) -> None:
        for msg in replies:
            metrics = _metrics_of(msg)
            if "hospital-index" not in metrics:
                continue
            row = self.report.per_hospital.setdefault(int(metrics["hospital-index"]), {})
            row.update(_scores(metrics))
            node = self._node_of(msg)
            row["bytes-sent"] = self.report.bytes_sent.get(node, 0)
            row["bytes-received"] = self.report.bytes_received.get(node, 0)
