"""After every round: an atomic checkpoint, one metrics row and one log line, all in the run dir."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from omegaconf import DictConfig

from common.arrays import to_state_dict
from common.checkpoint import prune_rounds, save_model
from common.files import write_text_atomically
from common.logs import metrics_text
from server_app.strategy import GuardedFedAvg

log = logging.getLogger(__name__)

CHECKPOINTS_KEPT = 2
# A run's phases, in order: the pretraining rounds (if any), then the MCT rounds.
PHASES = ("pretrain", "mct")
# num-examples each hospital declared in its first round (the cap's base), kept for resume.
DECLARED_FILE = "declared_examples.json"
# One JSON row per round of either phase.
METRICS_FILE = "metrics.jsonl"


LOGGED_METRICS = (
    "train-loss",
    "val-loss",
    "val-accuracy",
    "val-cam-accuracy",
    "val-map",
    "val-loc-miou",
)


def current_rss_mb() -> float:
    """Resident memory of the server process now (not the peak), to watch growth over rounds."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phase_of(row: dict[str, Any]) -> str:
    """The phase a ``metrics.jsonl`` row belongs to.

    Runs made before the pretraining phase existed wrote rows without one: all MCT rounds.
    """
    return str(row.get("phase", "mct"))


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as null, which strict JSON readers (jq, JavaScript) take.

    A hospital scores NaN where its validation split leaves a score undefined (mAP without a
    positive image); JSON has no such number.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def _missing(failed: dict[int, str], rejected: dict[int, str]) -> str:
    """`` (failed 1, rejected 0)`` after the validation scores when some hospital gave none."""
    return f" (failed {len(failed)}, rejected {len(rejected)})" if failed or rejected else ""


def released_splits(cfg: DictConfig, strategy: GuardedFedAvg) -> dict[str, list[int]]:
    """The split fingerprints that model files keep: none in a run with differential privacy.

    A fingerprint tells apart two image sets that differ by one image, which is what the
    privacy guarantee hides from whoever receives the models; such a run's post-training
    cannot check its split (docs/privacy.md).
    """
    return {} if str(cfg.privacy.name) != "none" else strategy.split_digests


def checkpoint_prefix(phase: str) -> str:
    """How a phase's checkpoints are named: ``round_NNN.pt``, ``pretrain_round_NNN.pt``."""
    return "round_" if phase == "mct" else f"{phase}_round_"


