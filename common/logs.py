"""Logging for the Flower apps: our loggers get their own handler; Flower's is muted per round."""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager

# "__main__": a module run with ``python -m`` logs under that name.
PROJECT_LOGGERS = ("common", "server_app", "client_app", "post_training", "experiments", "__main__")
# The logger of Flower's own messages (flwr.common.logger).
FLOWER_LOGGER = "flwr"


def metrics_text(metrics: Mapping[str, float], keys: Collection[str] | None = None) -> str:
    """``val-loss 1.3219 val-accuracy 0.1818``: scores for a log line, four decimals each.

    ``keys`` picks which are shown (all by default); ``-`` when none are.
    """
    shown = [f"{k} {v:.4f}" for k, v in metrics.items() if keys is None or k in keys]
    return " ".join(shown) or "-"


def setup_logging(level: int = logging.INFO) -> None:
    """Attach one stream handler to the project's loggers (idempotent across rounds).

    A root-level ``basicConfig`` would duplicate every Flower line and unmute httpx, so the
    project's loggers stop propagating instead.
    """
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.propagate = False
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)


@contextmanager
def flower_warnings_only() -> Iterator[None]:
    """Flower's messages below WARNING muted while the block runs.

    A strategy's rounds log six lines a round of Flower's own and, at the end, a table of every
    metric of every round: the recorder's one line a round and ``metrics.csv`` hold the same.
    """
    logger = logging.getLogger(FLOWER_LOGGER)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)
