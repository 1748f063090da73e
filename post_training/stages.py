"""The stages of the post-training job, each scored by the same evaluation.

Maps -> seeds, pseudo-masks, segmenter, and the two training-free baselines. Parameters are only
ever chosen on the validation split; scores are reported on validation and test.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from common.checkpoint import save_atomic
from common.data import HospitalData, hospital_split
from common.data.splits import SPLITS
from common.localization import MapSettings, generate_maps, maps_orientation, save_maps
from common.metrics import (
    IGNORE_INDEX,
    AbsentPolicy,
    SegmentationScores,
    SelectBy,
    class_aware_truths,
    score_label_maps,
    select_on_validation,
)
from common.model import MCTFormerV2
from common.progress import Profile
from common.pseudo import (
    MCT_BACKGROUND,
    METHODS,
    Background,
    MapRecord,
    PseudoMasker,
    ThresholdMasker,
    argmax_labels,
    best_class,
    create_masker,
    labels_above,
    stack_background,
)
from common.segmenter import (
    Decoding,
    create_segmenter,
    predict,
    segmenter_payload,
    train_segmenter,
)
from post_training.artifacts import sample_stems, save_label_png, save_overlay
from post_training.baselines import STAIN_CHANNELS, disk_mask, label_cells, otsu_mask

log = logging.getLogger(__name__)

EVALUATED = ("val", "test")

# Stage keys: what metrics.json, the ablation table and the experiment matrix look stages up
# by. Titles (with the method's name) are for people and may change freely.
MAPS, PSEUDO_MASKS, SEGMENTER, DISK, OTSU = "maps", "pseudo_masks", "segmenter", "disk", "otsu"
BASELINES = (DISK, OTSU)


@dataclass
class Split:
    """One split of the hospital and its maps.

    Attributes
    ----------
    data
        Images, labels and (when the hospital has them) ground-truth masks.
    stems
        File-name stems of the images' outputs.
    truth
        Class-aware ground truth (0 background, label + 1 for the cell), or ``None``.
    records
        The images' maps, what pseudo-mask methods consume.
    """

    data: HospitalData
    stems: list[str]
    truth: list[np.ndarray] | None
    records: list[MapRecord]


@dataclass
class Stage:
    """One row of the metrics table: a stage's key and title, choice, scores and time."""

    key: str
    title: str
    choice: dict[str, Any]
    scores: dict[str, SegmentationScores]
    seconds: float
    # Seconds of the stage's parts, for the job's profile (e.g. training and predictions).
    parts: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "key": self.key,
            "title": self.title,
            "choice": self.choice,
            **{split: scores.to_dict() for split, scores in self.scores.items()},
            "seconds": round(self.seconds, 2),
        }


def headline_scores(split: Mapping[str, Any]) -> dict[str, float | None]:
    """One split of a stage in ``metrics.json``, under the short keys the experiment tables use.

    ``class_aware`` and ``binary`` mIoU, and ``cell_type`` where the stage names the cell
    types itself (the segmenter): the other keys stay in ``metrics.json``.
    """
    scores = {"class_aware": split["class_aware_miou"], "binary": split["binary_miou"]}
    if "cell_type_accuracy" in split:
        scores["cell_type"] = split["cell_type_accuracy"]
    return scores


def check_evaluation_settings(cfg: Mapping[str, Any]) -> None:
    """Refuse ``evaluation`` values the scoring would fail on, naming the key and value.

    The baselines are scored last: an empty ``disk_radii`` or a mistyped Otsu channel found
    there, as a traceback, cost the maps, the fine-tune and the segmenter before it.

    Raises
    ------
    ValueError
        ``evaluation.<key>=<value>: ...``.
    """
    for key, known in (("absent", get_args(AbsentPolicy)), ("select_by", get_args(SelectBy))):
        if cfg[key] not in known:
            raise ValueError(f"evaluation.{key}={cfg[key]}: expected one of {', '.join(known)}")
    for key, top in (("thresholds", 1.0), ("disk_radii", math.inf)):
        values = list(cfg[key])
        if not values or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= top for v in values
        ):
            within = "in (0, 1]" if top == 1.0 else "> 0"
            raise ValueError(f"evaluation.{key}={_listed(values)}: expected numbers {within}")
    channels = list(cfg["otsu_channels"])
    if not channels or not set(channels) <= set(STAIN_CHANNELS):
        raise ValueError(
            f"evaluation.otsu_channels={_listed(channels)}: expected some of "
            f"{', '.join(STAIN_CHANNELS)}"
        )


