"""FedAvg that checks every reply before averaging and refuses to close a round short of replies.

Models cross the network packed into one flat array per kind of value (``common.arrays.pack``).
Every train reply passes, in order: the size cap, unpacking by the global model's layout (the
packed arrays must hold exactly its number of values), the structural checks of
``common.arrays`` (one ArrayRecord and one MetricRecord, the global model's keys, shapes and
dtypes, finite values, a finite positive ``num-examples``), a ``hospital-index`` in range that
no other node has claimed this round, the ``num-examples`` cap (what that hospital declared in
its first round), and the update-norm guards (``federation.guards``). A reply that fails any of
them is rejected and named by node id in the round report; the rest are averaged. A round that
needs nodes waits for them at most ``federation.round_wait_for_nodes_s`` (Flower's own sampling
waits forever).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from common.arrays import (
    SPLIT_KEY,
    WEIGHT_KEY,
    ArraySpec,
    array_bytes,
    array_specs,
    check_metrics_reply,
    check_update,
    pack,
    record_bytes,
    unpack_reply,
    upcast_reply,
    weighted_average,
)

log = logging.getLogger(__name__)

INDEX_KEY = "hospital-index"


class RunStoppedError(RuntimeError):
    """The run cannot go on; the last checkpoint stays, and ``resume=true`` continues it."""


class TooFewRepliesError(RunStoppedError):
    """A round ended with fewer good replies than the configured minimum."""


class TooFewNodesError(RunStoppedError):
    """Fewer SuperNodes than the minimum were online when a round had to start."""


@dataclass(frozen=True)
class Guards:
    """Limits on what one reply may do to the global model; ``None`` switches a guard off.

    - ``max_update_model_ratio``: an update (reply minus global model) whose L2 norm exceeds
      this many times the global model's own norm is rejected.
    - ``max_update_norm_ratio``: an update whose norm exceeds this many times the median update
      norm of the *other* good replies of the round is rejected (from three replies up).
    - ``peer_norm_floor``: that median is taken as at least this many times the global model's
      norm. Sites of one step at the warm-up rate send updates near zero, next to which the
      honest update of a larger site looks out of line.
    - ``max_examples_growth``: a hospital's ``num-examples`` is capped at this many times what it
      declared in its first round.
    - ``max_reply_model_ratio``: a train reply whose arrays take more bytes than this many times
      the global model's is rejected before any of its arrays is decoded; an honest reply is at
      most the global model's size.
    """

    max_update_model_ratio: float | None = None
    max_update_norm_ratio: float | None = None
    peer_norm_floor: float | None = None
    max_examples_growth: float | None = None
    max_reply_model_ratio: float | None = None


@dataclass
class RoundReport:
    """What the last round's replies said, for the per-round log line and metrics row."""

    good: int = 0
    # Training replies: which hospitals the new model leaves out, and why.
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    # Evaluation replies, kept apart: a hospital whose update was averaged may fail to score.
    evaluate_failed: dict[int, str] = field(default_factory=dict)
    evaluate_rejected: dict[int, str] = field(default_factory=dict)
    # num-examples claimed above the cap, per node: (claimed, used).
    capped: dict[int, tuple[float, float]] = field(default_factory=dict)
    # Update norms of the replies that reached the norm guards, and the global model's norm.
    update_norms: dict[int, float] = field(default_factory=dict)
    global_norm: float | None = None
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    per_hospital: dict[int, dict[str, float]] = field(default_factory=dict)
    # Array bytes of the messages sent to / received from each node this round (train and
    # evaluate), measured on the messages themselves; metric records are not counted.
    bytes_sent: dict[int, int] = field(default_factory=dict)
    bytes_received: dict[int, int] = field(default_factory=dict)


def _metrics_of(msg: Message) -> MetricRecord:
    return next(iter(msg.content.metric_records.values()))


def _arrays_of(msg: Message) -> ArrayRecord:
    return next(iter(msg.content.array_records.values()))


