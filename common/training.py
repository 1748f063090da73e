"""Local training and validation at one hospital, shared by the ClientApp and the benchmarks."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from common.augment import build_train_transform, normalise
from common.batches import BatchBuilder, one_hot
from common.data import SplitTensors
from common.errors import JobError
from common.levers import foreground_loss, paste_cells
from common.localization import (
    FOREGROUND_SOURCES,
    foreground_flip,
    fused_maps,
    normalise_maps,
    oriented_foreground,
)
from common.metrics import average_precision, binary_miou_sweep
from common.model import MCTFormerV2, MCTOutput, mct_loss

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` as given.

    Anything else, or CUDA where there is none, is refused in one line naming the value:
    torch's own errors came as tracebacks, some only once the job had begun writing.
    """
    device = named_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        found = f"{count} CUDA device(s)" if count else "no CUDA device (device=auto or cpu)"
        raise ValueError(f"device={name}: this machine has {found}")
    return device


def named_device(name: str) -> torch.device | None:
    """The device ``name`` names, None for ``auto``; a ValueError for any other name."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name}: expected auto, cpu, cuda or cuda:<index>")
    return device


def check_device(cfg: DictConfig, *, here: bool = True) -> None:
    """Refuse ``cfg.device`` before a job starts, with the reason :func:`resolve_device` gives.

    ``here=False`` checks the name only: a deployed server sets the hospitals' device, which
    its own machine (without a GPU, say) need not have.
    """
    try:
        resolve_device(str(cfg.device)) if here else named_device(str(cfg.device))
    except ValueError as error:
        raise JobError(str(error)) from None


def learning_rate(cfg: Mapping[str, Any], epoch: float, total_epochs: int) -> float:
    """Linear warmup then cosine decay, evaluated at a fractional global epoch.

    Stepping per iteration instead of per epoch (the reference) keeps short federated runs,
    where a hospital may see only a few epochs in total, from spending whole rounds in warmup.
    """
    base = cfg["lr"] * (cfg["batch_size"] / 512 if cfg["scale_lr_by_batch"] else 1.0)
    warmup = cfg["warmup_epochs"]
    if epoch < warmup:
        return cfg["warmup_lr"] + (base - cfg["warmup_lr"]) * epoch / warmup
    span = max(total_epochs - warmup, 1e-8)
    progress = min((epoch - warmup) / span, 1.0)
    return cfg["min_lr"] + 0.5 * (base - cfg["min_lr"]) * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class TrainResult:
    """What a hospital reports after its local epochs."""

    loss: float
    num_examples: int
    seconds: float
    epochs: int
    images: int  # images stepped on over the epochs: a last partial batch is left out


# What one optimizer step minimises: (model, images, targets) -> scalar loss.
Objective = Callable[[MCTFormerV2, torch.Tensor, torch.Tensor], torch.Tensor]


def label_shift(labels: torch.Tensor, num_classes: int, strength: float) -> torch.Tensor | None:
    """``strength`` x each class's log-odds among ``labels`` (add-one smoothed); None at 0.

    The lever is for hospitals that see different mixes of cell types, where FedAvg's logits can
    learn the mix of the sites with most images and give a small site's cells the large site's
    commonest class. Each hospital trains on its logits plus this shift (logit adjustment; Menon
    et al., ICLR 2021; FedLC, Zhang et al., ICML 2022), so the shared logits hold what the image
    shows, not how common its class is where it was trained; a hospital's scores add its own
    shift back (:func:`site_label_shift`). Log-odds, not log-priors: each logit is a sigmoid's.
    Off by default: on the real data the class mix is not what fails at Dataset 2
    (docs/experiments.md).
    """
    if strength == 0:
        return None
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double() + 1.0
    prior = counts / counts.sum()
    return (strength * torch.log(prior / (1.0 - prior))).float()


def site_label_shift(
    cfg: Any | None, hospital: str, labels: torch.Tensor | np.ndarray, num_classes: int
) -> torch.Tensor | None:
    """:func:`label_shift` of ``hospital``'s training ``labels`` at its ``logit_adjustment``.

    ``cfg`` is the config the model was trained with; None or one without training settings
    (a model file of an early version) or a strength of 0 gives no shift.
    """
    if cfg is None or cfg.get("train") is None:
        return None
    strength = float(hospital_train_config(cfg, hospital).get("logit_adjustment", 0.0))
    return label_shift(torch.as_tensor(labels), num_classes, strength)


def shifted(output: MCTOutput, shift: torch.Tensor | None) -> MCTOutput:
    """``output`` with ``shift`` (C,) added to both classifiers' logits; itself for None."""
    if shift is None:
        return output
    shift = shift.to(output.class_logits.device)
    return replace(
        output,
        class_logits=output.class_logits + shift,
        patch_logits=output.patch_logits + shift,
    )


