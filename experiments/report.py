"""``w3s-report``: regenerate EXPERIMENTS.md (tables and PNG plots) from ``w3s-experiment`` runs.

One section per runs dir (one dataset): the evaluation matrix (rows = regimes, columns = each
hospital's test split, mean +- SD over runs: seeds, times folds when cross-validated) for the
segmenter and the pseudo-masks, the verdicts (federated vs local-only per hospital, distance to
the supervised ceiling), paired federated - local-only differences with confidence intervals,
the compute spent, the convergence curves, the communication table and a grid of overlays.
Every number is read from the runs' files; nothing is typed in by hand.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from scipy import stats

from common.cli import Command
from common.data import hospital_split
from common.errors import JobError
from common.files import staged_outputs, write_text_atomically
from experiments.run import COMMAND_LINE, RESULTS
from experiments.supervised import true_labels
from post_training.artifacts import overlay, sample_stems, save_grid
from post_training.stages import DISK, MAPS, OTSU, PSEUDO_MASKS, SEGMENTER
from server_app.recorder import PHASES, phase_of

log = logging.getLogger(__name__)

# Row order of the tables: the paper's comparison first, the ceiling last.
REGIME_ORDER = ("local_only", "centralized", "fedavg", "fedprox", "personalized", "supervised")
# Regimes with a row per hospital, named "<regime> (<hospital>)": one label each per runs dir.
BY_HOSPITAL = ("local_only", "supervised")
FEDERATED = ("fedavg", "fedprox")
# Regimes whose model a hospital could use instead of its own: paired against local-only.
PAIRED = ("centralized", *FEDERATED, "personalized")
# Display titles of the training-free baselines, by stage key.
BASELINE_TITLES = {DISK: "centred disk", OTSU: "Otsu"}
METRICS = ("class_aware", "binary")
GRID_IMAGES = 2
MB = 1e6
# Run folders under a label: seed_<s> (fixed split) or fold_<f>/seed_<s> (cross-validation).
RUN_GLOBS = ("seed_*", "fold_*/seed_*")
# Line styles of the convergence curves, cycled with the colours: tell regimes apart in print.
LINE_STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"))
CONFIDENCE = 0.95
# How the communication table names the phases of metrics.jsonl (server_app/recorder.py).
PHASE_TITLES = {"pretrain": "pretraining", "mct": "MCT"}


def mean_sd(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, sample SD (ddof 1; 0 for a single value) and count of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan, 0
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), sd, len(finite)


def fmt_percent(values: Sequence[float | None]) -> str:
    """``61.2 ± 3.4`` (percent, over runs); ``-`` when nothing was scored."""
    mean, sd, n = mean_sd(values)
    return "-" if n == 0 else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def run_key(result: dict[str, Any]) -> tuple[int, int]:
    """A run's (fold, seed), fold -1 for the fixed split: what pairs runs of two regimes."""
    fold = result.get("fold")
    return (-1 if fold is None else int(fold), int(result["seed"]))


@dataclass
class Dataset:
    """All runs under one runs dir: one dataset, several regimes, several seeds (x folds) each."""

    runs_dir: Path
    data: DictConfig
    hospitals: list[str]
    commands: list[str]
    results: list[dict[str, Any]] = field(default_factory=list)
    pipelines: int = 1
    # Each label's post-training overrides (w3s-experiment's postprocess=[...]): the chain.
    postprocess: dict[str, list[str]] = field(default_factory=dict)
    # Runs trained on a share of each hospital's training images (data.split.train_share < 1):
    # the learning curve, kept out of the matrix, whose rows they would otherwise collide with.
    curve: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The data config's name, e.g. ``synthetic``."""
        return str(self.data.name)

    def rows(self) -> list[str]:
        """Matrix rows in the report's order (by regime, then by name)."""
        found = {(r["regime"], row["row"]) for r in self.results for row in r["rows"]}
        rank = {name: i for i, name in enumerate(REGIME_ORDER)}
        ordered = sorted(found, key=lambda k: (rank.get(k[0], len(rank)), k[1]))
        return [row for _, row in ordered]

    def regime_of(self, row: str) -> str:
        """Which regime a row belongs to."""
        return next(r["regime"] for r in self.results for x in r["rows"] if x["row"] == row)

    def regime_of_label(self, label: str) -> str:
        """Which regime a label's runs used (``fedavg_fp16`` -> ``fedavg``)."""
        return next(r["regime"] for r in self.results if r["label"] == label)

    def values(self, row: str, column: str, stage: str, metric: str) -> list[float | None]:
        """One cell's score over runs."""
        return [
            x["cells"].get(column, {}).get(stage, {}).get(metric)
            for r in self.results
            for x in r["rows"]
            if x["row"] == row and stage in x["cells"].get(column, {})
        ]

    def baseline_values(
        self, column: str, stage: str, metric: str, folds: Collection[int] | None = None
    ) -> list[float | None]:
        """A training-free baseline's score per test split, by fold (-1: the fixed split).

        It depends on the test images only, so it is the same in every row of a run, in every
        seed of a fold and in every label's run on that fold: counted once per split, or its SD
        and count would grow with the number of seeds and labels. ``folds`` keeps those a
        row was scored on, to compare the row with the baseline on the same images.
        """
        by_split: dict[int, float | None] = {}
        for result in self.results:
            scored = [x for x in result["rows"] if stage in x["cells"].get(column, {})]
            fold = run_key(result)[0]
            if scored and (folds is None or fold in folds):
                by_split.setdefault(fold, scored[0]["cells"][column][stage][metric])
        return list(by_split.values())

    def at_share(self, share: float) -> Dataset:
        """The same dataset with only the runs trained on ``share`` of the training images."""
        if share == 1.0:
            return dataclasses.replace(self, curve=[])
        picked = [r for r in self.curve if train_share(r) == share]
        return dataclasses.replace(self, results=picked, curve=[])

    def runs(self, label: str) -> list[dict[str, Any]]:
        """Results of one label, by fold and seed."""
        return sorted((r for r in self.results if r["label"] == label), key=run_key)

    def cells_by_run(
        self, row: str, column: str, metric: str, stage: str = SEGMENTER
    ) -> dict[tuple[int, int], float]:
        """One cell's finite scores at a stage, by (fold, seed): the units of a paired test."""
        out = {}
        for result in self.results:
            for x in result["rows"]:
                value = x["cells"].get(column, {}).get(stage, {}).get(metric)
                if x["row"] == row and value is not None and math.isfinite(value):
                    out[run_key(result)] = float(value)
        return out

    def on_shared_runs(
        self, rows: Sequence[str], column: str, metric: str
    ) -> list[tuple[float, float, int]]:
        """Each row's segmenter mean, SD and count on the (fold, seed) runs all of them have.

        A label that stopped part-way, or ran other folds, would otherwise be compared with
        another over different test splits, where an easy fold can outweigh the regime.
        """
        return on_shared_keys([self.cells_by_run(row, column, metric) for row in rows])


