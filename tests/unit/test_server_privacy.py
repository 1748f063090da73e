"""server_app/privacy: the DP wrappers drop failed and bad replies first; privacy settings."""

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, RecordDict
from omegaconf import OmegaConf

from common.arrays import array_specs, to_state_dict
from server_app.privacy import (
    GuardedClientSideClipping,
    GuardedServerSideClipping,
    privacy_settings,
    with_privacy,
)
from server_app.strategy import GuardedFedAvg, TooFewRepliesError
from tests.replies import GLOBAL, failed, instruction, reply

pytestmark = pytest.mark.usefixtures("task_identity")


def _wrapped(kind, min_replies: int, noise: float = 0.0, clip: float = 1.0):
    inner = GuardedFedAvg(num_hospitals=4, min_replies=min_replies)
    # configure_train records the global model's specs (and the server-side wrapper the global
    # model itself); set them as they would be.
    inner._reference = array_specs(GLOBAL)
    wrapper = kind(inner, noise_multiplier=noise, clipping_norm=clip, num_sampled_clients=4)
    wrapper.current_arrays = GLOBAL
    return inner, wrapper


@pytest.mark.parametrize("kind", [GuardedClientSideClipping, GuardedServerSideClipping])
def test_failed_and_bad_replies_are_dropped_before_the_dp_wrapper(kind, caplog):
    inner, wrapper = _wrapped(kind, min_replies=2, clip=100.0)
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
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), (1 * 10 + 4 * 30) / 40)
    assert metrics["train-loss"] == pytest.approx((1 * 10 + 4 * 30) / 40)
    assert inner.report.good == 2
    assert sorted(inner.report.failed) == [3]
    assert sorted(inner.report.rejected) == [4, 5]
    assert "node 3 failed" in caplog.text


@pytest.mark.parametrize("kind", [GuardedClientSideClipping, GuardedServerSideClipping])
def test_a_round_short_of_min_replies_stops_the_run(kind):
    _, wrapper = _wrapped(kind, min_replies=2)
    with pytest.raises(TooFewRepliesError, match="1 good replies, at least 2"):
        wrapper.aggregate_train(1, [reply(1, 1.0, 10), failed(2)])
    _, wrapper = _wrapped(kind, min_replies=1)
    with pytest.raises(TooFewRepliesError, match="0 good replies"):
        wrapper.aggregate_train(1, [failed(1), failed(2)])


def test_server_side_clipping_bounds_each_update():
    # Updates of norm 2 * 1 = 2 (four entries of 1.0) and 2 * 3 = 6, clipped to norm 1.
    _, wrapper = _wrapped(GuardedServerSideClipping, min_replies=2, clip=1.0)
    arrays, _ = wrapper.aggregate_train(1, [reply(1, 1.0, 10), reply(2, 3.0, 10)])
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), 0.5, rtol=1e-6)


def test_server_noise_has_the_configured_scale():
    inner = GuardedFedAvg(num_hospitals=2, min_replies=2)
    zeros = ArrayRecord({"w": Array(np.zeros((200, 200), np.float32))})
    inner._reference = array_specs(zeros)
    wrapper = GuardedServerSideClipping(
        inner, noise_multiplier=2.0, clipping_norm=0.5, num_sampled_clients=2
    )
    wrapper.current_arrays = zeros

    def tiny_reply(node):
        # A tiny update, well inside the clipping norm (Flower divides by a zero update's norm).
        tiny = ArrayRecord({"w": Array(np.full((200, 200), 1e-6, np.float32))})
        content = RecordDict({"arrays": tiny, "metrics": reply(node, 0.0, 10).content["metrics"]})
        return Message(content=content, reply_to=instruction(node))

    arrays, _ = wrapper.aggregate_train(1, [tiny_reply(1), tiny_reply(2)])
    noise = to_state_dict(arrays)["w"].numpy()
    assert noise.std() == pytest.approx(2.0 * 0.5 / 2, rel=0.02)


def test_privacy_settings_default_to_every_hospital_and_are_written(tmp_path):
    cfg = OmegaConf.create(
        {
            "name": "server_clip",
            "noise_multiplier": 1.0,
            "clipping_norm": 0.3,
            "num_sampled_clients": None,
        }
    )
    settings = privacy_settings(cfg, num_hospitals=3)
    assert settings["num_sampled_clients"] == 3
    assert settings["noise_stdev"] == pytest.approx(0.1)
    strategy = with_privacy(GuardedFedAvg(num_hospitals=3, min_replies=3), cfg, 3, tmp_path)
    assert isinstance(strategy, GuardedServerSideClipping)
    assert json.loads((tmp_path / "privacy.json").read_text()) == settings
    none = OmegaConf.create({"name": "none"})
    plain = GuardedFedAvg(num_hospitals=3, min_replies=3)
    assert with_privacy(plain, none, 3, tmp_path) is plain
    with pytest.raises(ValueError, match="unknown privacy option"):
        privacy_settings(OmegaConf.create({"name": "local_dp"}), 3)
