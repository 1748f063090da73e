"""Progress lines for long loops and a per-phase time profile of a job."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Progress:
    """Log ``label: done/total (rate/s, eta)`` at most every ``every_s`` seconds, and at the end.

    A log line rather than a terminal bar, so progress also shows in files and container logs.

    Parameters
    ----------
    label
        What is counted, e.g. ``"maps"``.
    total
        Number of items (or steps) the loop will report.
    logger
        The caller's logger, so lines carry the module that does the work.
    every_s
        Minimum seconds between two lines.
    """

    def __init__(
        self, label: str, total: int, logger: logging.Logger, every_s: float = 10.0
    ) -> None:
        self.label = label
        self.total = total
        self.logger = logger
        self.every_s = every_s
        self.done = 0
        self.started = time.perf_counter()
        self._last = self.started

    def update(self, count: int = 1, **extra: float) -> None:
        """Count ``count`` more items; ``extra`` values (e.g. ``loss=0.3``) join the line."""
        self.done += count
        now = time.perf_counter()
        if now - self._last < self.every_s and self.done < self.total:
            return
        self._last = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        details = "".join(f" {key} {value:.4g}" for key, value in extra.items())
        self.logger.info(
            "%s: %d/%d (%.1f/s, eta %.0fs)%s",
            self.label,
            self.done,
            self.total,
            rate,
            eta,
            details,
        )


class Profile:
    """Seconds spent in named phases of a job, for its report and its log."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (added to any earlier time of that name)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - started
            self.seconds[name] = round(self.seconds.get(name, 0.0) + spent, 2)

    def __str__(self) -> str:
        total = sum(self.seconds.values())
        parts = ", ".join(f"{name} {s:.1f}" for name, s in self.seconds.items())
        return f"{parts}; total {total:.1f}"