def on_shared_keys(
    scored: Sequence[dict[tuple[int, int], float]],
) -> list[tuple[float, float, int]]:
    """Mean, SD and count of each by-run score dict over the (fold, seed) keys all of them have."""
    keys = set.intersection(*(set(scores) for scores in scored)) if scored else set()
    return [mean_sd(scores[k] for k in keys) for scores in scored]


def train_share(result: dict[str, Any]) -> float:
    """The share of each hospital's training split that a run trained on.

    1 for runs made before the key, and before runs recorded their config at all (which
    w3s-experiment still accepts).
    """
    training = result.get("config", {}).get("training", {})
    return float(training.get("data", {}).get("split", {}).get("train_share", 1.0))


def load_dataset(runs_dir: Path) -> Dataset:
    """Read every ``<label>/experiment.yaml`` and ``<label>/[fold_*/]seed_*/results.json``."""
    configs = sorted(runs_dir.glob("*/experiment.yaml"))
    if not configs:
        raise JobError(f"no w3s-experiment runs (*/experiment.yaml) in {runs_dir}")
    data, commands, results, postprocess = None, [], [], {}
    for path in configs:
        text = path.read_text(encoding="utf-8")
        commands += [line[2:] for line in text.splitlines() if line.startswith(COMMAND_LINE)]
        cfg = OmegaConf.create(text)
        postprocess[str(cfg.label)] = [str(o) for o in cfg.get("postprocess") or []]
        if data is None:
            data, first = cfg.data, cfg.label
        elif cfg.data.name != data.name:
            raise JobError(f"{runs_dir} mixes data={data.name} and data={cfg.data.name}")
        elif (split := split_design(cfg.data)) != split_design(data):
            raise JobError(
                f"{runs_dir}: labels {first} and {cfg.label} split the data differently "
                f"(data.split {split_design(data)} and {split}): their folds test different "
                "images; report them from separate runs dirs"
            )
        for file in sorted(f for g in RUN_GLOBS for f in path.parent.glob(f"{g}/{RESULTS}")):
            try:
                result = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                log.warning(
                    "%s: unreadable (%s); left out, as w3s-experiment redoes it", file, error
                )
                continue
            result["dir"] = str(file.parent)
            results.append(result)
    assert data is not None
    if not results:
        raise JobError(
            f"{runs_dir}: no finished run (<label>/[fold_*/]seed_*/{RESULTS}); runs stopped "
            "before their scoring finish when w3s-experiment is run again"
        )
    hospitals = shared_hospitals(runs_dir, results)
    check_one_label_per_hospital_row(runs_dir, results)
    whole = [r for r in results if train_share(r) == 1.0]
    curve = [r for r in results if train_share(r) != 1.0]  # kept out of the matrix
    if not whole:
        raise JobError(
            f"{runs_dir}: only learning-curve runs (data.split.train_share < 1); the tables "
            "compare runs on the whole training split: add a label at train_share 1"
        )
    pipelines = post_training_variants(runs_dir, postprocess)
    return Dataset(runs_dir, data, hospitals, commands, whole, pipelines, postprocess, curve)


def split_design(data: DictConfig) -> dict[str, Any]:
    """A label's ``data.split`` without the fold and the training share, as it draws images.

    The fold and the share differ between a label's runs and between a learning curve's
    labels by design. Cross-validation ignores the fractions, and a label written before
    ``folds`` existed split by the fractions (``folds: null``).
    """
    split = OmegaConf.to_container(data.split, resolve=True)
    design = {key: value for key, value in split.items() if key not in ("fold", "train_share")}
    design.setdefault("folds", None)
    if design["folds"] is not None:
        design.pop("fractions", None)
    return design


