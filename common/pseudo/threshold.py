"""``threshold``: the maps themselves against a background constant (no propagation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from common.pseudo.base import MapRecord, PseudoMasker


class ThresholdMasker(PseudoMasker):
    """Argmax of [constant; maps]: the seeds of the reference evaluation, and the cheapest mask."""

    name = "threshold"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ThresholdMasker:
        """No options beyond the shared background."""
        return cls()

    def propagate(
        self, records: Sequence[MapRecord], scores: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Return the scores unchanged."""
        return list(scores)
