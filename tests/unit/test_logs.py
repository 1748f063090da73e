import logging

import pytest
from flwr.common.logger import log as flower_log

from common.logs import FLOWER_LOGGER, flower_warnings_only


def test_flower_lines_below_warning_are_muted_inside_the_block_only():
    logger = logging.getLogger(FLOWER_LOGGER)
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with pytest.raises(RuntimeError), flower_warnings_only():
            flower_log(logging.INFO, "[ROUND 1/2]")
            flower_log(logging.WARNING, "node 3 unavailable")
            raise RuntimeError("the rounds stopped")
        flower_log(logging.INFO, "after the rounds")
    finally:
        logger.removeHandler(handler)
    assert seen == ["node 3 unavailable", "after the rounds"]