def shared_hospitals(runs_dir: Path, results: Sequence[dict[str, Any]]) -> list[str]:
    """The hospitals every run was scored at: the columns of every table.

    Labels run at different hospitals (one left out with ``~data.hospitals.<name>``) would lose
    a column or leave one blank unseen, so they are refused.

    Raises
    ------
    JobError
        Naming two labels and their hospitals.
    """
    by_hospitals: dict[frozenset[str], dict[str, Any]] = {}
    for result in results:
        by_hospitals.setdefault(frozenset(result["hospitals"]), result)
    if len(by_hospitals) > 1:
        first, second = (
            f"{r['label']} ({', '.join(r['hospitals'])})" for r in list(by_hospitals.values())[:2]
        )
        raise JobError(
            f"{runs_dir}: labels {first} and {second} ran at different hospitals; "
            "report them from separate runs dirs"
        )
    return list(results[0]["hospitals"])


def check_one_label_per_hospital_row(runs_dir: Path, results: Sequence[dict[str, Any]]) -> None:
    """Refuse two labels of a regime whose rows are named by hospital, at one training share.

    Both name their rows ``local_only (hospital_a)``: the matrix, or the learning curve at a
    share, would pool them into one row or keep one of them unseen.

    Raises
    ------
    JobError
        Naming the labels, the regime and the share.
    """
    labels: dict[tuple[str, float], set[str]] = {}
    for result in results:
        labels.setdefault((result["regime"], train_share(result)), set()).add(result["label"])
    for (regime, share), names in sorted(labels.items()):
        if regime in BY_HOSPITAL and len(names) > 1:
            at = "" if share == 1.0 else f" at data.split.train_share={share:g}"
            raise JobError(
                f"{runs_dir}: labels {', '.join(sorted(names))} all ran regime={regime}{at}, "
                "whose rows are named and paired by hospital; report them from separate runs dirs"
            )


def post_training_variants(runs_dir: Path, postprocess: dict[str, list[str]]) -> int:
    """How many post-training configs one chain was run with (1 unless defaults changed).

    The job runs with its defaults, which may be improved between two ``w3s-experiment`` calls;
    rows scored with different pipelines are not comparable, and the report says so. Labels
    given other ``postprocess=[...]`` overrides (``postprocess``, by label) are another chain
    on purpose: their configs are compared with their own chain's only.
    """
    variants = set()
    paths = (p for g in RUN_GLOBS for p in runs_dir.glob(f"*/{g}/eval/*/*/config.yaml"))
    for path in paths:
        chain = sorted(postprocess.get(path.relative_to(runs_dir).parts[0], []))
        cfg = OmegaConf.to_container(OmegaConf.load(path))
        for key in ("checkpoint", "hospital", "output_dir", "seed"):
            cfg.pop(key, None)
        # Each fold is its own test; a learning curve's share is the variable it measures.
        split = cfg.get("data", {}).get("split", {})
        for key in ("fold", "train_share"):
            split.pop(key, None)
        variants.add((tuple(chain), json.dumps(cfg, sort_keys=True)))
    chains = [chain for chain, _ in variants]
    return max((chains.count(chain) for chain in chains), default=1)