def mct_objective(levers: Mapping[str, Any], shift: torch.Tensor | None = None) -> Objective:
    """The MCT loss of the weak labels plus the foreground levers that ``levers`` switches on.

    With ``levers['copy_paste']`` > 0 a first pass without gradients reads the cells from the
    model's own foreground head, and the step trains on the batch with cells moved between
    images (:func:`common.levers.paste_cells`). That pass runs in eval mode: with dropout and
    stochastic depth on, the cells would be those of one random subnetwork, not the model's.
    ``shift`` moves the class logits of the MCT loss only (:func:`label_shift`).
    """
    share = float(levers["copy_paste"])

    def objective(model: MCTFormerV2, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if share > 0:
            training = model.training
            with torch.no_grad():
                foreground = model.eval()(images).foreground
            model.train(training)
            if foreground is None:
                raise ValueError(
                    "train.levers.copy_paste takes the cells from the foreground head: "
                    "set model.foreground_head=true"
                )
            cell = oriented_foreground(torch.sigmoid(foreground.float()))
            images, targets = paste_cells(images, targets, cell, share)
        output = model(images)
        loss = mct_loss(shifted(output, shift), targets)
        extra = foreground_loss(output, targets, model.head, levers["foreground"])
        return loss if extra is None else loss + extra

    return objective


def training_epochs(cfg: Mapping[str, Any], steps_per_epoch: int) -> int:
    """``epochs``, raised until the run makes at least ``min_steps`` optimizer steps.

    A hospital with 31 training images makes 3 steps per epoch at batch 8: a fixed epoch count
    leaves a model untrained at small hospitals and wastes time at large ones (the segmenter
    from scratch; the site's fine-tune, which makes 1 step per epoch there at batch 16).
    """
    floor = math.ceil(int(cfg.get("min_steps", 0)) / max(1, steps_per_epoch))
    return max(int(cfg["epochs"]), floor)


def local_steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Full batches per epoch of :func:`train_local`; a split smaller than a batch is one step."""
    return max(num_examples // batch_size, 1)


def train_local(
    model: MCTFormerV2,
    data: SplitTensors,
    cfg: Mapping[str, Any],
    *,
    start_epoch: int,
    total_epochs: int,
    device: torch.device,
    seed: int,
    proximal_mu: float = 0.0,
    objective: Objective | None = None,
    num_targets: int | None = None,
    extra_parameters: Sequence[torch.nn.Parameter] = (),
) -> TrainResult:
    """Run ``cfg['local_epochs']`` epochs of AdamW on one hospital's training tensors.

    ``start_epoch`` is this hospital's position in the whole federated schedule, so the
    learning rate continues across rounds although the optimizer is rebuilt each round.
    ``proximal_mu`` > 0 adds FedProx's ``mu/2 ||w - w_start||^2`` to the loss, ``w_start`` being
    the weights this call starts from (the round's global model), which limits how far a
    hospital's update drifts from the others'; 0 runs exactly the plain FedAvg step.

    The loop is shared by every federated phase: ``objective`` (default: the MCT loss with
    ``cfg['levers']``) is what a step minimises, ``data.labels`` index one-hot targets of
    ``num_targets`` entries (default: the model's classes), and ``extra_parameters`` (a
    hospital-private head, say) are optimised with the model but never leave this function.
    """
    n = len(data.labels)
    if n == 0:
        raise ValueError("the training split is empty")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if objective is None:
        shift = label_shift(data.labels, model.num_classes, float(cfg.get("logit_adjustment", 0)))
        objective = mct_objective(cfg["levers"], shift)
    transform = build_train_transform(cfg["augment"], model.img_size)
    batches = BatchBuilder(
        data, num_targets or model.num_classes, transform, cfg["levers"], generator
    )
    optimizer = torch.optim.AdamW(
        [*model.parameters(), *extra_parameters],
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        eps=cfg["eps"],
    )
    use_amp = bool(cfg["amp"]) and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    batch_size = min(cfg["batch_size"], n)
    steps_per_epoch = local_steps_per_epoch(n, batch_size)
    model.to(device).train()
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    started = time.perf_counter()
    losses = []
    for epoch in range(cfg["local_epochs"]):
        order = torch.randperm(n, generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            lr = learning_rate(cfg, start_epoch + epoch + step / steps_per_epoch, total_epochs)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images, targets = batches.batch(index)
            images, targets = images.to(device), targets.to(device)
            with torch.autocast(device.type, enabled=use_amp):
                loss = objective(model, images, targets)
            if anchor:
                drift = sum(
                    ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True)
                )
                loss = loss + 0.5 * proximal_mu * drift
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at lr {lr:.2e}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
    return TrainResult(
        loss=float(np.mean(losses)),
        num_examples=n,
        seconds=time.perf_counter() - started,
        epochs=int(cfg["local_epochs"]),
        images=len(losses) * batch_size,
    )


def hospital_train_config(cfg: Any, hospital: str | None) -> Any:
    """``cfg.train`` with ``train.per_hospital.<hospital>`` merged over it.

    Imaging domains differ in what helps them (colour jitter sharpens one site's maps and
    blurs another's), so a hospital may set its own augmentation or lever strength for its
    local epochs. Pooled training (``hospital=None``) uses the shared settings.

    Raises
    ------
    ValueError
        Naming the key when the hospital's settings name one that ``train`` does not have.
    """
    own = (cfg.train.get("per_hospital") or {}).get(hospital) if hospital else None
    if not own:
        return cfg.train
    try:
        return OmegaConf.merge(cfg.train, own)
    except (ConfigKeyError, ValidationError) as error:
        raise ValueError(f"train.per_hospital.{hospital}: {str(error).splitlines()[0]}") from None


def fine_tune(
    model: MCTFormerV2,
    data: SplitTensors,
    cfg: Mapping[str, Any],
    *,
    epochs: int,
    lr_scale: float,
    device: torch.device,
    seed: int,
    min_steps: int = 0,
) -> TrainResult:
    """``epochs`` more epochs of local training from a trained model, in place.

    No warmup and a learning rate of ``lr_scale`` x ``cfg['lr']`` decaying by the usual
    cosine: the model is a trained starting point, and a full warmup from near zero would
    spend the few epochs a site fine-tunes for. ``min_steps`` raises the epochs until that
    many optimizer steps are made (:func:`training_epochs`).
    """
    steps = local_steps_per_epoch(len(data.labels), int(cfg["batch_size"]))
    epochs = training_epochs({"epochs": epochs, "min_steps": min_steps}, steps)
    tuned = {
        **cfg,
        "local_epochs": epochs,
        "warmup_epochs": 0,
        "lr": float(cfg["lr"]) * lr_scale,
    }
    return train_local(
        model, data, tuned, start_epoch=0, total_epochs=epochs, device=device, seed=seed
    )


def train_round(
    model: MCTFormerV2,
    data: SplitTensors,
    cfg: Any,
    *,
    server_round: int,
    hospital_index: int,
    device: torch.device,
    hospital: str | None = None,
) -> TrainResult:
    """One hospital's local epochs of federated round ``server_round`` (counted from 1).

    The ClientApp, the in-process regimes and the benchmark all train through this, so a
    hospital training alone or in one process has exactly the learning-rate position,
    shuffling seed, proximal term and own settings (``hospital``) it has in a Flower run.
    """
    train = hospital_train_config(cfg, hospital)
    local_epochs = int(train.local_epochs)
    return train_local(
        model,
        data,
        train,
        start_epoch=(server_round - 1) * local_epochs,
        total_epochs=int(cfg.federation.rounds) * local_epochs,
        device=device,
        seed=cfg.seed * 100_003 + server_round * 1_009 + hospital_index,
        proximal_mu=float(train.get("proximal_mu", 0.0)),
    )


@torch.no_grad()
def evaluate_local(
    model: MCTFormerV2,
    data: SplitTensors,
    localization: Mapping[str, Any],
    *,
    device: torch.device,
    batch_size: int = 32,
    shift: torch.Tensor | None = None,
) -> dict[str, float]:
    """Validation loss, accuracy and mAP; where masks exist, cell-vs-background mIoU of the maps.

    Accuracy and mAP are the class tokens' (the reference's classifier); ``val-cam-accuracy``
    is the patch-CAM head's, the model's other classifier, trained by the same loss: from
    scratch on the real data it was the better one (docs/localization.md).
    The maps use each image's own label (as the post-training job does), and the foreground
    threshold is the best of ``localization['thresholds']`` on this split; both are reported.
    ``shift`` is the hospital's own :func:`site_label_shift`, for a model trained with one.
    """
    model.to(device).eval()
    n = len(data.labels)
    source = localization.get("source", "fused")

    def batches() -> Iterator[torch.Tensor]:
        for start in range(0, n, batch_size):
            yield normalise(data.images[start : start + batch_size]).to(device)

    flip = None
    if data.masks is not None and source in FOREGROUND_SOURCES:
        flip = foreground_flip(model, batches())
    losses, scores, cam_scores, foreground = [], [], [], []
    for start, images in zip(range(0, n, batch_size), batches(), strict=True):
        labels = data.labels[start : start + batch_size].to(device)
        targets = one_hot(labels, model.num_classes)
        output = shifted(model(images, return_attention=data.masks is not None), shift)
        losses.append(mct_loss(output, targets).item() * len(labels))
        # Logits, not sigmoids: both metrics read only the ranking, and float32 sigmoids of
        # logits past ~17 are all 1.0, a tie that argmax broke towards class 0.
        scores.append(output.class_logits.float().cpu())
        cam_scores.append(output.patch_logits.cpu())
        if data.masks is not None:
            raw = fused_maps(
                output,
                localization["last_k_layers"],
                source=source,
                reduce=localization.get("reduce", "sum"),
                minmax_factors=bool(localization.get("minmax_factors", False)),
                flip=flip,
            )
            maps = normalise_maps(raw, images.shape[-2:], targets)
            foreground.append(maps.amax(dim=1).cpu())
    score_array = torch.cat(scores).numpy()
    cam_array = torch.cat(cam_scores).numpy()
    label_array = data.labels.numpy()
    metrics = {
        "val-loss": float(np.sum(losses) / n),
        "val-accuracy": float((score_array.argmax(1) == label_array).mean()),
        "val-cam-accuracy": float((cam_array.argmax(1) == label_array).mean()),
        "val-map": average_precision(score_array, label_array),
    }
    if data.masks is not None:
        thresholds = list(localization["thresholds"])
        sweep = binary_miou_sweep(torch.cat(foreground), data.masks > 0, thresholds)
        best = int(np.argmax(sweep))
        metrics["val-loc-miou"] = float(sweep[best])
        metrics["val-loc-threshold"] = float(thresholds[best])
    return metrics
