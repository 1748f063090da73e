"""Pseudo-masks from localization maps: one interface, four methods, chosen by name.

``create_masker(cfg.pseudo)`` builds the configured method; every method is a
:class:`PseudoMasker` (see ``base``), so the post-training job treats them alike.
"""

from collections.abc import Mapping
from typing import Any

from common.pseudo.attn_rw import AttentionWalkMasker
from common.pseudo.base import (
    MCT_BACKGROUND,
    Background,
    MapRecord,
    PseudoMasker,
    argmax_labels,
    best_class,
    labels_above,
    stack_background,
    threshold_labels,
)
from common.pseudo.psa import PSAMasker
from common.pseudo.stain_grow import StainGrowMasker
from common.pseudo.threshold import ThresholdMasker

METHODS: dict[str, type[PseudoMasker]] = {
    method.name: method
    for method in (ThresholdMasker, AttentionWalkMasker, PSAMasker, StainGrowMasker)
}


def create_masker(cfg: Mapping[str, Any]) -> PseudoMasker:
    """Build the method named by ``cfg['method']`` from its config node.

    Raises
    ------
    ValueError
        For a method name that is not registered, or a ``background`` it cannot take.
    """
    name = cfg["method"]
    if name not in METHODS:
        raise ValueError(f"pseudo.method={name!r} is unknown; expected one of {sorted(METHODS)}")
    method = METHODS[name]
    kind = Background.from_config(cfg.get("background")).kind
    if kind not in method.backgrounds:
        raise ValueError(
            f"background.kind={kind!r} does not work with pseudo.method={name!r}; use "
            + " or ".join(repr(k) for k in method.backgrounds)
        )
    return method.from_config(cfg)


__all__ = [
    "MCT_BACKGROUND",
    "METHODS",
    "AttentionWalkMasker",
    "Background",
    "MapRecord",
    "PSAMasker",
    "PseudoMasker",
    "StainGrowMasker",
    "ThresholdMasker",
    "argmax_labels",
    "best_class",
    "labels_above",
    "create_masker",
    "stack_background",
    "threshold_labels",
]