def matrix_table(
    ds: Dataset, stage: str, with_baselines: bool, metrics: Sequence[str] = METRICS
) -> str:
    """Markdown matrix: one row per regime row, the ``metrics`` joined by ``/`` per test split.

    A row with no score is left out, and ``runs`` counts the scores the means stand on: runs
    made before a stage recorded a metric have none of it.
    """
    head = "| trained as \\ test split | " + " | ".join(ds.hospitals) + " | runs |"
    lines = [head, "|---" * (len(ds.hospitals) + 2) + "|"]
    for row in ds.rows():
        scored = [[ds.values(row, h, stage, m) for m in metrics] for h in ds.hospitals]
        runs = max(mean_sd(values)[2] for by_metric in scored for values in by_metric)
        if runs == 0:
            continue
        cells = [" / ".join(map(fmt_percent, by_metric)) for by_metric in scored]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {runs} |")
    if with_baselines:
        for key, title in BASELINE_TITLES.items():
            cells = [
                " / ".join(fmt_percent(ds.baseline_values(h, key, m)) for m in METRICS)
                for h in ds.hospitals
            ]
            lines.append(f"| baseline: {title} (no training) | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def cell_type_parts(ds: Dataset) -> list[str]:
    """The segmenter's cell-type matrix, when any run recorded it (older runs did not).

    Only the segmenter names each cell's type itself; the other stages and the baselines are
    given each image's label, so they have no row of their own here.
    """
    table = matrix_table(ds, SEGMENTER, with_baselines=False, metrics=("cell_type",))
    if len(table.splitlines()) == 2:
        return []
    return [
        "### Cell types: segmenter (share of the test cells whose type most of its cell pixels "
        "name rightly, %, mean ± SD)",
        table,
    ]


def _mean(ds: Dataset, row: str, column: str, metric: str, stage: str = SEGMENTER) -> float:
    return mean_sd(ds.values(row, column, stage, metric))[0]


def trained_at(row: str) -> str:
    """``local_only (hospital_a)`` -> ``hospital_a``."""
    return row.split("(")[-1].rstrip(")")


def summary(ds: Dataset, fed: str, local: Sequence[str]) -> str:
    """How often a federated row beat local-only, in-domain and across domains, per metric.

    Each comparison is on the runs both rows have; a win counts as clear when the means differ
    by more than the larger of the two SDs.
    """
    parts = []
    for metric in METRICS:
        tallies = {True: [0, 0, 0], False: [0, 0, 0]}  # in-domain?: [wins, clear wins, pairs]
        for column in ds.hospitals:
            for row in local:
                (fed_mean, fed_sd, n), (mean, sd, _) = ds.on_shared_runs([fed, row], column, metric)
                if n == 0:
                    continue
                tally = tallies[trained_at(row) == column]
                tally[0] += fed_mean > mean
                tally[1] += fed_mean - mean > max(fed_sd, sd)
                tally[2] += 1
        here, elsewhere = tallies[True], tallies[False]
        parts.append(
            f"{metric.replace('_', '-')} mIoU: beat the local-only model trained at the test "
            f"hospital on {here[0]} of {here[2]} test splits ({here[1]} by more than one SD), "
            f"and local-only models trained at another hospital in {elsewhere[0]} of "
            f"{elsewhere[2]} comparisons ({elsewhere[1]} by more than one SD)"
        )
    return f"- **{fed}, in short:** " + "; ".join(parts) + "."


def shared_runs(n: int) -> str:
    """``1 shared run`` / ``3 shared runs``: how many runs a comparison stands on."""
    return f"{n} shared run{'' if n == 1 else 's'}"


def verdicts(ds: Dataset) -> list[str]:
    """Plain sentences: did federated beat local-only per test split; the supervised gap.

    Every comparison is on the (fold, seed) runs both rows have (:meth:`Dataset.on_shared_runs`).
    """
    rows = ds.rows()
    federated = [r for r in rows if ds.regime_of(r) in FEDERATED]
    local = {r: trained_at(r) for r in rows if ds.regime_of(r) == "local_only"}
    lines = [summary(ds, fed, list(local)) for fed in federated] if local else []
    for column in ds.hospitals:
        for fed in federated:
            for metric in METRICS:
                parts = []
                for row, home in local.items():
                    (fed_mean, fed_sd, n), (mean, sd, _) = ds.on_shared_runs(
                        [fed, row], column, metric
                    )
                    if n == 0:
                        continue
                    where = "here" if home == column else f"at {home}"
                    verdict = "beat" if fed_mean > mean else "did NOT beat"
                    noise = ", within one SD" if abs(fed_mean - mean) < max(fed_sd, sd) else ""
                    parts.append(
                        f"{verdict} local-only trained {where} ({100 * fed_mean:.1f} vs "
                        f"{100 * mean:.1f} on {shared_runs(n)}{noise})"
                    )
                if parts:
                    lines.append(
                        f"- **{column} test, {metric.replace('_', '-')} mIoU:** {fed} "
                        + "; ".join(parts)
                        + "."
                    )
    ceiling = {trained_at(r): r for r in rows if ds.regime_of(r) == "supervised"}
    for column in ds.hospitals:
        if column in ceiling:
            lines.append(ceiling_line(ds, ceiling[column], column))
            lines += [weak_to_ceiling(ds, fed, ceiling[column], column) for fed in federated]
    return lines


def ceiling_line(ds: Dataset, row: str, column: str) -> str:
    """Whether the ceiling is one: its scores against the baselines, and its training loss.

    A segmenter trained on true masks that loses to a centred disk measures its own training
    budget, not the weak labels' cost; the line says so instead of reporting gaps against it.
    """
    folds = {
        run_key(r)[0]
        for r in ds.results
        if any(x["row"] == row and column in x["cells"] for x in r["rows"])
    }
    parts = []
    for metric in METRICS:
        top = _mean(ds, row, column, metric)
        beaten = []
        for key, title in BASELINE_TITLES.items():
            base, _, n = mean_sd(ds.baseline_values(column, key, metric, folds))
            if n:
                word = "beats" if top > base else "does NOT beat"
                beaten.append(f"{word} {title} ({100 * base:.1f})")
        parts.append(f"{metric.replace('_', '-')} {100 * top:.1f}: " + ", ".join(beaten))
    losses = [x.get("train_loss") for r in ds.results for x in r["rows"] if x["row"] == row]
    loss, _, n = mean_sd(losses)
    fitted = f"; final training loss {loss:.3f}" if n else ""
    return (
        f"- **Ceiling, {column} test:** {row}, "
        + "; ".join(parts)
        + fitted
        + " (the baselines' class-aware scores give the cell the image's true label; the "
        "segmenter has to find the class itself)."
    )


def weak_to_ceiling(ds: Dataset, fed: str, ceiling: str, column: str) -> str:
    """The weakly supervised segmenter's scores as a share of the ceiling's, on shared runs."""
    gaps = []
    for metric in METRICS:
        (weak, _, n), (top, _, _) = ds.on_shared_runs([fed, ceiling], column, metric)
        gaps.append(
            "no shared runs"
            if n == 0
            else f"{metric.replace('_', '-')} {100 * weak:.1f} vs {100 * top:.1f} "
            f"({weak / top:.0%} of the ceiling, {shared_runs(n)})"
        )
    return f"  - {fed} (weak labels): " + "; ".join(gaps) + "."


@dataclass(frozen=True)
class Paired:
    """Mean of paired differences and its Student t confidence interval (nan below 2 pairs)."""

    n: int
    mean: float
    low: float
    high: float

    identical: bool = False

    def verdict(self, better: str) -> str:
        """The interval read as one sentence: which side of zero, if any, it lies on."""
        if self.identical:
            return "identical in every pair: this stage did not depend on the model"
        if self.n < 2:
            return "too few pairs for an interval"
        if self.low > 0:
            return f"{better} better"
        if self.high < 0:
            return f"{better} worse"
        return "no detectable difference at this scale"


def paired_difference(differences: Sequence[float], confidence: float = CONFIDENCE) -> Paired:
    """Mean of ``differences`` with its two-sided Student t interval.

    Pairing by (fold, seed) removes what two regimes share (the split, the seed's draws), so the
    interval is about the regimes, not about which fold happened to be easy.
    """
    n = len(differences)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan)
    mean = float(np.mean(differences))
    if n < 2:
        return Paired(n, mean, math.nan, math.nan)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * np.std(differences, ddof=1) / math.sqrt(n)
    identical = all(d == 0 for d in differences)
    return Paired(n, mean, mean - float(half), mean + float(half), identical)


