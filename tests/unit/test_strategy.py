"""server_app/strategy: GuardedFedAvg drops failed and bad replies, guards, waits, aggregators."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from omegaconf import OmegaConf

import server_app.strategy
from common.arrays import SPLIT_KEY, to_state_dict
from common.config import compose_config
from server_app.strategy import (
    GuardedFedAvg,
    GuardedFedMedian,
    GuardedFedTrimmedAvg,
    Guards,
    TooFewNodesError,
    TooFewRepliesError,
    build_strategy,
    weighted_metrics,
)
from tests.replies import failed, instruction, prepare, reply

pytestmark = pytest.mark.usefixtures("task_identity")

# A global model of norm 2 (four entries of 1.0); replies of 1.1, 1.2 are updates of norm 0.2, 0.4.
ONES = ArrayRecord({"w": Array(np.ones((2, 2), np.float32))})
GUARDS = Guards(max_update_model_ratio=1.0, max_update_norm_ratio=10.0, max_examples_growth=1.0)


def _strategy(min_replies: int, **kwargs) -> GuardedFedAvg:
    return prepare(GuardedFedAvg(num_hospitals=4, min_replies=min_replies, **kwargs))


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


def test_replies_are_averaged_in_hospital_order_whatever_order_they_arrived_in():
    strategy = _strategy(min_replies=3)
    good = strategy.screen_train(1, [reply(3, 1.0, 10), reply(1, 2.0, 10), reply(2, 3.0, 10)])
    assert [int(m.content["metrics"]["hospital-index"]) for m in good] == [0, 1, 2]


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


def test_num_examples_near_the_float_maximum_weigh_models_and_scores_as_shares():
    huge = np.finfo(np.float64).max / 1.5  # two of them sum to inf
    strategy = prepare(GuardedFedAvg(num_hospitals=3, min_replies=3), ONES)
    replies = [reply(1, 1.0, huge), reply(2, 2.0, huge), reply(3, 3.0, huge / 2)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = (1.0 + 2.0 + 1.5) / 2.5
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), expected, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(expected)


# --- update guards: one participant must not take the model over ----------------------------


def test_a_huge_finite_update_with_a_huge_weight_is_rejected_by_name():
    # The takeover: finite values of 1e30 with num-examples 1e15 used to become the global model.
    strategy = prepare(_strategy(min_replies=2, guards=GUARDS), ONES)
    arrays, _ = strategy.aggregate_train(
        1, [reply(1, 1.1, 10), reply(2, 1.2, 30), reply(3, 1e30, 1e15)]
    )
    np.testing.assert_allclose(
        to_state_dict(arrays)["w"].numpy(), (1.1 * 10 + 1.2 * 30) / 40, rtol=1e-6
    )
    assert list(strategy.report.rejected) == [3]
    assert "global model's norm" in strategy.report.rejected[3]
    # A rejected reply neither declares nor is held to a num-examples.
    assert strategy.report.capped == {} and 2 not in strategy.declared_examples


@pytest.mark.parametrize(
    ("guards", "reason"),
    [
        (Guards(max_update_model_ratio=1.0), "global model's norm"),
        (Guards(max_update_norm_ratio=10.0), "median update norm of the other replies"),
    ],
)
def test_each_norm_guard_alone_rejects_the_outlier(guards, reason):
    strategy = prepare(_strategy(min_replies=2, guards=guards), ONES)
    # An update of norm 2 * 3 = 6: three times the model's norm, 15x / 30x the others'.
    strategy.aggregate_train(1, [reply(1, 1.1, 10), reply(2, 1.2, 10), reply(3, 4.0, 10)])
    assert list(strategy.report.rejected) == [3]
    assert reason in strategy.report.rejected[3]


def test_a_reply_larger_than_the_model_is_refused_before_it_is_decoded(monkeypatch):
    strategy = prepare(_strategy(min_replies=1, guards=Guards(max_reply_model_ratio=1.0)), ONES)
    oversize = reply(2, 1.1, 10)
    oversize.content["arrays"]["extra"] = Array(np.zeros(1000, np.float32))
    decoded = []
    unpack_reply = server_app.strategy.unpack_reply
    monkeypatch.setattr(
        "server_app.strategy.unpack_reply", lambda c, r: decoded.append(c) or unpack_reply(c, r)
    )
    strategy.aggregate_train(1, [reply(1, 1.1, 10), oversize])
    assert list(strategy.report.rejected) == [2]
    assert "over 1 x the global model's" in strategy.report.rejected[2]
    assert len(decoded) == 1  # only the honest reply reached the array checks


def test_the_peer_guard_stands_aside_with_two_replies_where_it_cannot_tell_the_outlier():
    # A hospital of one step at the warm-up rate sends a tiny update: the other one, honest and
    # 1000 times larger, stays. Three replies have a majority to compare with.
    strategy = prepare(_strategy(min_replies=2, guards=Guards(max_update_norm_ratio=10.0)), ONES)
    strategy.aggregate_train(1, [reply(1, 1.0001, 10), reply(2, 1.1, 10)])
    assert not strategy.report.rejected
    prepare(strategy, ONES)
    strategy.aggregate_train(2, [reply(1, 1.0001, 10), reply(2, 1.0002, 10), reply(3, 1.1, 10)])
    assert list(strategy.report.rejected) == [3]


def test_sites_of_one_warm_up_step_do_not_make_an_honest_larger_site_an_outlier():
    # Round 1 at local_epochs=1: two small sites took one step at the warm-up rate (updates of
    # norm 2e-4), a larger one several (0.1: 5 % of the model's norm of 2). The median of the
    # others is raised to 1 % of the model's norm, so only an update above 10 % is out of line.
    guards = Guards(max_update_norm_ratio=10.0, peer_norm_floor=0.01)
    strategy = prepare(_strategy(min_replies=2, guards=guards), ONES)
    strategy.aggregate_train(1, [reply(1, 1.0001, 10), reply(2, 1.0001, 10), reply(3, 1.05, 40)])
    assert not strategy.report.rejected
    prepare(strategy, ONES)
    strategy.aggregate_train(2, [reply(1, 1.0001, 10), reply(2, 1.0001, 10), reply(3, 1.5, 40)])
    assert list(strategy.report.rejected) == [3]
    assert "other replies (0.02;" in strategy.report.rejected[3]


def test_num_examples_is_capped_at_the_first_declaration():
    strategy = prepare(_strategy(min_replies=2, guards=GUARDS), ONES)
    strategy.aggregate_train(1, [reply(1, 1.1, 10), reply(2, 1.2, 30)])
    assert strategy.declared_examples == {0: 10, 1: 30}
    prepare(strategy, ONES)
    arrays, _ = strategy.aggregate_train(2, [reply(1, 1.1, 1e15), reply(2, 1.2, 30)])
    # Hospital 0 counts with its declared 10 examples, not 1e15.
    np.testing.assert_allclose(
        to_state_dict(arrays)["w"].numpy(), (1.1 * 10 + 1.2 * 30) / 40, rtol=1e-6
    )
    assert strategy.report.capped == {1: (1e15, 10.0)}


@pytest.mark.parametrize("kind", [GuardedFedAvg, GuardedFedMedian, GuardedFedTrimmedAvg])
def test_split_fingerprints_are_kept_per_hospital_and_a_change_is_named(kind, caplog):
    strategy = prepare(kind(num_hospitals=4, min_replies=2, hospitals=["a", "b", "c", "d"]))

    def split(msg, digest):
        msg.content["metrics"][SPLIT_KEY] = digest
        return msg

    # Hospital c runs a client of an earlier version, which sends no fingerprint: Flower's
    # aggregators refuse replies whose metrics have different keys.
    first = [split(reply(1, 1.0, 10), 7), split(reply(2, 2.0, 10), 9), reply(3, 3.0, 10)]
    _, metrics = strategy.aggregate_train(1, first)
    # A fingerprint is no score: it is neither averaged nor in the hospitals' rows.
    assert SPLIT_KEY not in metrics and SPLIT_KEY not in strategy.report.per_hospital[1]
    assert "trains on other splits" not in caplog.text
    prepare(strategy)
    strategy.aggregate_train(2, [split(reply(1, 1.0, 10), 7), split(reply(2, 2.0, 10), 11)])
    assert strategy.split_digests == {"a": [7], "b": [9, 11]}
    assert "round 2: hospital 'b' trains on other splits" in caplog.text


def test_a_second_node_claiming_the_same_hospital_is_rejected_by_name():
    strategy = prepare(
        GuardedFedAvg(num_hospitals=3, min_replies=1, hospitals=["a", "b", "c"]), ONES
    )
    strategy.aggregate_train(1, [reply(1, 1.1, 10), reply(2, 1.2, 10, index=0)])
    assert list(strategy.report.rejected) == [2]
    assert "hospital 'a'" in strategy.report.rejected[2]
    assert "node 1 already answered" in strategy.report.rejected[2]


def test_a_hospital_index_out_of_range_or_not_an_integer_is_rejected():
    strategy = prepare(GuardedFedAvg(num_hospitals=2, min_replies=1), ONES)
    odd = [reply(3, 1.2, 10, index=float("inf")), reply(4, 1.2, 10, index=0.5)]
    strategy.aggregate_train(1, [reply(1, 1.1, 10), reply(2, 1.2, 10, index=7), *odd])
    assert "not one of the run's 0..1" in strategy.report.rejected[2]
    assert "not an integer" in strategy.report.rejected[3]
    assert "not an integer" in strategy.report.rejected[4]


# --- every round waits for nodes at most round_wait_for_nodes_s -----------------------------


class _Grid:
    """A grid whose online nodes the test chooses."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


