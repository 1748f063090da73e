"""A progress line in the log for long loops: no extra dependency, quiet when loops are short."""

from __future__ import annotations

import logging
import time


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