def _listed(values: Sequence[Any]) -> str:
    """A list as an override writes it: ``[a,b]``."""
    return f"[{','.join(map(str, values))}]"


class Evaluation:
    """Scores label maps of the evaluated splits and picks parameters on validation.

    Parameters
    ----------
    splits
        All splits of the hospital.
    num_labels
        Background + C.
    cfg
        The ``evaluation`` config node.
    """

    def __init__(
        self, splits: Mapping[str, Split], num_labels: int, cfg: Mapping[str, Any]
    ) -> None:
        self.splits = splits
        self.num_labels = num_labels
        self.absent = cfg["absent"]
        self.select_by = cfg["select_by"]
        self.cfg = cfg

    @property
    def has_truth(self) -> bool:
        """Whether the hospital has ground-truth masks (else nothing is scored)."""
        return self.splits["val"].truth is not None

    def score(
        self, labels: Mapping[str, Sequence[np.ndarray]], cell_types: bool = False
    ) -> dict[str, SegmentationScores]:
        """Class-aware and binary mIoU of label maps on every evaluated split.

        ``cell_types``: the maps name each cell's type themselves (the segmenter's), so their
        cell-type accuracy is scored too; the other stages copy the image's label.
        """
        if not self.has_truth:
            return {}
        return {
            split: score_label_maps(
                labels[split],
                self.splits[split].truth or [],
                self.num_labels,
                self.absent,
                cell_types=cell_types,
            )
            for split in EVALUATED
        }

    def select(
        self, candidates: Sequence[Any], predict_val: Callable[[Any], Sequence[np.ndarray]]
    ) -> Any:
        """The candidate with the best validation mIoU (see ``select_on_validation``)."""
        return select_on_validation(
            candidates,
            predict_val,
            self.splits["val"].truth or [],
            self.num_labels,
            absent=self.absent,
            select_by=self.select_by,
        )[0]


def make_maps(
    model: MCTFormerV2, cfg: DictConfig, hospital: str, device: torch.device
) -> dict[str, Split]:
    """Maps of every split (written by :func:`save_split_maps` once the model is chosen).

    The foreground head's orientation is decided on the training split, for all three.
    """
    settings = MapSettings.from_config(OmegaConf.to_container(cfg.localization))
    parts = {split: hospital_split(cfg.data, hospital, split) for split in SPLITS}
    batch_size = int(cfg.batch_size)
    flip = maps_orientation(
        model, parts["train"].images, settings, device=device, batch_size=batch_size
    )
    splits = {}
    for split, data in parts.items():
        log.info("%s split: %d images", split, len(data))
        maps, affinities, grid = generate_maps(
            model,
            data.images,
            data.labels,
            settings,
            device=device,
            batch_size=batch_size,
            flip=flip,
        )
        stems = sample_stems(data.sample_ids)
        truth = None if data.masks is None else class_aware_truths(data.masks, data.labels)
        records = [
            MapRecord(image, int(label), image_maps, affinity, grid)
            for image, label, image_maps, affinity in zip(
                data.images, data.labels, maps, affinities, strict=True
            )
        ]
        splits[split] = Split(data, stems, truth, records)
    return splits


def save_split_maps(splits: Mapping[str, Split], out: Path) -> None:
    """Every split's maps as ``maps/<split>/<stem>.npz``."""
    for split, part in splits.items():
        for stem, record in zip(part.stems, part.records, strict=True):
            save_maps(out / "maps" / split / f"{stem}.npz", record.maps)