class _Clock:
    """Stands in for the strategy's ``time``: sleeping moves the clock, nothing waits."""

    def __init__(self) -> None:
        self.now, self.slept = 100.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_round_short_of_nodes_stops_after_the_wait_instead_of_hanging(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr("server_app.strategy.time", clock)
    strategy = GuardedFedAvg(num_hospitals=3, min_replies=2, round_wait_for_nodes_s=2.0)
    with pytest.raises(TooFewNodesError) as error:
        strategy.configure_train(3, ONES, ConfigRecord(), _Grid([7]))
    assert sum(clock.slept) == pytest.approx(2.0)  # the whole wait, and not a poll more
    assert "round 3 training: 1 SuperNodes online" in str(error.value)
    assert "resume=true" in str(error.value)


def test_a_round_starts_on_every_online_node_and_evaluation_goes_on_with_fewer(caplog):
    caplog.set_level(logging.INFO, logger="server_app.strategy")
    strategy = GuardedFedAvg(
        num_hospitals=3, min_replies=2, round_offset=4, round_wait_for_nodes_s=0.2
    )
    messages = list(strategy.configure_train(1, ONES, ConfigRecord(), _Grid([3, 1, 2])))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    assert messages[0].content["config"]["server-round"] == 5
    evaluation = list(strategy.configure_evaluate(1, ONES, ConfigRecord(), _Grid([2])))
    assert [m.metadata.dst_node_id for m in evaluation] == [2]
    # One line as a round starts, with its true number; its evaluation's start only at DEBUG.
    starts = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert starts == ["round 5: training on 3 nodes"]
    pretraining = ConfigRecord({"phase": "pretrain"})
    list(strategy.configure_train(2, ONES, pretraining, _Grid([3, 1, 2])))
    assert caplog.records[-1].getMessage() == "pretrain round 6: training on 3 nodes"
    assert list(strategy.configure_evaluate(1, ONES, ConfigRecord(), _Grid([]))) == []
    # No one asked, no one failed to answer.
    assert strategy.aggregate_evaluate(1, []) is None
    assert strategy.report.evaluate_failed == {}


# --- robust aggregation (conf/strategy/) ----------------------------------------------------


def test_fedmedian_takes_the_coordinate_median_behind_the_same_checks():
    strategy = prepare(GuardedFedMedian(num_hospitals=4, min_replies=3), ONES)
    replies = [reply(1, 1.0, 10), reply(2, 2.0, 99), reply(3, 50.0, 10), reply(4, float("nan"), 1)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays["w"].dtype == "float32"
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), 2.0)
    assert list(strategy.report.rejected) == [4]


