"""server_app/privacy: screening, clipping, calibrated noise and the ε accountant."""

import json
import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message
from omegaconf import OmegaConf
from scipy.optimize import brentq
from scipy.stats import norm

from common.arrays import pack, to_state_dict
from server_app.privacy import (
    GuardedClientSideClipping,
    GuardedServerSideClipping,
    PrivacyLedger,
    privacy_settings,
    with_privacy,
)
from server_app.strategy import GuardedFedAvg, GuardedFedMedian, Guards, TooFewRepliesError
from tests.replies import GLOBAL, failed, instruction, prepare, reply

pytestmark = pytest.mark.usefixtures("task_identity")


def _config(name: str, noise: float, clip: float, delta: float = 1e-5):
    return OmegaConf.create(
        {"name": name, "noise_multiplier": noise, "clipping_norm": clip, "delta": delta}
    )


def _wrapped(name: str, min_replies: int, tmp_path, noise=0.0, clip=1.0, hospitals=4, model=None):
    inner = GuardedFedAvg(num_hospitals=hospitals, min_replies=min_replies)
    wrapper = with_privacy(inner, _config(name, noise, clip), hospitals, tmp_path)
    # configure_train records the global model; set it as it would be.
    prepare(inner, GLOBAL if model is None else model)
    wrapper.current_arrays = inner._global
    return inner, wrapper


def _update_reply(node: int, update: np.ndarray, weight) -> Message:
    """A reply whose array is ``update`` (the global model of these tests is zero)."""
    content = reply(node, 0.0, weight).content
    content["arrays"] = pack(ArrayRecord({"w": Array(update.astype(np.float32))}))
    return Message(content=content, reply_to=instruction(node))


@pytest.mark.parametrize("name", ["client_clip", "server_clip"])
def test_failed_and_bad_replies_are_dropped_before_clipping(name, tmp_path, caplog):
    inner, wrapper = _wrapped(name, min_replies=2, tmp_path=tmp_path, clip=100.0, hospitals=5)
    replies = [
        reply(1, 1.0, 10),
        reply(2, 4.0, 30),
        failed(3),
        reply(4, float("nan"), 10),
        reply(5, 9.0, 10, shape=(1,)),
    ]
    arrays, metrics = wrapper.aggregate_train(1, replies)
    # Flower's own wrapper returns (None, None) here and keeps the old model.
    assert arrays is not None
    # Equal weights over the 5 asked: (1 + 4) / 5, not the num-examples-weighted 3.25.
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), 1.0)
    assert metrics["train-loss"] == pytest.approx((1 * 10 + 4 * 30) / 40)
    assert inner.report.good == 2
    assert sorted(inner.report.failed) == [3]
    assert sorted(inner.report.rejected) == [4, 5]
    assert "node 3 failed" in caplog.text


@pytest.mark.parametrize("name", ["client_clip", "server_clip"])
def test_a_round_short_of_min_replies_stops_the_run(name, tmp_path):
    _, wrapper = _wrapped(name, min_replies=2, tmp_path=tmp_path)
    with pytest.raises(TooFewRepliesError, match="1 good replies, at least 2"):
        wrapper.aggregate_train(1, [reply(1, 0.1, 10), failed(2)])
    _, wrapper = _wrapped(name, min_replies=1, tmp_path=tmp_path)
    with pytest.raises(TooFewRepliesError, match="0 good replies"):
        wrapper.aggregate_train(1, [failed(1), failed(2)])


def test_server_side_clipping_bounds_each_update(tmp_path):
    # Updates of norm 2 * 1 = 2 (four entries of 1.0) and 2 * 3 = 6, clipped to norm 1.
    _, wrapper = _wrapped("server_clip", min_replies=2, tmp_path=tmp_path, clip=1.0, hospitals=2)
    arrays, _ = wrapper.aggregate_train(1, [reply(1, 1.0, 10), reply(2, 3.0, 10)])
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), 0.5, rtol=1e-6)


def test_an_update_equal_to_the_global_model_is_no_division_by_zero(tmp_path):
    # Flower's clipping divided by the update's norm: ZeroDivisionError out of aggregate_train.
    _, wrapper = _wrapped("server_clip", min_replies=2, tmp_path=tmp_path, clip=1.0, hospitals=2)
    arrays, _ = wrapper.aggregate_train(1, [reply(1, 0.0, 10), reply(2, 1.0, 10)])
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), 0.25, rtol=1e-6)


