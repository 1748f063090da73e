"""The one interface every pseudo-mask method implements, and the background rule they share.

A method turns an image's localization maps into pseudo-masks in two steps that are the same for
all of them: :meth:`PseudoMasker.propagate` spreads per-label scores over the image (identity for
``threshold``, a random walk for ``attn_rw`` and ``psa``), then the label of each pixel is the
argmax over [background; classes]. Propagation is linear, so a constant background can be added
after it (walks keep constants) and tuned on validation without walking again.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from common.imaging import channel_argmax

# MCT feeds its random walk a constant background of 0.39, "optimal for seeds" (docs/method.md §3).
MCT_BACKGROUND = 0.39


@dataclass
class MapRecord:
    """What a pseudo-mask method may use for one image; all of it stays at the hospital.

    Attributes
    ----------
    image
        HxWx3 uint8 RGB at native size.
    label
        The image's class index (its weak label).
    maps
        (C, H, W) float localization maps in [0, 1], zero for classes the image does not have.
    affinity
        (N, N) transformer patch affinity P of :func:`common.localization.patch_affinity`.
    grid
        (h, w) patch grid of ``affinity``.
    memo
        A method's intermediate results for this image, keyed by the options they depend on:
        options tuned on validation are tried one set after another on the same records, and
        what a tried option does not change is computed once.
    """

    image: np.ndarray
    label: int
    maps: torch.Tensor
    affinity: torch.Tensor
    grid: tuple[int, int]
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class Background:
    """The background score stacked in front of the class scores before the argmax.

    Attributes
    ----------
    kind
        ``"constant"``: one value everywhere (MCT 0.39; ``threshold`` and the seed evaluation);
        ``"power"``: (1 - max_c maps)^alpha, propagated with the classes (PSA, alpha 16).
    value
        The constant; ``None`` means "choose on the validation split".
    alpha
        Exponent of the ``"power"`` kind.
    """

    kind: Literal["constant", "power"] = "constant"
    value: float | None = None
    alpha: float = 16.0

    def __post_init__(self) -> None:
        # Checked here, before the maps: a mistyped value failed at the pseudo-mask stage.
        if self.kind not in ("constant", "power"):
            raise ValueError(f"background.kind must be 'constant' or 'power', got {self.kind!r}")
        if self.value is not None and not _is_score(self.value):
            raise ValueError(
                f"background.value must be null (chosen on validation) or a number in [0, 1] "
                f"(the maps' scale), got {self.value!r}"
            )
        if not _is_number(self.alpha) or not self.alpha > 0:
            raise ValueError(f"background.alpha must be a number > 0, got {self.alpha!r}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Background:
        """Build from a ``background`` config node (missing: a constant tuned on validation)."""
        return cls(**dict(cfg or {}))


def _is_number(value: Any) -> bool:
    """A finite real number; a bool is not one (YAML reads ``true`` as one)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_score(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1


class PseudoMasker(ABC):
    """A pseudo-mask method; register implementations in ``common.pseudo.METHODS``."""

    name: ClassVar[str]
    # The background kinds whose scores :meth:`propagate` accepts: ``power`` stacks the
    # background in front of the classes, so a method that builds its own class channels
    # cannot take it.
    backgrounds: ClassVar[tuple[str, ...]] = ("constant", "power")

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PseudoMasker:
        """Build the method from its ``pseudo`` config node."""

    @classmethod
    def unused_options(cls, cfg: Mapping[str, Any]) -> frozenset[str]:
        """The options that the settings ``cfg`` leave unread.

        Tuning one would try equal candidates and report a choice that changed nothing.
        """
        return frozenset()

    def fit(self, records: Sequence[MapRecord], *, device: torch.device, seed: int) -> None:
        """Learn from the training split's maps; methods without a network learn nothing."""
        return None

    @abstractmethod
    def propagate(
        self, records: Sequence[MapRecord], scores: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Spread each image's (K, H, W) label scores over the image, linearly.

        Parameters
        ----------
        records
            The images the scores belong to.
        scores
            One (K, H, W) tensor per record, at the record's image size.

        Returns
        -------
        list[torch.Tensor]
            The propagated scores, same shapes.
        """


def stack_background(maps: torch.Tensor, background: Background) -> torch.Tensor:
    """[background; maps] (C + 1, H, W) for a fixed-value or power background."""
    if background.kind == "power":
        bg = (1 - maps.amax(0)).clamp(min=0) ** background.alpha
    elif background.value is None:
        raise ValueError("a constant background needs a value; choose it on validation first")
    else:
        bg = maps.new_full(maps.shape[1:], float(background.value))
    return torch.cat([bg[None], maps])


def argmax_labels(scores: torch.Tensor) -> np.ndarray:
    """(C + 1, H, W) [background; classes] -> uint8 label map, 0 background, k = class k - 1."""
    return channel_argmax(scores).to(torch.uint8).numpy()


def best_class(foreground: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel the highest of (C, H, W) class scores and its label (class + 1, uint8).

    Computed once per image, it turns every background constant tried on validation into a
    comparison instead of another argmax.
    """
    best, index = foreground.max(0)
    return best, (index + 1).to(torch.uint8)


def labels_above(best: tuple[torch.Tensor, torch.Tensor], value: float) -> np.ndarray:
    """Label map from :func:`best_class`: the class where its score beats ``value``, else 0.

    A tie goes to the background, as in the argmax over [background; classes].
    """
    score, label = best
    return torch.where(score > float(value), label, 0).to(torch.uint8).numpy()


def threshold_labels(foreground: torch.Tensor, value: float) -> np.ndarray:
    """Label map of (C, H, W) class scores against a constant background ``value``."""
    return labels_above(best_class(foreground), value)
