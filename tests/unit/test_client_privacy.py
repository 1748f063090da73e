"""client_app/privacy: privacy_mod clips the update only in client_clip runs."""

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client_app.privacy import privacy_mod
from common.arrays import array_specs, cast_floating, pack, to_state_dict, unpack
from tests.replies import GLOBAL, reply

pytestmark = pytest.mark.usefixtures("task_identity")


def _train_message(clip: float | None) -> Message:
    config = ConfigRecord({"server-round": 1})
    if clip is not None:
        config[KEY_CLIPPING_NORM] = clip
    content = RecordDict({"arrays": pack(GLOBAL), "config": config})
    return Message(content=content, dst_node_id=1, message_type="train")


def _context(overrides: str) -> Context:
    return Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"overrides": overrides}
    )


def _train(msg: Message, context: Context) -> Message:
    # An update of norm 2 * 3 = 6 from the all-zero global model.
    return reply(1, 3.0, 10)


@pytest.mark.parametrize(("overrides", "expected"), [("privacy=client_clip", 0.25), ("", 3.0)])
def test_privacy_mod_clips_only_in_client_clip_runs(overrides, expected):
    clip = 0.5 if overrides else None
    answer = privacy_mod(_train_message(clip), _context(overrides), _train)
    assert not answer.has_error()
    update = unpack(answer.content["arrays"], array_specs(GLOBAL))
    np.testing.assert_allclose(to_state_dict(update)["w"].numpy(), expected)


def test_client_clip_without_a_clipping_norm_is_an_error_not_an_unclipped_update():
    answer = privacy_mod(_train_message(None), _context("privacy=client_clip"), _train)
    assert answer.has_error() and "'clipping_norm'" in answer.error.reason


def test_a_clipped_half_precision_reply_stays_half_precision():
    # Clipping adds the update to the float32 global model; the upload must stay float16.
    def train16(msg: Message, context: Context) -> Message:
        answer = reply(1, 3.0, 10)
        answer.content["arrays"] = cast_floating(answer.content["arrays"], "float16")
        return answer

    overrides = "privacy=client_clip federation.transport_dtype=float16"
    answer = privacy_mod(_train_message(0.5), _context(overrides), train16)
    assert answer.content["arrays"]["floating"].dtype == "float16"
    update = unpack(answer.content["arrays"], array_specs(GLOBAL))
    np.testing.assert_allclose(to_state_dict(update)["w"].numpy(), 0.25)