def test_fedtrimmedavg_drops_the_tails_unweighted():
    strategy = prepare(GuardedFedTrimmedAvg(num_hospitals=5, min_replies=5, beta=0.2), ONES)
    values = [1.0, 2.0, 3.0, 4.0, 100.0]
    replies = [reply(i + 1, v, 10 * (i + 1)) for i, v in enumerate(values)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), 3.0)
    assert "train-loss" in metrics


@pytest.mark.parametrize("kind", [GuardedFedAvg, GuardedFedMedian, GuardedFedTrimmedAvg])
def test_replies_with_other_metric_names_are_combined_by_every_aggregator(kind):
    strategy = prepare(kind(num_hospitals=3, min_replies=3), ONES)
    replies = [reply(1, 1.0, 10), reply(2, 1.2, 10), reply(3, 1.4, 10)]
    replies[2].content["metrics"]["val-extra"] = 0.5  # a hospital on a newer version
    del replies[1].content["metrics"]["train-loss"]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), 1.2, rtol=1e-6)
    assert metrics["train-loss"] == pytest.approx(1.2) and metrics["val-extra"] == 0.5
    assert strategy.report.rejected == {}


@pytest.mark.parametrize("name", ["fedavg", "fedtrimmedavg", "fedmedian"])
def test_build_strategy_follows_the_strategy_group(name):
    cfg = compose_config([f"strategy={name}"])
    strategy = build_strategy(cfg.strategy, num_hospitals=3, min_replies=2)
    assert strategy.name == name
    with pytest.raises(ValueError, match="unknown strategy"):
        build_strategy(OmegaConf.create({"name": "krum"}), num_hospitals=3, min_replies=2)


def test_a_node_that_never_answers_is_named_as_failed(caplog):
    # Past federation.round_timeout_s the grid returns fewer replies, not an error reply.
    strategy = _strategy(min_replies=3)
    strategy._remember([instruction(node) for node in (1, 2, 3)])
    with pytest.raises(TooFewRepliesError, match=r"failed nodes: \[3\]"):
        strategy.aggregate_train(1, [reply(1, 1.0, 10), reply(2, 2.0, 10)])
    assert strategy.report.failed == {3: "no reply within federation.round_timeout_s"}
    assert "node 3 failed in training" in caplog.text
    strategy.aggregate_evaluate(1, [reply(2, 2.0, 10)])
    assert sorted(strategy.report.evaluate_failed) == [1, 3]