def _scores(metrics: MetricRecord) -> dict[str, float]:
    """A reply's numeric scores, without the bookkeeping keys (weight, hospital index)."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key not in (WEIGHT_KEY, INDEX_KEY) and isinstance(value, int | float)
    }


def weighted_metrics(replies: list[Message]) -> dict[str, float]:
    """Per-key weighted mean over the replies that carry the key.

    Hospitals without masks report no localization score; Flower's default aggregation would
    reject the round for inconsistent keys, this averages each score over those that have it.
    Weights are taken as shares of the largest, as the models' average takes them.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    largest = max((float(_metrics_of(msg)[WEIGHT_KEY]) for msg in replies), default=1.0)
    for msg in replies:
        metrics = _metrics_of(msg)
        weight = float(metrics[WEIGHT_KEY]) / largest
        for key, value in _scores(metrics).items():
            if not math.isfinite(value):
                continue
            sums[key] = sums.get(key, 0.0) + weight * value
            weights[key] = weights.get(key, 0.0) + weight
    return {key: sums[key] / weights[key] for key in sums}


def update_norm(reply: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``reply - reference`` over every array, accumulated in float64.

    Inf (never NaN) when the difference overflows, so that any bound rejects it.
    """
    squares = 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for key, array in reference.items():
            diff = reply[key].numpy().astype(np.float64) - array.numpy().astype(np.float64)
            squares += float(np.square(diff).sum())
    return squares if math.isnan(squares) else math.sqrt(squares)


def model_norm(arrays: ArrayRecord) -> float:
    """L2 norm of every array of ``arrays`` together (float64)."""
    squares = (float(np.square(a.numpy().astype(np.float64)).sum()) for a in arrays.values())
    return math.sqrt(sum(squares))


def online_nodes(grid: Grid, at_least: int, timeout_s: float) -> list[int]:
    """The online SuperNodes once ``at_least`` are, or whoever is online after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= at_least or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.5)


