"""``attn_rw``: the PSA random walk on the transformer's own patch affinity (docs/method.md §3).

No extra network: W = ((P + P^T) / 2)^beta on the patch grid, where P is the all-layer patch
attention the refinement already uses. Cheap enough for the CPU preset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from common.pseudo.base import MapRecord, PseudoMasker
from common.pseudo.walk import transition_matrix, walk_on_grid


def symmetric_affinity(affinity: torch.Tensor) -> torch.Tensor:
    """(P + P^T) / 2: the walk needs a symmetric affinity (:func:`transition_matrix` scales it)."""
    return (affinity + affinity.transpose(-1, -2)) / 2


class AttentionWalkMasker(PseudoMasker):
    """Random walk on the symmetrised transformer patch affinity.

    Parameters
    ----------
    beta
        Affinity exponent.
    logt
        t = 2^logt walk steps; a few steps suffice on a patch grid (docs/method.md: 2-8 steps).
    """

    name = "attn_rw"

    def __init__(self, beta: float = 8.0, logt: int = 2) -> None:
        self.beta = beta
        self.logt = logt

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> AttentionWalkMasker:
        """Read ``beta`` and ``logt``."""
        return cls(beta=float(cfg["beta"]), logt=int(cfg["logt"]))

    def propagate(
        self, records: Sequence[MapRecord], scores: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Walk every image's scores on its own patch grid, batched over images."""
        if not records:
            return []
        transitions = transition_matrix(
            symmetric_affinity(torch.stack([r.affinity for r in records])), self.beta, self.logt
        )
        return [
            walk_on_grid(score, transition, record.grid, score.shape[1:])
            for record, score, transition in zip(records, scores, transitions, strict=True)
        ]
