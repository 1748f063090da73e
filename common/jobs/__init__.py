"""Command-line jobs a hospital runs on its own machine after federated training.

``w3s-postprocess`` (maps -> pseudo-masks -> segmenter -> metrics) and ``w3s-predict``
(segment new images). Only their metrics are meant to leave the site.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from common.data import DataVerificationError


class JobError(Exception):
    """A problem with the job's inputs that the user can fix; shown without a traceback."""


@contextmanager
def exit_on_input_error(log: logging.Logger) -> Iterator[None]:
    """A job's input problem (bad option, file or data) becomes one logged line and status 2.

    What the user can fix needs a message naming it, not a traceback; anything else is a bug
    and keeps its traceback.
    """
    try:
        yield
    except (JobError, DataVerificationError) as error:
        log.error("%s", error)
        raise SystemExit(2) from None