def _propagate(
    masker: PseudoMasker, records: Sequence[MapRecord], scores: Sequence[torch.Tensor], chunk: int
) -> list[torch.Tensor]:
    """``masker.propagate`` in chunks, so memory stays bounded on large splits."""
    out: list[torch.Tensor] = []
    for start in range(0, len(records), chunk):
        out += masker.propagate(records[start : start + chunk], scores[start : start + chunk])
    return out


def label_splits(
    masker: PseudoMasker,
    background: Background,
    splits: Mapping[str, Split],
    evaluation: Evaluation,
    chunk: int,
) -> tuple[dict[str, list[np.ndarray]], dict[str, Any]]:
    """Label maps of every split from the maps, with the background chosen on validation.

    Returns
    -------
    tuple
        Label maps per split, and the background that was used.
    """
    if background.kind == "power":
        labels = {}
        for name, split in splits.items():
            scores = [stack_background(r.maps, background) for r in split.records]
            walked = _propagate(masker, split.records, scores, chunk)
            labels[name] = [argmax_labels(s) for s in walked]
        return labels, {"background": f"(1 - max)^{background.alpha:g}"}
    best = {
        name: [
            best_class(f)
            for f in _propagate(masker, split.records, [r.maps for r in split.records], chunk)
        ]
        for name, split in splits.items()
    }
    value = background.value
    if value is None and evaluation.has_truth:
        value = evaluation.select(
            list(evaluation.cfg["thresholds"]),
            lambda t: [labels_above(b, t) for b in best["val"]],
        )
    elif value is None:
        log.warning("no ground-truth masks to tune the background on; using %s", MCT_BACKGROUND)
        value = MCT_BACKGROUND
    labels = {name: [labels_above(b, float(value)) for b in found] for name, found in best.items()}
    return labels, {"background": float(value)}


def save_label_maps(
    out: Path,
    folder: str,
    splits: Mapping[str, Split],
    labels: Mapping[str, Sequence[np.ndarray]],
    overlays: bool,
) -> None:
    """``<folder>/<split>/<stem>.png`` label maps and ``<folder>/overlays/<split>/`` pictures."""
    for name, maps in labels.items():
        split = splits[name]
        for stem, image, label_map in zip(split.stems, split.data.images, maps, strict=True):
            save_label_png(out / folder / name / f"{stem}.png", label_map)
            if overlays:
                save_overlay(out / folder / "overlays" / name / f"{stem}.png", image, label_map)