class GuardedFedAvg(FedAvg):
    """Weighted FedAvg over every hospital, with reply checks and a minimum-replies rule."""

    name = "fedavg"

    def __init__(
        self,
        *,
        num_hospitals: int,
        min_replies: int,
        round_offset: int = 0,
        transport_dtype: str = "float32",
        hospitals: Sequence[str] | None = None,
        guards: Guards | None = None,
        round_wait_for_nodes_s: float = 300.0,
        declared_examples: dict[int, float] | None = None,
        split_digests: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        if not 1 <= min_replies <= num_hospitals:
            raise ValueError(f"min_replies must be in 1..{num_hospitals}, got {min_replies}")
        # Every online hospital is sampled (fraction 1.0); a round starts once min_replies of
        # them are online (configure_train below does the sampling, with a time limit).
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_replies,
            min_evaluate_nodes=min_replies,
            min_available_nodes=min_replies,
            weighted_by_key=WEIGHT_KEY,
        )
        self.num_hospitals = num_hospitals
        self.hospitals = list(hospitals) if hospitals else [str(i) for i in range(num_hospitals)]
        self.min_replies = min_replies
        # Rounds already done by the run this one resumes: clients see the true round number,
        # which places them in the learning-rate schedule and seeds their shuffling.
        self.round_offset = round_offset
        # float16: hospitals reply in half precision (federation.transport_dtype), upcast here.
        self.transport_dtype = transport_dtype
        self.guards = guards or Guards()
        self.round_wait_for_nodes_s = float(round_wait_for_nodes_s)
        # Differential privacy averages with equal weights (server_app/privacy.py).
        self.uniform_weights = False
        # num-examples of each hospital (by index) in the first round it answered.
        self.declared_examples: dict[int, float] = dict(declared_examples or {})
        # Each hospital's split fingerprints so far, in the order they first came.
        self.split_digests: dict[str, list[int]] = {
            name: list(digests) for name, digests in (split_digests or {}).items()
        }
        self.report = RoundReport()
        self._reference: dict[str, ArraySpec] = {}
        self._global: ArrayRecord | None = None
        self._sent: list[Message] = []
        self._claims: dict[int, int] = {}
        self.update_norms: dict[int, float] = {}

    # ------------------------------------------------------------------ sampling

    def _sample(self, server_round: int, grid: Grid, *, required: bool) -> list[int]:
        """Every online node, once ``min_replies`` are online or the wait runs out."""
        nodes = online_nodes(grid, self.min_replies, self.round_wait_for_nodes_s)
        if len(nodes) >= self.min_replies:
            return nodes
        stage = "training" if required else "evaluation"
        message = (
            f"round {server_round + self.round_offset} {stage}: {len(nodes)} SuperNodes online "
            f"after {self.round_wait_for_nodes_s:g} s (federation.round_wait_for_nodes_s), at "
            f"least {self.min_replies} required (federation.min_replies)"
        )
        if required:
            raise TooFewNodesError(
                f"{message}; the last checkpoint is kept, resume=true continues the run"
            )
        log.warning("%s; evaluating on the %d online", message, len(nodes))
        return nodes

    def _messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        nodes: list[int],
        message_type: str,
    ) -> list[Message]:
        config["server-round"] = server_round + self.round_offset
        record = RecordDict({self.arrayrecord_key: pack(arrays), self.configrecord_key: config})
        # One line when a round starts (a deployed round can take minutes before the
        # recorder's line closes it); its evaluation's start only at DEBUG.
        level, stage = (
            (logging.INFO, "training")
            if message_type == MessageType.TRAIN
            else (logging.DEBUG, "evaluating")
        )
        phase = f"{config['phase']} " if "phase" in config else ""  # the MCT rounds name none
        log.log(
            level, "%sround %d: %s on %d nodes", phase, config["server-round"], stage, len(nodes)
        )
        return self._remember(self._construct_messages(record, nodes, message_type))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model, its shapes and dtypes: every reply must match them."""
        self._reference = array_specs(arrays)
        self._global = arrays
        self.report = RoundReport()
        nodes = self._sample(server_round, grid, required=True)
        return self._messages(server_round, arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask every online hospital to score the new global model (true round numbers)."""
        nodes = self._sample(server_round, grid, required=False)
        if not nodes:
            return self._remember([])  # Flower still aggregates the (no) replies
        return self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE)

    def _remember(self, messages: Iterable[Message]) -> list[Message]:
        """Keep the outgoing messages: the grid gives them ids when it sends them.

        A reply that Flower makes up for an unreachable node carries the SuperLink as its
        source, so failures are attributed through the message they answer instead.
        """
        self._sent = list(messages)
        self._claims = {}
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

    # ------------------------------------------------------------------ screening

    def reject(self, node: int, reason: str, evaluation: bool = False) -> None:
        """Leave ``node``'s reply out of this round, named in the log and the metrics row."""
        if evaluation:
            self.report.evaluate_rejected[node] = reason
            log.warning("node %d: evaluation reply left out of the scores: %s", node, reason)
        else:
            self.report.rejected[node] = reason
            log.warning("node %d: reply rejected before averaging: %s", node, reason)

    def _check_claim(self, node: int, metrics: MetricRecord) -> str | None:
        """One node per hospital: the hospital-index must be valid and not yet claimed."""
        index = metrics.get(INDEX_KEY)
        if (
            isinstance(index, bool)
            or not isinstance(index, int | float)
            or not math.isfinite(index)
            or index != int(index)
        ):
            return f"'{INDEX_KEY}' is missing or not an integer: {index!r}"
        index = int(index)
        if not 0 <= index < self.num_hospitals:
            return f"'{INDEX_KEY}' {index} is not one of the run's 0..{self.num_hospitals - 1}"
        owner = self._claims.setdefault(index, node)
        if owner != node:
            return (
                f"claims hospital '{self.hospitals[index]}' ({INDEX_KEY} {index}), which node "
                f"{owner} already answered for this round"
            )
        return None

    def _cap_examples(self, node: int, metrics: MetricRecord) -> None:
        """Cap num-examples at what this hospital declared first (times the allowed growth)."""
        index = int(metrics[INDEX_KEY])
        claimed = float(metrics[WEIGHT_KEY])
        declared = self.declared_examples.setdefault(index, claimed)
        growth = self.guards.max_examples_growth
        if growth is None or claimed <= declared * growth:
            return
        cap = declared * growth
        metrics[WEIGHT_KEY] = cap
        self.report.capped[node] = (claimed, cap)
        log.warning(
            "node %d (hospital '%s'): num-examples %g capped at %g (declared %g in its first "
            "round, federation.guards.max_examples_growth=%g)",
            node,
            self.hospitals[index],
            claimed,
            cap,
            declared,
            growth,
        )

    def _sort_replies(self, replies: Iterable[Message], check_arrays: bool) -> list[Message]:
        failed = self.report.failed if check_arrays else self.report.evaluate_failed
        stage = "training" if check_arrays else "evaluation"
        replies = list(replies)
        # The grid returns fewer replies, not error replies, for nodes past the round's
        # timeout: without this a stalled hospital was named nowhere.
        answered = {self._node_of(msg) for msg in replies}
        for node in (m.metadata.dst_node_id for m in self._sent):
            if node not in answered:
                failed[node] = "no reply within federation.round_timeout_s"
                log.warning("node %d failed in %s: %s", node, stage, failed[node])
        good = []
        for msg in replies:
            node = self._node_of(msg)
            if msg.has_error():
                failed[node] = msg.error.reason
                log.warning("node %d failed in %s: %s", node, stage, msg.error.reason)
                continue
            size = record_bytes(msg.content)
            received = self.report.bytes_received
            received[node] = received.get(node, 0) + size
            if check_arrays and (
                reason := self._check_size(size) or unpack_reply(msg.content, self._reference)
            ):
                self.reject(node, reason)
                continue
            if check_arrays and self.transport_dtype != "float32":
                upcast_reply(msg.content, self._reference)
            reason = (
                check_update(msg.content, self._reference)
                if check_arrays
                else check_metrics_reply(msg.content)
            ) or self._check_claim(node, _metrics_of(msg))
            if reason is not None:
                self.reject(node, reason, evaluation=not check_arrays)
                continue
            good.append(msg)
        return good

    def _check_size(self, size: int) -> str | None:
        """Too many bytes for an update of the global model: refused before decoding."""
        ratio = self.guards.max_reply_model_ratio
        if ratio is None or self._global is None:
            return None
        model_bytes = array_bytes(self._global)
        if size <= ratio * model_bytes:
            return None
        return (
            f"reply carries {size / 1e6:.4g} MB of arrays, over {ratio:g} x the global model's "
            f"{model_bytes / 1e6:.4g} MB (federation.guards.max_reply_model_ratio)"
        )

    def _norm_guards(self, replies: list[Message], max_norm: float | None) -> list[Message]:
        """Reject updates too large for the global model, the other replies or ``max_norm``."""
        if self._global is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        norms = {id(m): update_norm(_arrays_of(m), self._global) for m in replies}
        self.update_norms = {self._node_of(m): norms[id(m)] for m in replies}
        self.report.update_norms = dict(self.update_norms)
        self.report.global_norm = model_norm(self._global)
        ratio = self.guards.max_update_model_ratio
        bound = None if ratio is None else ratio * self.report.global_norm
        kept = []
        for msg in replies:
            norm = norms[id(msg)]
            if max_norm is not None and not norm <= max_norm:
                self.reject(
                    self._node_of(msg),
                    f"update norm {norm:.4g} exceeds the clipping norm {max_norm:.4g} "
                    "(privacy=client_clip: the hospital must clip before sending)",
                )
            elif bound is not None and not norm <= bound:
                self.reject(
                    self._node_of(msg),
                    f"update norm {norm:.4g} exceeds {ratio:g} x the global model's norm "
                    f"({bound:.4g}; federation.guards.max_update_model_ratio)",
                )
            else:
                kept.append(msg)
        ratio = self.guards.max_update_norm_ratio
        # Two replies cannot tell which one is out of line: Dataset 2's single step at the
        # warm-up rate made an update 1600 times smaller than Dataset 1's, and the guard threw
        # out the honest site. The bound on the global model's norm still holds for both. With
        # more replies, the floor keeps two such small sites from doing the same to a third.
        if ratio is None or len(kept) < 3:
            return kept
        floor = (self.guards.peer_norm_floor or 0.0) * self.report.global_norm
        final = []
        for msg in kept:
            others = max(float(np.median([norms[id(m)] for m in kept if m is not msg])), floor)
            norm = norms[id(msg)]
            if norm > ratio * others:
                self.reject(
                    self._node_of(msg),
                    f"update norm {norm:.4g} exceeds {ratio:g} x the median update norm of the "
                    f"other replies ({others:.4g}; federation.guards.max_update_norm_ratio)",
                )
            else:
                final.append(msg)
        return final

    def screen_train(
        self, server_round: int, replies: Iterable[Message], max_norm: float | None = None
    ) -> list[Message]:
        """The train replies fit to average; stop the run when fewer than the minimum remain."""
        good = self._sort_replies(replies, check_arrays=True)
        good = self._norm_guards(good, max_norm)
        # In hospital order, not arrival order: the average's float sums then do not depend on
        # which hospital answered first, so a repeated or resumed run gives the same model.
        good.sort(key=lambda msg: int(_metrics_of(msg)[INDEX_KEY]))
        # Only accepted replies declare (or are held to) a hospital's num-examples.
        for msg in good:
            self._cap_examples(self._node_of(msg), _metrics_of(msg))
        self._note_splits(server_round, good)
        self.report.good = len(good)
        if len(good) < self.min_replies:
            raise TooFewRepliesError(
                f"round {server_round + self.round_offset}: {len(good)} good replies, "
                f"at least {self.min_replies} required (failed nodes: "
                f"{sorted(self.report.failed)}, rejected nodes: {sorted(self.report.rejected)}); "
                "the last good checkpoint is kept"
            )
        return good

    # ------------------------------------------------------------------ aggregation

    def combine(self, server_round: int, good: list[Message]) -> ArrayRecord:
        """The new global model from screened replies: num-examples-weighted mean (float64)."""
        contents = [m.content for m in good]
        if self.uniform_weights:
            contents = [_with_weight(c, 1.0) for c in contents]
        return weighted_average(contents, self._reference)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the sound replies, or stop the run when fewer than the minimum remain."""
        good = self.screen_train(server_round, replies)
        return self.finish_train(server_round, good, self.combine(server_round, good))

    def finish_train(
        self, server_round: int, good: list[Message], arrays: ArrayRecord
    ) -> tuple[ArrayRecord, MetricRecord]:
        """Record the round's train metrics (weighted by num-examples) next to ``arrays``."""
        self.report.train = weighted_metrics(good)
        self._record_hospitals(good)
        return arrays, MetricRecord(self.report.train)

    def _note_splits(self, server_round: int, good: list[Message]) -> None:
        """Keep each hospital's split fingerprint, out of its metrics; warn when one changes.

        A new fingerprint means the site's images were added, removed or renamed between
        rounds: its splits were redrawn, so images the model trained on may now be test
        images. The model files keep every fingerprint, and post-training refuses a hospital
        whose split is not the one (and only one) it trained on. Taken out of the metrics, it
        is neither a score nor a key that Flower's aggregators would find in some replies and
        not in others (clients of earlier versions send none; they are taken as they are).
        """
        for msg in good:
            metrics = _metrics_of(msg)
            digest = metrics.pop(SPLIT_KEY, None)
            if not isinstance(digest, int) or isinstance(digest, bool):
                continue
            name = self.hospitals[int(metrics[INDEX_KEY])]
            seen = self.split_digests.setdefault(name, [])
            if digest in seen:
                continue
            if seen:
                log.warning(
                    "round %d: hospital '%s' trains on other splits than in its earlier rounds "
                    "(images added, removed or renamed at the site); images the model trained "
                    "on may now be among its test images, and post-training will refuse this "
                    "model there",
                    server_round + self.round_offset,
                    name,
                )
            seen.append(digest)

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
            row = self.report.per_hospital.setdefault(int(metrics[INDEX_KEY]), {})
            row.update(_scores(metrics))
            node = self._node_of(msg)
            row["bytes-sent"] = self.report.bytes_sent.get(node, 0)
            row["bytes-received"] = self.report.bytes_received.get(node, 0)


