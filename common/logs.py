"""Logging for the Flower apps: our loggers get their own handler, Flower's output is untouched."""

from __future__ import annotations

import logging

# "__main__": a module run with ``python -m`` logs under that name.
PROJECT_LOGGERS = ("common", "server_app", "client_app", "post_training", "experiments", "__main__")


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