@pytest.mark.parametrize("name", ["client_clip", "server_clip"])
def test_one_hospital_moves_the_release_by_at_most_clip_over_the_hospitals_asked(name, tmp_path):
    # Neighbouring runs: with and without the first hospital (add or remove one). Its update
    # points against the other's; 91 and 31 images would give it 0.746 of a weighted mean.
    clip, hospitals = 1.0, 3
    first = np.full((2, 2), 0.5)  # norm 1.0 = C: within the bound at both options
    released = []
    for with_first in (True, False):
        replies = [_update_reply(1, first, 91)] if with_first else []
        _, wrapper = _wrapped(name, 1, tmp_path, clip=clip, hospitals=hospitals)
        arrays, _ = wrapper.aggregate_train(1, [*replies, _update_reply(2, -first, 31)])
        released.append(to_state_dict(arrays)["w"].numpy().astype(np.float64))
    # Dividing by the replies instead: 0 with both, -C / 1 without the first, a distance of C.
    moved = float(np.linalg.norm(released[0] - released[1]))
    assert moved == pytest.approx(clip / hospitals, rel=1e-6)


def test_client_clip_rejects_an_update_the_hospital_did_not_clip(tmp_path):
    inner, wrapper = _wrapped("client_clip", min_replies=1, tmp_path=tmp_path, clip=1.0)
    wrapper.aggregate_train(1, [reply(1, 0.1, 10), reply(2, 3.0, 10)])
    assert list(inner.report.rejected) == [2]
    assert "exceeds the clipping norm" in inner.report.rejected[2]


def test_client_clip_allows_for_the_rounding_of_a_half_precision_reply(tmp_path):
    rng = np.random.default_rng(0)
    model = rng.normal(0.0, 1.0, (64, 64)).astype(np.float32)
    update = rng.normal(0.0, 1.0, (64, 64))
    clip = 0.01
    sent = (model + clip * update / np.linalg.norm(update)).astype(np.float16)  # clipped, rounded
    assert np.linalg.norm(sent.astype(np.float64) - model) > 1.01 * clip
    for dtype in ("float32", "float16"):
        inner = GuardedFedAvg(num_hospitals=1, min_replies=1, transport_dtype=dtype)
        (tmp_path / dtype).mkdir()
        wrapper = with_privacy(inner, _config("client_clip", 0.0, clip), 1, tmp_path / dtype)
        prepare(inner, ArrayRecord({"w": Array(model)}))
        wrapper.current_arrays = inner._global
        content = reply(1, 0.0, 10).content
        content["arrays"] = pack(ArrayRecord({"w": Array(sent.astype(dtype))}))
        replies = [Message(content=content, reply_to=instruction(1))]
        if dtype == "float32":  # full precision: over the bound, the hospital did not clip
            with pytest.raises(TooFewRepliesError):
                wrapper.aggregate_train(1, replies)
            continue
        arrays, _ = wrapper.aggregate_train(1, replies)
        moved = to_state_dict(arrays)["w"].numpy().astype(np.float64) - model
        assert np.linalg.norm(moved) == pytest.approx(clip, rel=1e-3)  # clipped here anyway


def _noise_of(wrapper, replies: int) -> float:
    tiny = np.full((200, 200), 1e-6)
    arrays, _ = wrapper.aggregate_train(1, [_update_reply(i + 1, tiny, 10) for i in range(replies)])
    return float(to_state_dict(arrays)["w"].numpy().std())