def paired_units(
    ours: dict[tuple[int, int], float], theirs: dict[tuple[int, int], float]
) -> list[float]:
    """The differences a paired interval takes: one per fold, or one per seed of one split.

    The seeds of a fold share its test images and its training split, so they are not
    independent pairs: counting each would narrow the interval by the number of seeds. With
    several folds, a fold's seeds are averaged into one difference; on one split (the fixed
    one) the seeds are the units, and the interval is about training draws on that test set.
    """
    by_fold: dict[int, list[float]] = {}
    for key in sorted(ours.keys() & theirs.keys()):
        by_fold.setdefault(key[0], []).append(ours[key] - theirs[key])
    if len(by_fold) == 1:
        return next(iter(by_fold.values()))
    return [float(np.mean(differences)) for differences in by_fold.values()]


def paired_table(ds: Dataset) -> str | None:
    """Each shared regime minus local-only at each hospital's test split, paired by fold.

    The local-only model is the one trained at that hospital: the question a hospital asks is
    whether joining the federation (or pooling, or personalizing) beats training alone on its
    own data. The maps are the
    model's own output; the segmenter is what a hospital keeps, and where the post-training
    pipeline leans on colour and the centred-cell prior it may not depend on the model at all,
    which the verdict then says. ``None`` without any pair.
    """
    rows = ds.rows()
    local = {trained_at(r): r for r in rows if ds.regime_of(r) == "local_only"}
    shared = [r for r in rows if ds.regime_of(r) in PAIRED]
    lines = [
        "| row | test split | stage | metric | pairs | mean difference (points) "
        f"| {100 * CONFIDENCE:.0f}% CI (points) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in shared:
        for column in (h for h in ds.hospitals if h in local):
            for stage in (MAPS, SEGMENTER):
                for metric in METRICS:
                    paired = paired_difference(
                        paired_units(
                            ds.cells_by_run(row, column, metric, stage),
                            ds.cells_by_run(local[column], column, metric, stage),
                        )
                    )
                    if paired.n == 0:
                        continue
                    interval = (
                        "-"
                        if paired.n < 2
                        else f"[{100 * paired.low:+.1f}, {100 * paired.high:+.1f}]"
                    )
                    lines.append(
                        f"| {row} | {column} | {stage} | {metric.replace('_', '-')} | {paired.n} "
                        f"| {100 * paired.mean:+.1f} | {interval} | {paired.verdict(row)} |"
                    )
    return "\n".join(lines) if len(lines) > 2 else None


def rows_by_curve_key(ds: Dataset) -> dict[str, list[str]]:
    """Rows by what they are across shares: the regime, or the row for those named by hospital.

    Local-only and the ceiling have a row per hospital. A shared model's row is named by its
    label (``fedavg_share25``), which differs per share.
    """
    out: dict[str, list[str]] = {}
    for row in ds.rows():
        regime = ds.regime_of(row)
        out.setdefault(row if regime in BY_HOSPITAL else regime, []).append(row)
    return out


def learning_curve_table(ds: Dataset) -> str | None:
    """Segmenter binary mIoU per training share, on the folds and seeds the curve ran.

    A local-only row (and the ceiling) is scored at its own hospital's test split (the
    question is what more of a hospital's own images buys it), a shared model at every
    hospital's. Every column of a row, the full share's too, takes only the (fold, seed) runs
    that the row has at every share, so a row's columns test the same images. A share with
    several rows of one regime (two labels) is left blank rather than guessed. ``None``
    without curve runs.
    """
    if not ds.curve:
        return None
    shares = sorted({train_share(r) for r in ds.curve} | {1.0})
    by_share = {share: ds.at_share(share) for share in shares}
    named = {share: rows_by_curve_key(sub) for share, sub in by_share.items()}
    lines = [
        "| row | test split | " + " | ".join(f"share {s:g}" for s in shares) + " |",
        "|---|---|" + "---|" * len(shares),
    ]
    for key in dict.fromkeys(k for rows in named.values() for k in rows):
        for column in ds.hospitals if key in PAIRED else [trained_at(key)]:
            scores = []
            for share in shares:
                rows = named[share].get(key, [])
                scores.append(
                    by_share[share].cells_by_run(rows[0], column, "binary")
                    if len(rows) == 1
                    else {}
                )
            # A blank share takes no part.
            shared = iter(on_shared_keys([by_run for by_run in scores if by_run]))
            cells = []
            for by_run in scores:
                mean, sd, n = next(shared) if by_run else mean_sd(())
                cells.append("-" if n == 0 else f"{100 * mean:.1f} ± {100 * sd:.1f} ({n})")
            lines.append(f"| {key} | {column} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_curve_parts(ds: Dataset) -> list[str]:
    """The learning-curve subsection: the curve, then each shared regime − local-only per share."""
    table = learning_curve_table(ds)
    if table is None:
        return []
    parts = [
        "### Learning curve: segmenter binary mIoU (%, mean ± SD (runs)) when each hospital "
        "trains on a share of its training split (`data.split.train_share`; validation and test "
        "stay whole, smaller shares are subsets of larger ones; every share on the folds and seeds "
        "the curve ran)",
        table,
    ]
    for share in sorted({train_share(r) for r in ds.curve}):
        if paired := paired_table(ds.at_share(share)):
            parts += [f"Paired at share {share:g} (as above: regime − local-only):", paired]
    return parts


def fmt_duration(seconds: float) -> str:
    """``1.5 h`` / ``12 min``: compute spent, at the precision a reader plans with."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def post_training_line(ds: Dataset) -> str:
    """Which post-training chain scored which labels: a section's rows compare only within one."""
    chains: dict[str, list[str]] = {}
    for label, overrides in sorted(ds.postprocess.items()):
        chain = " ".join(f"`{o}`" for o in overrides) or "the defaults"
        chains.setdefault(chain, []).append(label)
    return (
        "Post-training (`w3s-postprocess`): "
        + "; ".join(f"{chain} for {', '.join(labels)}" for chain, labels in chains.items())
        + "."
    )


def compute_line(ds: Dataset) -> str:
    """Total wall time of all runs (learning curve included) and how many runs each label has."""
    every = [*ds.results, *ds.curve]
    per_label = []
    for label in sorted({r["label"] for r in every}):
        runs = [r for r in every if r["label"] == label]
        spent = sum(float(r.get("seconds") or 0) for r in runs)
        per_label.append(f"{label}: {len(runs)} runs ({fmt_duration(spent)})")
    total = sum(float(r.get("seconds") or 0) for r in every)
    return (
        f"Compute: {len(every)} runs, {fmt_duration(total)} of wall time in total "
        f"(training and scoring, as recorded in each results.json); " + "; ".join(per_label) + "."
    )


def plot_matrix(ds: Dataset, path: Path) -> None:
    """Heatmaps of the segmenter's mean test mIoU, class-aware and binary, annotated ± SD."""
    rows = [r for r in ds.rows() if any(ds.values(r, h, SEGMENTER, "binary") for h in ds.hospitals)]
    # The object-oriented API (no pyplot): no GUI backend, no global figure state.
    fig = Figure(figsize=(4 + 2.2 * len(ds.hospitals), 1.2 + 0.45 * len(rows)))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, METRICS, strict=True):
        stats = [[mean_sd(ds.values(r, h, SEGMENTER, metric)) for h in ds.hospitals] for r in rows]
        means = np.array([[100 * s[0] for s in line] for line in stats])
        ax.imshow(means, cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for i, line in enumerate(stats):
            for j, (mean, sd, _) in enumerate(line):
                text = "-" if math.isnan(mean) else f"{100 * mean:.1f}±{100 * sd:.1f}"
                ax.text(j, i, text, ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(ds.hospitals)), ds.hospitals, fontsize=8)
        ax.set_yticks(range(len(rows)), rows if metric == METRICS[0] else [""] * len(rows))
        ax.set_title(f"segmenter, {metric.replace('_', '-')} mIoU (test, %)", fontsize=9)
        ax.set_xlabel("test split of")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def round_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-round rows of a federated seed's ``metrics.jsonl`` (empty for other regimes)."""
    if not result.get("metrics_jsonl"):
        return []
    path = Path(result["dir"]) / result["metrics_jsonl"]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def phase_rounds(runs: Sequence[Sequence[dict[str, Any]]]) -> str:
    """The rounds of each phase, the most any run trained: ``20 pretraining + 10 MCT``."""
    counts = {
        phase: max(sum(phase_of(r) == phase for r in rows) for rows in runs) for phase in PHASES
    }
    return " + ".join(f"{n} {PHASE_TITLES[phase]}" for phase, n in counts.items() if n)


def trained_rounds(ds: Dataset, label: str) -> list[list[dict[str, Any]]]:
    """The round rows of each run of ``label`` that trained.

    A run that reused another label's model has none, and would count as zero rounds and bytes.
    """
    return [rows for rows in map(round_rows, ds.runs(label)) if rows]


def federated_labels(ds: Dataset) -> list[str]:
    """Labels whose runs went through Flower (they have metrics.jsonl)."""
    return sorted({r["label"] for r in ds.results if r.get("metrics_jsonl")})


def plot_convergence(ds: Dataset, path: Path) -> bool:
    """Write the convergence figure; ``False`` (nothing written) without federated runs."""
    labels = [label for label in federated_labels(ds) if ds.regime_of_label(label) in FEDERATED]
    if not labels:
        return False
    convergence_figure(ds, labels).savefig(path, dpi=110)
    return True


def convergence_figure(ds: Dataset, labels: Sequence[str]) -> Figure:
    """Validation localization mIoU per MCT round and hospital (Fig. 4), mean ± SD over runs.

    The pretraining rounds before them learn another task (no class labels) and number their
    rounds from 1 too, so their rows are left out: the x axis is the MCT round. Each label gets
    its own colour and line style (legible in grey print), SD bands are faint and drawn under
    every line, and every subplot has its legend so none is read by guessing.
    """
    fig = Figure(figsize=(3.6 * len(ds.hospitals), 3.2))
    axes = fig.subplots(1, len(ds.hospitals), squeeze=False)
    for ax, hospital in zip(axes[0], ds.hospitals, strict=True):
        for index, label in enumerate(labels):
            curves = [
                [
                    row["hospitals"].get(hospital, {}).get("val-loc-miou", math.nan)
                    for row in rows
                    if phase_of(row) == "mct"
                ]
                for rows in trained_rounds(ds, label)
            ]
            length = min(len(c) for c in curves)
            values = np.array([c[:length] for c in curves], dtype=float)
            mean = 100 * values.mean(axis=0)
            sd = 100 * (values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(length))
            x = np.arange(1, length + 1)
            colour, (line, marker) = f"C{index % 10}", LINE_STYLES[index % len(LINE_STYLES)]
            ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.15, zorder=1)
            ax.plot(
                x,
                mean,
                color=colour,
                linestyle=line,
                marker=marker,
                markersize=3,
                label=label,
                zorder=3,
            )
        ax.set_title(f"{hospital} (validation)", fontsize=9)
        ax.set_xlabel("MCT round")
        ax.grid(alpha=0.3, zorder=0)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("localization mIoU (%)")
    fig.tight_layout()
    return fig


