"""client_app/app: site_private keeps file paths and patient ids out of the server's error."""

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client_app.app import HospitalDataError, SiteFailure, evaluate, site_private
from common.arrays import pack, to_array_record
from common.config import compose_config, parse_overrides
from common.data import hospital_split
from common.model import create_mct_model

pytestmark = pytest.mark.usefixtures("task_identity")


def test_site_private_keeps_paths_and_ids_out_of_the_error(caplog):
    @site_private
    def train(msg, context):
        raise FileNotFoundError("/data/hospital/patient_JaneRoe_77.bmp")

    with pytest.raises(SiteFailure) as raised:
        train(None, None)
    text = str(raised.value)
    assert "FileNotFoundError" in text and "train" in text
    assert "JaneRoe" not in text and "/data" not in text
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert "patient_JaneRoe_77.bmp" in caplog.text  # the full story stays in the site's log


def _evaluate_message(
    overrides: str, server_round: int, node: dict | None = None, weights: dict | None = None
) -> tuple[Message, Context]:
    cfg = compose_config(parse_overrides(overrides))
    built = create_mct_model(cfg.model, len(cfg.data.classes), load_pretrained=False)
    model = to_array_record({**built.state_dict(), **(weights or {})})
    config = ConfigRecord({"server-round": server_round})
    message = Message(
        content=RecordDict({"arrays": pack(model), "config": config}),
        dst_node_id=1,
        message_type="evaluate",
    )
    node = {"partition-id": 1, "num-partitions": 3} if node is None else node
    context = Context(1, 1, node, RecordDict(), {"overrides": overrides})
    return message, context


def test_a_hospital_without_a_validation_image_is_named_with_the_reason():
    # One image per class: all five go to training.
    message, context = _evaluate_message(
        "model.img_size=32 data.hospitals.hospital_b.num_images=5", 3
    )
    with pytest.raises(HospitalDataError, match="hospital hospital_b: its val split holds no"):
        evaluate(message, context)


def test_an_empty_split_of_a_cross_validation_names_the_folds_as_the_remedy():
    # Ten folds of six images: fold 7 validates on fold 8, which gets no image.
    overrides = "model.img_size=32 data.hospitals.hospital_b.num_images=6 data.split.folds=10"
    message, context = _evaluate_message(f"{overrides} data.split.fold=7", 3)
    with pytest.raises(HospitalDataError, match="or set fewer data.split.folds"):
        evaluate(message, context)


def test_a_hospital_needs_no_copy_of_the_weights_file_the_server_started_from(tmp_path):
    # The run's config names the server's DeiT file; the hospital receives the global model.
    elsewhere = tmp_path / "on-the-server" / "deit_small.pth"
    message, context = _evaluate_message(f"model.img_size=32 model.pretrained_file={elsewhere}", 2)
    reply = evaluate(message, context)
    assert "val-accuracy" in reply.content["metrics"]


def test_a_failure_at_a_site_names_the_hospital_phase_and_round_in_its_log(caplog, monkeypatch):
    def diverged(*args, **kwargs):
        raise FloatingPointError("training loss became nan")

    monkeypatch.setattr("client_app.app.evaluate_local", diverged)
    message, context = _evaluate_message("model.img_size=32", 4)
    with pytest.raises(SiteFailure):
        evaluate(message, context)
    assert "evaluate failed at this site (hospital hospital_b, mct round 4)" in caplog.text


def test_a_global_model_with_nan_weights_is_refused_not_evaluated(caplog):
    # Evaluated, it gave believable accuracies beside a NaN loss.
    weights = {"head.weight": torch.full((5, 96, 3, 3), torch.nan)}
    message, context = _evaluate_message("model.img_size=32", 2, weights=weights)
    with pytest.raises(SiteFailure, match="evaluate failed with ValueError"):
        evaluate(message, context)
    assert "the global model received: 1 not finite (NaN or infinite values)" in caplog.text


def test_a_hospital_scores_with_the_label_shift_of_its_own_training_labels():
    # A patch-CAM head that favours no class: the shift alone names the site's commonest class.
    zero = {"head.weight": torch.zeros(5, 96, 3, 3), "head.bias": torch.zeros(5)}
    overrides = "model.img_size=32 train.logit_adjustment=1"
    message, context = _evaluate_message(overrides, 2, weights=zero)
    metrics = evaluate(message, context).content["metrics"]
    cfg = compose_config(parse_overrides(overrides))
    commonest = int(np.bincount(hospital_split(cfg.data, "hospital_b", "train").labels).argmax())
    val = hospital_split(cfg.data, "hospital_b", "val").labels
    assert metrics["val-cam-accuracy"] == pytest.approx(float(np.mean(val == commonest)))


def test_a_supernode_whose_node_config_names_no_hospital_is_told_how_to_start(caplog):
    message, context = _evaluate_message("model.img_size=32", 2, node={"data-root": "/data"})
    with pytest.raises(SiteFailure):
        evaluate(message, context)
    assert "node config names no hospital: start it with --node-config 'hospital=" in caplog.text
