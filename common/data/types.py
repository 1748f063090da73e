"""Data records shared by every reader: one hospital's images, and the problems found in them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from common.errors import JobError

BACKGROUND, CYTOPLASM, NUCLEUS = 0, 1, 2

ProblemKind = Literal[
    "unreadable_image",
    "truncated_image",
    "missing_label",
    "unknown_class",
    "mask_size_mismatch",
    "unreadable_mask",
    "missing_mask",
    "empty_hospital",
    "missing_root",
    "unreadable_folder",
    "bad_link",
    "repeated_image",
    "conflicting_label",
    "ambiguous_mask",
    "bad_mask",
    "bad_config",
    "empty_split",
]


def id_bytes(sample_id: str) -> bytes:
    """A sample id as bytes, a name that is not UTF-8 (an old share's Latin-1) as it lies on disk.

    Python decodes such names with surrogates, which plain ``str.encode`` refuses.
    """
    return sample_id.encode("utf-8", "surrogateescape")


@dataclass
class HospitalData:
    """One hospital's labelled images, as every reader returns them.

    Attributes
    ----------
    name
        Hospital key in ``cfg.data.hospitals``.
    classes
        The unified class vocabulary (``cfg.data.classes``) that ``labels`` index into.
    images
        HxWx3 uint8 RGB arrays at native size; sizes may differ between images.
    labels
        ``(N,)`` int64 indices into ``classes``.
    masks
        HxW uint8 arrays in {BACKGROUND, CYTOPLASM, NUCLEUS}, one per image and of its size, or
        ``None`` when the on-disk format carries no masks.
    sample_ids
        A stable id per image (path relative to the hospital root, or ``synthetic/<i>``). It names
        files on the hospital's machine, so it must never leave the site.
    """

    name: str
    classes: tuple[str, ...]
    images: list[np.ndarray]
    labels: np.ndarray
    masks: list[np.ndarray] | None
    sample_ids: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int] | np.ndarray) -> HospitalData:
        """Return the images at ``indices`` (in that order) as a new record sharing the arrays."""
        picked = [int(i) for i in indices]
        return HospitalData(
            name=self.name,
            classes=self.classes,
            images=[self.images[i] for i in picked],
            labels=self.labels[np.asarray(picked, dtype=np.int64)],
            masks=None if self.masks is None else [self.masks[i] for i in picked],
            sample_ids=[self.sample_ids[i] for i in picked],
        )


@dataclass(frozen=True)
class DataProblem:
    """One thing wrong with a hospital's data, precise enough for the site's operator to fix it.

    Attributes
    ----------
    hospital
        Hospital key in ``cfg.data.hospitals``.
    path
        The offending file or folder, or ``""`` when the problem is not about a file.
    kind
        A :data:`ProblemKind` value, stable enough for tests and dashboards to match on.
    detail
        Human-readable explanation.
    """

    hospital: str
    path: str
    kind: ProblemKind
    detail: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"[{self.kind}] {where}{self.detail}"


def format_problems(problems: Iterable[DataProblem]) -> str:
    """Render problems one per line, grouped under their hospital in first-seen order.

    Parameters
    ----------
    problems
        The problems to render.

    Returns
    -------
    str
        A multi-line report; it contains file paths, so it is for the site's operator only.
    """
    grouped: dict[str, list[DataProblem]] = {}
    for problem in problems:
        grouped.setdefault(problem.hospital, []).append(problem)
    lines: list[str] = []
    for hospital, items in grouped.items():
        lines.append(f"{hospital}: {len(items)} problem(s)")
        lines.extend(f"  {item}" for item in items)
    return "\n".join(lines)


class DataVerificationError(JobError, ValueError):
    """Raised when a hospital's data fails verification; carries every problem found, not the first.

    ``str()`` is the full report with file paths, meant for the hospital's own log. Use
    :meth:`redacted` for anything that may leave the site (for example a Flower error reply).

    Parameters
    ----------
    problems
        Every problem found.
    """

    def __init__(self, problems: Sequence[DataProblem]) -> None:
        self.problems = list(problems)
        header = f"data verification failed with {len(self.problems)} problem(s):"
        super().__init__(f"{header}\n{format_problems(self.problems)}")

    def brief(self) -> str:
        """One line: the count and the first problem (``w3s-verify`` lists them all)."""
        first = self.problems[0]
        return (
            f"data verification failed with {len(self.problems)} problem(s), first: "
            f"{first.hospital} {first} (w3s-verify lists them all)"
        )

    def redacted(self) -> str:
        """Summarise the problems as counts per hospital and kind, without paths or details.

        Returns
        -------
        str
            Like ``"data verification failed: dataset1: 2 truncated_image, 1 missing_label"``.
        """
        counts: dict[str, Counter[str]] = {}
        for problem in self.problems:
            counts.setdefault(problem.hospital, Counter())[problem.kind] += 1
        parts = [
            f"{hospital}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items())
            for hospital, kinds in counts.items()
        ]
        return "data verification failed: " + "; ".join(parts)