def _with_weight(content: RecordDict, weight: float) -> RecordDict:
    """``content`` with its num-examples replaced (a shallow copy; arrays are shared)."""
    metrics = MetricRecord({**next(iter(content.metric_records.values())), WEIGHT_KEY: weight})
    return RecordDict({"arrays": next(iter(content.array_records.values())), "metrics": metrics})


def _coordinate_wise(
    good: list[Message],
    reference: dict[str, ArraySpec],
    statistic: Callable[[np.ndarray], np.ndarray],
) -> ArrayRecord:
    """``statistic`` of the replies' arrays stacked on axis 0, in the global model's dtypes.

    Not through Flower's ``aggregate_train``: it checks the replies once more and stops the
    run, naming no one, when their metric names differ (a hospital on another version, one
    score more), which FedAvg's per-name average takes; the screening has checked the arrays.
    """
    combined = {}
    for key, spec in reference.items():
        values = statistic(np.stack([_arrays_of(msg)[key].numpy() for msg in good]))
        dtype = np.dtype(spec.dtype)
        if not np.issubdtype(dtype, np.floating):
            values = np.rint(values)
        combined[key] = Array(np.asarray(values, dtype=dtype))
    return ArrayRecord(combined)


class GuardedFedTrimmedAvg(GuardedFedAvg, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean, unweighted) behind the same checks."""

    name = "fedtrimmedavg"

    def __init__(self, *, beta: float = 0.2, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"strategy.beta must be in [0, 0.5), got {beta}")
        self.beta = beta

    def combine(self, server_round: int, good: list[Message]) -> ArrayRecord:
        """Flower's trimmed mean of the screened replies, in the global model's dtypes."""
        return _coordinate_wise(good, self._reference, lambda stack: trim_mean(stack, self.beta))


class GuardedFedMedian(GuardedFedAvg, FedMedian):
    """Flower's FedMedian (coordinate-wise median, unweighted) behind the same checks."""

    name = "fedmedian"

    def combine(self, server_round: int, good: list[Message]) -> ArrayRecord:
        """The coordinate-wise median of the screened replies, in the model's dtypes."""
        return _coordinate_wise(good, self._reference, lambda stack: np.median(stack, axis=0))


STRATEGIES: dict[str, type[GuardedFedAvg]] = {
    cls.name: cls for cls in (GuardedFedAvg, GuardedFedTrimmedAvg, GuardedFedMedian)
}


def build_strategy(strategy_cfg, **kwargs) -> GuardedFedAvg:
    """The guarded strategy ``strategy_cfg.name`` names (conf/strategy/), built with ``kwargs``."""
    name = str(strategy_cfg.name)
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    if name == GuardedFedTrimmedAvg.name:
        kwargs["beta"] = float(strategy_cfg.beta)
    return STRATEGIES[name](**kwargs)