def option_grid(pseudo_cfg: Mapping[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The method's own options and every combination of the values listed under ``tune``.

    An option that a candidate's other settings leave unread (``cell_fraction`` where
    ``stain_grow`` grows by a radius) is not varied in that candidate: its values would all
    give the same masks, and the report would name a choice that changed nothing. Without any
    option to tune the grid is ``[{}]``.

    Raises
    ------
    ValueError
        For a ``tune`` key that is not an option of the method, or an empty value list.
    """
    tune = dict(pseudo_cfg.get("tune") or {})
    options = {key: value for key, value in pseudo_cfg.items() if key != "tune"}
    for key, values in tune.items():
        if key not in options or key in ("method", "background"):
            raise ValueError(
                f"pseudo.tune.{key}: not an option of pseudo.method={options['method']!r}"
            )
        if not values:
            raise ValueError(f"pseudo.tune.{key}: the list of values to try is empty")
    grid: list[dict[str, Any]] = []
    for values in product(*tune.values()):
        candidate = dict(zip(tune, values, strict=True))
        unread = unused_options({**options, **candidate})
        read = {key: value for key, value in candidate.items() if key not in unread}
        if read not in grid:
            grid.append(read)
    return options, grid


def unused_options(options: Mapping[str, Any]) -> frozenset[str]:
    """The options of the pseudo-mask settings ``options`` that their method leaves unread."""
    method = METHODS.get(options["method"])
    return method.unused_options(options) if method is not None else frozenset()


def tuned_options(
    pseudo_cfg: Mapping[str, Any],
    evaluation: Evaluation,
    label_val: Callable[[Mapping[str, Any]], Sequence[np.ndarray]],
) -> dict[str, Any]:
    """The pseudo-mask options, with those listed under ``tune`` chosen on validation.

    ``tune`` maps an option of the method to the values to try (every combination, each with
    its own background constant); the option's own value is used where the hospital has no
    ground-truth masks to choose with. Colour thresholds differ between imaging domains (the
    pale cytoplasm of Dataset 2 needs a lower one than Dataset 1), so one fixed value cannot
    serve every hospital.
    """
    options, grid = option_grid(pseudo_cfg)
    if grid == [{}] or not evaluation.has_truth:
        return options
    best = evaluation.select(grid, lambda values: label_val({**options, **values}))
    log.info("pseudo-mask options chosen on validation: %s", best)
    return {**options, **best}


def seeds_stage(
    splits: Mapping[str, Split], evaluation: Evaluation, chunk: int
) -> tuple[Stage, dict[str, list[np.ndarray]]]:
    """The maps themselves against a background constant chosen on validation."""
    started = time.perf_counter()
    evaluated = {name: splits[name] for name in EVALUATED}
    labels, choice = label_splits(ThresholdMasker(), Background(), evaluated, evaluation, chunk)
    seconds = time.perf_counter() - started
    stage = Stage(MAPS, "maps (seeds)", choice, evaluation.score(labels), seconds)
    return stage, labels


def pseudo_stage(
    cfg: DictConfig,
    splits: Mapping[str, Split],
    evaluation: Evaluation,
    out: Path,
    device: torch.device,
) -> tuple[Stage, dict[str, list[np.ndarray]]]:
    """Fit the configured pseudo-mask method on train, label every split, save the PNGs."""
    started = time.perf_counter()
    pseudo_cfg = OmegaConf.to_container(cfg.pseudo, resolve=True)
    background = Background.from_config(pseudo_cfg.get("background"))
    chunk = int(cfg.batch_size)

    maskers: dict[str, PseudoMasker] = {}  # fitted once per option set (PSA trains a network)

    def fitted(options: Mapping[str, Any]) -> PseudoMasker:
        key = repr(sorted(options.items()))
        if key not in maskers:
            maskers[key] = create_masker(options)
            maskers[key].fit(splits["train"].records, device=device, seed=int(cfg.seed))
        return maskers[key]

    def label_val(options: Mapping[str, Any]) -> list[np.ndarray]:
        val = {"val": splits["val"]}
        return label_splits(fitted(options), background, val, evaluation, chunk)[0]["val"]

    options = tuned_options(pseudo_cfg, evaluation, label_val)
    masker = fitted(options)
    labels, choice = label_splits(masker, background, splits, evaluation, chunk)
    unread = unused_options(options)
    choice.update({key: options[key] for key in pseudo_cfg.get("tune") or {} if key not in unread})
    save_label_maps(out, "pseudo_masks", splits, labels, bool(cfg.overlays))
    title = f"pseudo-masks ({masker.name})"
    seconds = time.perf_counter() - started
    return Stage(PSEUDO_MASKS, title, choice, evaluation.score(labels), seconds), labels


def segmenter_stage(
    cfg: DictConfig,
    splits: Mapping[str, Split],
    train_labels: Sequence[np.ndarray],
    evaluation: Evaluation,
    out: Path,
    device: torch.device,
    classes: Sequence[str],
) -> tuple[Stage, dict[str, list[np.ndarray]]]:
    """Train the segmenter on the training split's pseudo-masks; predict val and test.

    With ``self_training.rounds`` > 0 a fresh segmenter then trains on its predecessor's
    confident predictions for the training split, so that what the segmenter generalises
    (smooth outlines, the cell's own colours) replaces the pseudo-masks' blocky or leaky edges.
    """
    started = time.perf_counter()
    profile = Profile()
    seg_cfg = OmegaConf.to_container(cfg.segmenter, resolve=True)
    train = splits["train"].data

    def predicted(
        model: torch.nn.Module, images: Sequence[np.ndarray], confidence: float = 0.0
    ) -> list[np.ndarray]:
        return predict(
            model,
            images,
            int(seg_cfg["input_size"]),
            device=device,
            batch_size=int(cfg.batch_size),
            decoding=Decoding.of(seg_cfg),
            confidence=confidence,
        )

    def trained(labels: Sequence[np.ndarray]) -> tuple[torch.nn.Module, list[float]]:
        model = create_segmenter(seg_cfg, len(classes) + 1, seed=int(cfg.seed))
        with profile.phase("segmenter training"):
            losses = train_segmenter(
                model,
                train.images,
                labels,
                seg_cfg,
                device=device,
                seed=int(cfg.seed),
                ground_truth=train.masks,
            )
        return model, losses

    model, losses = trained(train_labels)
    rounds, completed = int(cfg.self_training.rounds), 0
    confidence = float(cfg.self_training.confidence)
    for round_index in range(1, rounds + 1):
        with profile.phase("segmenter predictions"):
            own_labels = predicted(model, train.images, confidence)
        confident = sum(np.count_nonzero(label != IGNORE_INDEX) for label in own_labels)
        kept = confident / sum(label.size for label in own_labels)
        if kept == 0.0:
            log.warning(
                "self-training stopped before round %d: no training pixel at probability >= %g; "
                "the segmenter of the previous round is kept",
                round_index,
                confidence,
            )
            break
        log.info(
            "self-training round %d/%d: %.0f %% of the training pixels at probability >= %g",
            round_index,
            rounds,
            100 * kept,
            confidence,
        )
        model, losses = trained(own_labels)
        completed = round_index
    save_atomic(segmenter_payload(model, seg_cfg, classes), out / "segmenter.pt")
    with profile.phase("segmenter predictions"):
        labels = {name: predicted(model, splits[name].data.images) for name in EVALUATED}
    save_label_maps(
        out, "predictions", {n: splits[n] for n in EVALUATED}, labels, bool(cfg.overlays)
    )
    # No loss (None) when the last epoch had no labelled pixel to learn from.
    last = losses[-1] if losses and math.isfinite(losses[-1]) else None
    choice = {"epochs": len(losses), "train loss": None if last is None else round(last, 3)}
    if rounds:
        choice["self-training rounds"] = completed
    stage = Stage(
        SEGMENTER,
        f"segmenter ({seg_cfg['arch']})",
        choice,
        evaluation.score(labels, cell_types=True),
        time.perf_counter() - started,
        parts=profile.seconds,
    )
    return stage, labels


def _tuned_baseline(
    key: str,
    title: str,
    setting: str,
    options: list[Any],
    mask_of: Callable[[np.ndarray, Any], np.ndarray],
    splits: Mapping[str, Split],
    evaluation: Evaluation,
) -> Stage:
    """A training-free baseline: one mask per image, its one setting chosen on validation."""
    started = time.perf_counter()

    def labelled(name: str, option: Any) -> list[np.ndarray]:
        data = splits[name].data
        return label_cells([mask_of(image, option) for image in data.images], data.labels)

    chosen = evaluation.select(options, lambda option: labelled("val", option))
    labels = {name: labelled(name, chosen) for name in EVALUATED}
    seconds = time.perf_counter() - started
    return Stage(key, title, {setting: chosen}, evaluation.score(labels), seconds)


def disk_stage(splits: Mapping[str, Split], evaluation: Evaluation) -> Stage:
    """Centred disk, radius chosen on validation."""
    return _tuned_baseline(
        DISK,
        "baseline: centred disk",
        "radius",
        list(evaluation.cfg["disk_radii"]),
        lambda image, radius: disk_mask(image.shape[0], image.shape[1], radius),
        splits,
        evaluation,
    )


def otsu_stage(splits: Mapping[str, Split], evaluation: Evaluation) -> Stage:
    """Otsu on a stain channel + blob nearest the centre, channel chosen on validation."""
    return _tuned_baseline(
        OTSU,
        "baseline: Otsu",
        "channel",
        list(evaluation.cfg["otsu_channels"]),
        otsu_mask,
        splits,
        evaluation,
    )