def test_the_noise_is_that_of_the_hospitals_asked_however_many_reply(tmp_path):
    zeros = ArrayRecord({"w": Array(np.zeros((200, 200), np.float32))})
    # 4 hospitals asked, 2 reply: the noise must not tell how many took part.
    for replies in (2, 4):
        _, wrapper = _wrapped("server_clip", 2, tmp_path, noise=2.0, clip=0.5, model=zeros)
        assert _noise_of(wrapper, replies) == pytest.approx(2.0 * 0.5 / 4, rel=0.02)
    record = json.loads((tmp_path / "privacy.json").read_text())
    assert record["rounds"] == [
        {"round": 1, "replies": 4, "noise_stdev": 0.25, "noise_multiplier": 2.0}
    ]


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact ε of a mu-GDP mechanism at ``delta`` (Dong, Roth & Su 2019): a lower bound for RDP."""

    def excess(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    return brentq(excess, 0.0, 500.0)


def test_epsilon_is_accounted_over_rounds_and_survives_a_resume(tmp_path):
    settings = privacy_settings(_config("server_clip", noise=1.0, clip=0.2), num_hospitals=3)
    ledger = PrivacyLedger(settings, tmp_path / "privacy.json")
    for server_round in (1, 2, 3, 4):
        ledger.release(server_round, replies=3 if server_round < 4 else 2, noise_stdev=0.1)
    epsilon = ledger.epsilon()
    # Four Gaussian releases of noise multiplier 1 compose to sqrt(4)/1 = 2-GDP exactly; the RDP
    # accountant is an upper bound on that, and below the classic RDP conversion.
    exact = _gaussian_epsilon(mu=2.0, delta=1e-5)
    classic = min(4 * a / 2 + math.log(1 / 1e-5) / (a - 1) for a in np.linspace(1.1, 100, 5000))
    assert exact <= epsilon <= classic
    record = json.loads((tmp_path / "privacy.json").read_text())
    assert record["epsilon"] == pytest.approx(epsilon) and record["delta"] == 1e-5
    assert [r["replies"] for r in record["rounds"]] == [3, 3, 3, 2]

    # Resumed from round 2's checkpoint: every release already recorded still counts.
    recorded = json.loads((tmp_path / "privacy.json").read_text())
    resumed = PrivacyLedger(settings, tmp_path / "privacy.json", recorded)
    assert resumed.epsilon() == pytest.approx(epsilon)


def _ledger(tmp_path, noise: float, resumed: bool = False) -> PrivacyLedger:
    settings = privacy_settings(_config("server_clip", noise=noise, clip=0.2), num_hospitals=3)
    path = tmp_path / "privacy.json"
    return PrivacyLedger(settings, path, json.loads(path.read_text()) if resumed else None)


def test_a_round_redone_after_a_resume_counts_both_releases(tmp_path):
    # Round 3's noisy model went to every hospital for evaluation, then the server died before
    # round 3's checkpoint: the resumed run redoes round 3, and both models were seen.
    ledger = _ledger(tmp_path, noise=0.5)
    for server_round in (1, 2, 3):
        ledger.release(server_round, 3, 0.5 * 0.2 / 3)
    three = ledger.epsilon()
    resumed = _ledger(tmp_path, noise=0.5, resumed=True)
    assert resumed.epsilon() == pytest.approx(three)
    resumed.release(3, 3, 0.5 * 0.2 / 3)
    assert [r["round"] for r in resumed.rounds] == [1, 2, 3, 3]
    assert resumed.epsilon() > three
    assert len(json.loads((tmp_path / "privacy.json").read_text())["rounds"]) == 4
    # A fresh run in the same directory starts its own ledger.
    assert _ledger(tmp_path, noise=0.5).rounds == []
    assert json.loads((tmp_path / "privacy.json").read_text())["rounds"] == []


def test_each_release_keeps_the_noise_multiplier_it_was_made_with(tmp_path):
    ledger = _ledger(tmp_path, noise=0.5)
    ledger.release(1, 3, 0.5 * 0.2 / 3)
    ledger.release(2, 3, 0.5 * 0.2 / 3)
    spent = ledger.epsilon()
    # Resumed with more noise: the two releases at z = 0.5 keep their price.
    resumed = _ledger(tmp_path, noise=5.0, resumed=True)
    assert resumed.epsilon() == pytest.approx(spent)
    resumed.release(3, 3, 5.0 * 0.2 / 3)
    record = json.loads((tmp_path / "privacy.json").read_text())
    assert [r["noise_multiplier"] for r in record["rounds"]] == [0.5, 0.5, 5.0]
    assert record["noise_multiplier"] == 5.0 and record["epsilon"] > spent
    # A release without noise has no finite ε, whatever came before or after.
    unbounded = _ledger(tmp_path, noise=0.0, resumed=True)
    unbounded.release(4, 3, 0.0)
    assert unbounded.epsilon() is None
    assert _ledger(tmp_path, noise=1.0, resumed=True).epsilon() is None


def test_a_ledger_written_before_per_release_multipliers_reads_the_file_s_one(tmp_path):
    old = {"noise_multiplier": 0.5, "rounds": [{"round": 1, "replies": 3, "noise_stdev": 0.03}]}
    (tmp_path / "privacy.json").write_text(json.dumps(old))
    resumed = _ledger(tmp_path, noise=5.0, resumed=True)
    assert resumed.rounds[0]["noise_multiplier"] == 0.5
    (tmp_path / "fresh").mkdir()
    fresh = _ledger(tmp_path / "fresh", noise=0.5)
    fresh.release(1, 3, 0.03)
    assert resumed.epsilon() == pytest.approx(fresh.epsilon())


@pytest.mark.parametrize(("before", "after"), [("none", "server_clip"), ("client_clip", "none")])
def test_a_resume_cannot_switch_privacy_on_or_off(tmp_path, before, after):
    with_privacy(
        GuardedFedAvg(num_hospitals=3, min_replies=3), _config(before, 1.0, 0.2), 3, tmp_path
    )
    recorded = (tmp_path / "privacy.json").read_text()
    with pytest.raises(ValueError, match=f"records privacy={before}, the config asks for"):
        with_privacy(
            GuardedFedAvg(num_hospitals=3, min_replies=3),
            _config(after, 1.0, 0.2),
            3,
            tmp_path,
            resumed=True,
        )
    assert (tmp_path / "privacy.json").read_text() == recorded
    switched = _config("server_clip" if before == "client_clip" else before, 1.0, 0.2)
    with_privacy(GuardedFedAvg(num_hospitals=3, min_replies=3), switched, 3, tmp_path, resumed=True)


def test_no_noise_means_no_finite_epsilon(tmp_path):
    settings = privacy_settings(_config("client_clip", noise=0.0, clip=0.2), num_hospitals=3)
    ledger = PrivacyLedger(settings, tmp_path / "privacy.json")
    ledger.release(1, 3, 0.0)
    assert ledger.epsilon() is None
    assert json.loads((tmp_path / "privacy.json").read_text())["epsilon"] is None


def test_privacy_settings_are_written_and_validated(tmp_path):
    cfg = _config("server_clip", noise=1.0, clip=0.3)
    settings = privacy_settings(cfg, num_hospitals=3)
    assert settings["hospitals"] == 3 and settings["delta"] == 1e-5
    strategy = with_privacy(GuardedFedAvg(num_hospitals=3, min_replies=3), cfg, 3, tmp_path)
    assert isinstance(strategy, GuardedServerSideClipping)
    assert strategy.strategy.uniform_weights
    record = json.loads((tmp_path / "privacy.json").read_text())
    assert record["epsilon"] == 0.0 and record["rounds"] == []
    none = OmegaConf.create({"name": "none"})
    plain = GuardedFedAvg(num_hospitals=3, min_replies=3)
    assert with_privacy(plain, none, 3, tmp_path) is plain
    with pytest.raises(ValueError, match="unknown privacy option"):
        privacy_settings(OmegaConf.create({"name": "local_dp"}), 3)
    with pytest.raises(ValueError, match="needs strategy=fedavg"):
        with_privacy(GuardedFedMedian(num_hospitals=3, min_replies=3), cfg, 3, tmp_path)
    client = _config("client_clip", noise=1.0, clip=0.3)
    wrapped = with_privacy(GuardedFedAvg(num_hospitals=3, min_replies=3), client, 3, tmp_path)
    assert isinstance(wrapped, GuardedClientSideClipping)


def test_privacy_averages_with_equal_weights_and_caps_no_num_examples(tmp_path):
    inner = GuardedFedAvg(num_hospitals=2, min_replies=2, guards=Guards(max_examples_growth=1.0))
    with_privacy(inner, _config("server_clip", 0.0, 1.0), 2, tmp_path)
    prepare(inner)
    inner.screen_train(1, [reply(1, 0.1, 10), reply(2, 0.1, 10)])
    prepare(inner)
    inner.screen_train(2, [reply(1, 0.1, 10), reply(2, 0.1, 12)])
    assert inner.report.capped == {}
    assert inner.uniform_weights


def test_privacy_clips_an_update_out_of_line_with_the_others_instead_of_rejecting_it(tmp_path):
    # Rejected by the peer-norm guard, one hospital's inclusion would hang on the others'
    # updates, which the accounting does not cover.
    def replies() -> list[Message]:
        return [reply(1, 0.1, 10), reply(2, 0.1, 10), reply(3, 3.0, 10)]  # 30 x the median

    plain = GuardedFedAvg(num_hospitals=3, min_replies=2, guards=Guards(max_update_norm_ratio=10.0))
    prepare(plain)
    assert len(plain.screen_train(1, replies())) == 2 and set(plain.report.rejected) == {3}
    inner = GuardedFedAvg(num_hospitals=3, min_replies=2, guards=Guards(max_update_norm_ratio=10.0))
    with_privacy(inner, _config("server_clip", 0.0, 1.0), 3, tmp_path)
    prepare(inner)
    assert len(inner.screen_train(1, replies())) == 3 and inner.report.rejected == {}


def test_a_resume_refuses_a_damaged_ledger_naming_it_and_keeps_it(tmp_path):
    (tmp_path / "privacy.json").write_text('{"name": "server_clip", "rounds": [{"round": 1')
    with pytest.raises(ValueError, match="privacy.json is not valid JSON"):
        with_privacy(
            GuardedFedAvg(num_hospitals=3, min_replies=3),
            _config("server_clip", 1.0, 0.2),
            3,
            tmp_path,
            resumed=True,
        )
    assert (tmp_path / "privacy.json").read_text().endswith('"round": 1')
