import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from omegaconf import OmegaConf

from client_app.privacy import privacy_mod
from common.arrays import array_specs, to_state_dict
from server_app.privacy import (
    GuardedClientSideClipping,
    GuardedServerSideClipping,
    privacy_settings,
    with_privacy,
)
from server_app.strategy import GuardedFedAvg, TooFewRepliesError
from tests.unit.test_strategy import GLOBAL, _instruction, _reply, _task_identity  # noqa: F401


def _wrapped(kind, min_replies: int, noise: float = 0.0, clip: float = 1.0):
    inner = GuardedFedAvg(num_hospitals=4, min_replies=min_replies)
    # configure_train records the global model's specs (and the server-side wrapper the global
    # model itself); set them as they would be.
    inner._reference = array_specs(GLOBAL)
    wrapper = kind(inner, noise_multiplier=noise, clipping_norm=clip, num_sampled_clients=4)
    wrapper.current_arrays = GLOBAL
    return inner, wrapper


def _failed(node: int) -> Message:
    return Message(
        Error(code=0, reason="HospitalDataError: 1 truncated_image"), reply_to=_instruction(node)
    )


@pytest.mark.parametrize("kind", [GuardedClientSideClipping, GuardedServerSideClipping])
def test_failed_and_bad_replies_are_dropped_before_the_dp_wrapper(kind, caplog):
    inner, wrapper = _wrapped(kind, min_replies=2, clip=100.0)
    replies = [
        _reply(1, 1.0, 10),
        _reply(2, 4.0, 30),
        _failed(3),
        _reply(4, float("nan"), 10),
        _reply(5, 9.0, 10, shape=(1,)),
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
        wrapper.aggregate_train(1, [_reply(1, 1.0, 10), _failed(2)])
    _, wrapper = _wrapped(kind, min_replies=1)
    with pytest.raises(TooFewRepliesError, match="0 good replies"):
        wrapper.aggregate_train(1, [_failed(1), _failed(2)])


def test_server_side_clipping_bounds_each_update():
    # Updates of norm 2 * 1 = 2 (four entries of 1.0) and 2 * 3 = 6, clipped to norm 1.
    _, wrapper = _wrapped(GuardedServerSideClipping, min_replies=2, clip=1.0)
    arrays, _ = wrapper.aggregate_train(1, [_reply(1, 1.0, 10), _reply(2, 3.0, 10)])
    np.testing.assert_allclose(to_state_dict(arrays)["w"].numpy(), 0.5, rtol=1e-6)


def test_server_noise_has_the_configured_scale():
    inner = GuardedFedAvg(num_hospitals=2, min_replies=2)
    zeros = ArrayRecord({"w": Array(np.zeros((200, 200), np.float32))})
    inner._reference = array_specs(zeros)
    wrapper = GuardedServerSideClipping(
        inner, noise_multiplier=2.0, clipping_norm=0.5, num_sampled_clients=2
    )
    wrapper.current_arrays = zeros

    def reply(node):
        # A tiny update, well inside the clipping norm (Flower divides by a zero update's norm).
        tiny = ArrayRecord({"w": Array(np.full((200, 200), 1e-6, np.float32))})
        content = RecordDict({"arrays": tiny, "metrics": _reply(node, 0.0, 10).content["metrics"]})
        return Message(content=content, reply_to=_instruction(node))

    arrays, _ = wrapper.aggregate_train(1, [reply(1), reply(2)])
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


def _train_message(clip: float | None) -> Message:
    config = ConfigRecord({"server-round": 1})
    if clip is not None:
        config[KEY_CLIPPING_NORM] = clip
    content = RecordDict({"arrays": GLOBAL.copy(), "config": config})
    return Message(content=content, dst_node_id=1, message_type="train")


def _context(overrides: str) -> Context:
    return Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"overrides": overrides}
    )


def _train(msg: Message, context: Context) -> Message:
    # An update of norm 2 * 3 = 6 from the all-zero global model.
    return _reply(1, 3.0, 10)


@pytest.mark.parametrize(("overrides", "expected"), [("privacy=client_clip", 0.25), ("", 3.0)])
def test_privacy_mod_clips_only_in_client_clip_runs(overrides, expected):
    clip = 0.5 if overrides else None
    reply = privacy_mod(_train_message(clip), _context(overrides), _train)
    assert not reply.has_error()
    np.testing.assert_allclose(to_state_dict(reply.content["arrays"])["w"].numpy(), expected)


def test_client_clip_without_a_clipping_norm_is_an_error_not_an_unclipped_update():
    reply = privacy_mod(_train_message(None), _context("privacy=client_clip"), _train)
    assert reply.has_error()