def communication_table(ds: Dataset) -> str:
    """Bytes per hospital and round (mean over rounds and runs) and the final mIoU effect.

    Both phases ship weights, so the bytes cover the pretraining rounds as well as the MCT
    rounds, and the rounds column counts each phase apart.
    """
    lines = [
        "| run | hospital | sent per round (MB) | received per round (MB) "
        "| total over the run (MB) | rounds "
        "| segmenter mIoU at this hospital (class-aware / binary) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label in federated_labels(ds):
        row_name = next(x["row"] for r in ds.runs(label) for x in r["rows"])
        runs = trained_rounds(ds, label)  # read once, not once per hospital
        for hospital in ds.hospitals:
            sent, received, totals = [], [], []
            for rows in runs:
                per_round = [r["hospitals"].get(hospital, {}) for r in rows]
                sent += [h.get("bytes-sent", math.nan) for h in per_round]
                received += [h.get("bytes-received", math.nan) for h in per_round]
                totals.append(
                    sum(h.get("bytes-sent", 0) + h.get("bytes-received", 0) for h in per_round)
                )
            score = " / ".join(
                fmt_percent(ds.values(row_name, hospital, SEGMENTER, m)) for m in METRICS
            )
            lines.append(
                f"| {label} | {hospital} | {np.nanmean(sent) / MB:.3f} "
                f"| {np.nanmean(received) / MB:.3f} | {np.mean(totals) / MB:.2f} "
                f"| {phase_rounds(runs)} | {score} |"
            )
    return "\n".join(lines)


def short_title(row: str) -> str:
    """Column title that fits a tile: ``local_only (hospital_a)`` -> ``local hospital_a``."""
    short = row.replace("local_only", "local").replace("supervised", "superv.")
    return short.replace("(", "").replace(")", "")[:20]


def plot_overlays(ds: Dataset, path: Path) -> None:
    """Per hospital, its first test images: image, ground truth, each row's prediction.

    All tiles come from the first (fold, seed): its test split is the one the images are from.
    """
    first = min(map(run_key, ds.results))
    seed_dirs = {
        x["row"]: Path(r["dir"]) / "eval" / x["folder"]
        for r in ds.results
        if run_key(r) == first
        for x in r["rows"]
    }
    rows_order = [r for r in ds.rows() if r in seed_dirs]
    data = OmegaConf.merge(ds.data, {"split": {"fold": first[0]}}) if first[0] >= 0 else ds.data
    grid = []
    for hospital in ds.hospitals:
        test = hospital_split(data, hospital, "test")
        truths = None if test.masks is None else true_labels(test)  # a hospital without masks
        stems = sample_stems(test.sample_ids)
        for i in range(min(GRID_IMAGES, len(test))):
            image, stem = test.images[i], stems[i]
            tiles = [image, image * 0 if truths is None else overlay(image, truths[i])]
            for row in rows_order:
                png = seed_dirs[row] / hospital / "predictions" / "test" / f"{stem}.png"
                predicted = np.asarray(Image.open(png)) if png.exists() else None
                tiles.append(image * 0 if predicted is None else overlay(image, predicted))
            grid.append(tiles)
    save_grid(path, grid, ["image", "truth", *map(short_title, rows_order)], tile=112)


def dataset_section(ds: Dataset, figures: Path, output: Path, stem: str, staging: Path) -> str:
    """The markdown section of one dataset, with its figures ``<stem>_*.png`` under ``figures``.

    The figures are drawn into ``staging``, which takes their place in ``figures`` only once
    the whole report is made.
    """
    rel = Path(os.path.relpath(figures, output.parent))
    matrix_png, curves_png, grid_png = (
        staging / f"{stem}_{kind}.png" for kind in ("matrix", "convergence", "overlays")
    )
    plot_matrix(ds, matrix_png)
    has_curves = plot_convergence(ds, curves_png)
    plot_overlays(ds, grid_png)
    seeds = sorted({r["seed"] for r in ds.results})
    folds = sorted({r["fold"] for r in ds.results if r.get("fold") is not None})
    first_fold, first_seed = min(map(run_key, ds.results))
    crossed = f"; folds {folds} of a {ds.data.split.folds}-fold cross-validation" if folds else ""
    paired = paired_table(ds)
    parts = [
        f"## Dataset `{ds.name}` ({len(ds.hospitals)} hospitals: {', '.join(ds.hospitals)})"
        + (f": runs `{ds.runs_dir.name}`" if stem != ds.name else ""),
        f"Seeds {seeds}{crossed}; runs in `{ds.runs_dir}`. {post_training_line(ds)} "
        f"{compute_line(ds)} Commands:",
        *(
            [
                f"**Warning:** rows of one post-training chain were scored with {ds.pipelines} "
                "different configs (the job's defaults changed between runs): rerun the regimes "
                "to compare them."
            ]
            if ds.pipelines > 1
            else []
        ),
        "```bash\n" + "\n".join(ds.commands) + "\n```",
        "### Verdicts (segmenter, test splits, mean over runs, %)",
        "\n".join(verdicts(ds)) or "No federated and local-only rows to compare.",
        *(
            [
                "### Paired: each regime − local-only trained at the test hospital (maps and "
                f"segmenter, same fold and seed, {100 * CONFIDENCE:.0f}% Student t interval, "
                "points of mIoU; a pair per fold, its seeds averaged, as they share its test "
                "images; on the fixed split a pair per seed)",
                paired,
            ]
            if paired
            else []
        ),
        *learning_curve_parts(ds),
        "### Matrix: segmenter (class-aware / binary mIoU on each test split, %, mean ± SD)",
        matrix_table(ds, SEGMENTER, with_baselines=True),
        f"![segmenter matrix]({rel / matrix_png.name})",
        *cell_type_parts(ds),
        "### Matrix: pseudo-masks (class-aware / binary mIoU, %, mean ± SD)",
        matrix_table(ds, PSEUDO_MASKS, with_baselines=False),
    ]
    if has_curves:
        parts += [
            "### Convergence: validation localization mIoU per MCT round (server's metrics.jsonl)",
            f"![convergence]({rel / curves_png.name})",
        ]
    parts += [
        "### Communication (array bytes per message, train and evaluate, per hospital; per "
        "round: the mean over the rounds of every phase)",
        communication_table(ds),
        f"### Overlays (seed {first_seed}{f', fold {first_fold}' if first_fold >= 0 else ''}; "
        f"{GRID_IMAGES} test images per hospital, top to bottom "
        f"{', '.join(ds.hospitals)}; each prediction is that row's segmenter at that hospital)",
        f"![overlays]({rel / grid_png.name})",
    ]
    return "\n\n".join(parts)


def write_report(runs_dirs: Sequence[Path], output: Path, figures: Path, notes: Path | None) -> str:
    """Regenerate ``output`` and its figures from the runs; return its text.

    A report that fails part-way (a run's files removed since it finished) leaves the earlier
    report and its figures as they were, never new figures beside old text.
    """
    datasets = [load_dataset(d) for d in runs_dirs]
    names = [ds.name for ds in datasets]
    # Two comparisons on one dataset (e.g. two post-training chains) keep their own figures,
    # numbered where their runs dirs share a folder name too (old/runs, new/runs).
    stems = [
        ds.name if names.count(ds.name) == 1 else f"{ds.name}_{d.name}"
        for ds, d in zip(datasets, runs_dirs, strict=True)
    ]
    stems = [stem if stems.count(stem) == 1 else f"{stem}_{i + 1}" for i, stem in enumerate(stems)]
    with staged_outputs(figures, owned=()) as staging:
        sections = [
            dataset_section(ds, figures, output, stem, staging)
            for ds, stem in zip(datasets, stems, strict=True)
        ]
        text = report_text(runs_dirs, output, figures, notes, sections)
        write_text_atomically(output, text)
    return text


def report_text(
    runs_dirs: Sequence[Path],
    output: Path,
    figures: Path,
    notes: Path | None,
    sections: Sequence[str],
) -> str:
    """The whole markdown: how it was made, what its tables hold, then one section per dataset."""
    head = [
        "# Experiments: local-only vs centralized vs FedAvg vs FedProx vs personalized",
        "Generated by `w3s-report runs=["
        + ",".join(str(d) for d in runs_dirs)
        + f"] output={output.name} figures={os.path.relpath(figures, output.parent)}"
        + (f" notes={os.path.relpath(notes, output.parent)}" if notes else "")
        + "`; every number below is read from the runs. Rows: how the MCT model was trained "
        "(`local_only (X)`: at hospital X alone; `supervised (X)`: the ceiling, a segmenter "
        "trained on X's true masks). Columns: the test split of each hospital, where the "
        "post-training job (maps -> pseudo-masks -> segmenter, `w3s-postprocess` with the "
        "overrides each section names) ran with that model. Cells: class-aware / binary mIoU "
        "in %, mean ± sample SD over runs (seeds, times folds when cross-validated); a "
        "baseline's over test splits (folds), which it alone depends on.",
    ]
    if notes is not None:
        head.append(notes.read_text(encoding="utf-8").strip())
    return "\n\n".join([*head, *sections]) + "\n"


def _write(cfg: DictConfig, _: list[str]) -> None:
    runs = [Path(str(d)) for d in cfg.runs]
    missing = [str(d) for d in runs if not d.is_dir()]
    if missing:
        raise JobError(f"runs: no such folder {', '.join(missing)}")
    output, figures = Path(str(cfg.output)).resolve(), Path(str(cfg.figures)).resolve()
    notes = Path(str(cfg.notes)).resolve() if cfg.notes else None
    write_report(runs, output, figures, notes)
    log.info("wrote %s and figures in %s", output, figures)


COMMAND = Command(
    name="w3s-report",
    summary=__doc__,
    config="w3s_report",
    job=_write,
    keys={
        "runs": "the runs_dir of each w3s-experiment comparison, e.g. [runs/synthetic,runs/wbc]",
        "output": "the markdown file to write (default: EXPERIMENTS.md)",
        "figures": "folder of its PNG figures (default: docs/experiments)",
        "notes": "a markdown file put after the introduction",
    },
    examples=["w3s-report runs=[runs/synthetic,runs/wbc] output=EXPERIMENTS.md"],
)


def main(argv: list[str] | None = None) -> int:
    """Console script ``w3s-report``."""
    return COMMAND.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
