"""server_app/strategy: GuardedFedAvg drops failed and bad replies, weighted metrics."""

import numpy as np
import pytest

from common.arrays import array_specs, to_state_dict
from server_app.strategy import GuardedFedAvg, TooFewRepliesError, weighted_metrics
from tests.replies import GLOBAL, failed, reply

pytestmark = pytest.mark.usefixtures("task_identity")


def _strategy(min_replies: int) -> GuardedFedAvg:
    strategy = GuardedFedAvg(num_hospitals=4, min_replies=min_replies)
    # configure_train records the global model's specs; set them as it would.
    strategy._reference = array_specs(GLOBAL)
    return strategy


def test_bad_replies_are_dropped_and_the_rest_averaged(caplog):
    strategy = _strategy(min_replies=2)
    replies = [
        reply(1, 1.0, 10),
        reply(2, 4.0, 30),
        reply(3, float("nan"), 10),
        reply(4, 9.0, 10, shape=(1,)),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert np.allclose(to_state_dict(arrays)["w"].numpy(), (1 * 10 + 4 * 30) / 40)
    assert metrics["train-loss"] == pytest.approx((1 * 10 + 4 * 30) / 40)
    assert sorted(strategy.report.rejected) == [3, 4]
    assert "node 3" in caplog.text and "node 4" in caplog.text


def test_error_replies_are_logged_by_node():
    strategy = _strategy(min_replies=1)
    strategy.aggregate_train(1, [reply(1, 1.0, 10), failed(5, reason="boom")])
    assert strategy.report.failed == {5: "boom"}
    assert strategy.report.good == 1


def test_too_few_good_replies_stop_the_run():
    strategy = _strategy(min_replies=2)
    with pytest.raises(TooFewRepliesError, match="1 good replies, at least 2"):
        strategy.aggregate_train(1, [reply(1, 1.0, 10), reply(2, 1.0, 0)])


def test_min_replies_is_validated():
    with pytest.raises(ValueError, match="min_replies"):
        GuardedFedAvg(num_hospitals=2, min_replies=3)


def test_weighted_metrics_skip_missing_and_nan_scores():
    a = reply(1, 1.0, 10)
    b = reply(2, 3.0, 30)
    a.content["metrics"]["val-loc-miou"] = 0.5
    b.content["metrics"]["val-loc-miou"] = float("nan")
    merged = weighted_metrics([a, b])
    assert merged["train-loss"] == pytest.approx(2.5)
    assert merged["val-loc-miou"] == pytest.approx(0.5)
    assert "hospital-index" not in merged and "num-examples" not in merged