class RoundRecorder:
    """The strategy's ``evaluate_fn``: runs at round 0 and after each round."""

    def __init__(
        self,
        run_dir: Path,
        cfg: DictConfig,
        strategy: GuardedFedAvg,
        hospitals: Sequence[str],
        phase: str = "mct",
    ) -> None:
        self.run_dir = run_dir
        # A phase before the MCT rounds (pretrain) numbers its rounds from 1 too: its rows carry
        # the phase and its checkpoints a prefix, so resuming and post-training never mix them up.
        self.phase = phase
        self.prefix = checkpoint_prefix(phase)
        self.total_rounds = int(cfg.federation.rounds if phase == "mct" else cfg[phase]["rounds"])
        self.offset = strategy.round_offset
        self.cfg = cfg
        self.strategy = strategy
        self.hospitals = list(hospitals)
        self.metrics_path = run_dir / METRICS_FILE
        self.checkpoint_dir = run_dir / "checkpoints"
        self._round_started = time.perf_counter()

    def __call__(self, strategy_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Append the metrics row of ``strategy_round``, then checkpoint the global model.

        In that order, a run stopped between the two resumes from the round before, whose
        redone row replaces the one written (:meth:`forget_rounds_after`); the other way round,
        the round's row would be lost for good.
        """
        if strategy_round == 0 and self.offset > 0:
            self._round_started = time.perf_counter()
            return None  # resuming: the checkpoint of this model is the one we started from
        server_round = strategy_round + self.offset
        seconds = time.perf_counter() - self._round_started
        declared = json.dumps(self.declared(), indent=2) + "\n"
        write_text_atomically(self.run_dir / DECLARED_FILE, declared)
        if server_round > 0:
            self._write_row(server_round, seconds)
        path = self.checkpoint_dir / f"{self.prefix}{server_round:03d}.pt"
        splits = released_splits(self.cfg, self.strategy)
        save_model(to_state_dict(arrays), self.cfg, server_round, path, splits)
        # Keep the newest only: a paper-scale run would otherwise write 4 GB.
        prune_rounds(self.checkpoint_dir, self.prefix, server_round, CHECKPOINTS_KEPT)
        self._round_started = time.perf_counter()
        return None

    def declared(self) -> dict[str, float]:
        """The num-examples each hospital declared in its first round, by name."""
        return {self.hospitals[i]: n for i, n in sorted(self.strategy.declared_examples.items())}

    def _rows(self) -> list[str]:
        """The rows of ``metrics.jsonl`` as written, in order; none before the first round."""
        if not self.metrics_path.exists():
            return []
        return [line for line in self.metrics_path.read_text("utf-8").splitlines() if line.strip()]

    def forget_rounds_after(self, server_round: int) -> None:
        """Drop this phase's rows of the rounds a resumed run will redo."""
        kept = []
        for number, line in enumerate(self._rows(), start=1):
            try:
                row = json.loads(line)
                redone = phase_of(row) == self.phase and row["round"] > server_round
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
                raise ValueError(
                    f"{self.metrics_path} line {number} is not a round's row: {line[:80]!r}"
                ) from None
            if not redone:
                kept.append(line)
        write_text_atomically(self.metrics_path, "".join(f"{line}\n" for line in kept))

    def _write_row(self, server_round: int, seconds: float) -> None:
        report = self.strategy.report
        row = {
            "phase": self.phase,
            "round": server_round,
            "seconds": round(seconds, 3),
            "replies": report.good,
            "failed_nodes": sorted(report.failed),
            # What the server received from failing hospitals, as it received it.
            "failures": {str(k): v for k, v in report.failed.items()},
            "rejected": {str(k): v for k, v in report.rejected.items()},
            # Evaluation replies that failed or were left out: their hospitals have no val row.
            "evaluate_failures": {str(k): v for k, v in report.evaluate_failed.items()},
            "evaluate_rejected": {str(k): v for k, v in report.evaluate_rejected.items()},
            # num-examples over the hospital's cap: [claimed, used] per node.
            "capped": {str(k): list(v) for k, v in report.capped.items()},
            # L2 norm of each screened update (reply - global model), to tune federation.guards.
            "update_norms": {str(k): v for k, v in report.update_norms.items()},
            "global_norm": report.global_norm,
            "train": report.train,
            "evaluate": report.evaluate,
            "hospitals": {self.hospitals[i]: m for i, m in sorted(report.per_hospital.items())},
            # Array bytes on the wire this round, all nodes together (per hospital in hospitals).
            "bytes": {
                "sent": sum(report.bytes_sent.values()),
                "received": sum(report.bytes_received.values()),
            },
            "server-rss-mb": current_rss_mb(),
        }
        rows = [*self._rows(), json.dumps(_json_safe(row), allow_nan=False)]
        write_text_atomically(self.metrics_path, "".join(f"{line}\n" for line in rows))
        log.info(
            "%s round %d/%d | replies %d/%d (failed %d, rejected %d) | train %s | val %s | %.1fs",
            self.phase,
            server_round,
            self.total_rounds,
            report.good,
            len(self.hospitals),
            len(report.failed),
            len(report.rejected),
            metrics_text(report.train, LOGGED_METRICS),
            metrics_text(report.evaluate, LOGGED_METRICS)
            + _missing(report.evaluate_failed, report.evaluate_rejected),
            seconds,
        )
