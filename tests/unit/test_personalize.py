"""post_training/personalize: the site's fine-tune settings, its refusals and the model it keeps."""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.config import compose_config
from common.errors import JobError
from common.model import create_mct_model
from post_training.personalize import SiteMaps, fine_tuned_model, kept_model, personal_train_config
from post_training.stages import Stage
from tests.unit.test_stages import val_evaluation

SYNTHETIC = [
    "data.hospitals.hospital_a.num_images=12",
    "data.hospitals.hospital_a.image_size=48",
]


def _run_payload(run_overrides: list[str]) -> dict:
    run = compose_config([*SYNTHETIC, "model.img_size=32", *run_overrides])
    return {"config": OmegaConf.to_yaml(run), "round": 3}


def _job(*overrides: str):
    return compose_config(
        [*SYNTHETIC, "checkpoint=/x/final_model.pt", "hospital=hospital_a", *overrides],
        config_name="postprocess",
    )


def test_the_fine_tune_takes_the_runs_settings_with_the_sites_own_and_personalize_train_over():
    payload = _run_payload(
        ["+train.per_hospital.hospital_a.lr=0.5", "train.augment.crop_scale=[0.3,1.0]"]
    )
    merged = personal_train_config(payload, _job("+personalize.train.batch_size=4"), "hospital_a")
    assert merged["lr"] == 0.5  # the site's own setting in the run
    assert merged["augment"]["crop_scale"] == [0.3, 1.0]  # the run's
    assert merged["batch_size"] == 4  # personalize.train
    assert merged["levers"]["foreground"]["compact"] == 1.0  # the shipped default
    # another site of the same run trains with the shared settings
    assert personal_train_config(payload, _job(), "hospital_b")["lr"] == 1.0e-3


def test_a_run_of_the_old_randaugment_scale_is_named_before_the_fine_tune():
    # Trained when the magnitude was read on torchvision's 31 levels (15 was valid then).
    old = ["train.augment.randaugment_ops=2", "train.augment.randaugment_magnitude=15"]
    payload = _run_payload(old)
    with pytest.raises(JobError, match="personalize: the fine-tune takes the run's .*=15"):
        personal_train_config(payload, _job(), "hospital_a")
    fixed = _job("+personalize.train.augment.randaugment_magnitude=9")
    assert personal_train_config(payload, fixed, "hospital_a")["augment"]["randaugment_ops"] == 2


def test_the_fine_tune_refuses_unknown_keys_a_file_without_config_and_a_headless_model():
    payload = _run_payload([])
    with pytest.raises(JobError, match="personalize.train: .*not_a_key"):
        personal_train_config(payload, _job("+personalize.train.not_a_key=1"), "hospital_a")
    with pytest.raises(JobError, match="no training config.*personalize.epochs=0"):
        personal_train_config({"round": 1}, _job(), "hospital_a")

    cfg = _job("personalize.epochs=1")
    run = OmegaConf.create(payload["config"])
    headless = create_mct_model({**run.model, "foreground_head": False}, num_classes=5)
    with pytest.raises(JobError, match="foreground_head.*personalize.epochs=0"):
        fine_tuned_model(headless, payload, cfg, "hospital_a", torch.device("cpu"))


def test_the_fine_tune_moves_a_copy_and_leaves_the_global_model():
    payload = _run_payload([])
    run = OmegaConf.create(payload["config"])
    torch.manual_seed(0)
    model = create_mct_model(run.model, num_classes=5).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = _job("personalize.epochs=1", "personalize.min_steps=5", "+personalize.train.batch_size=4")
    tuned, result = fine_tuned_model(model, payload, cfg, "hospital_a", torch.device("cpu"))
    assert result.num_examples == 8 and np.isfinite(result.loss) and not tuned.training
    assert result.epochs == 3  # 2 steps per epoch: raised from 1 epoch to reach 5 steps
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(tuned.fg_head.weight, model.fg_head.weight)


def test_copies_fine_tune_with_their_own_seeds_and_average_into_one_model():
    payload = _run_payload([])
    run = OmegaConf.create(payload["config"])
    torch.manual_seed(0)
    model = create_mct_model(run.model, num_classes=5).eval()
    short = ("personalize.epochs=1", "personalize.min_steps=0", "+personalize.train.batch_size=4")
    cpu = torch.device("cpu")

    def fine_tuned(*overrides: str):
        return fine_tuned_model(model, payload, _job(*short, *overrides), "hospital_a", cpu)

    first, second = (
        fine_tuned(f"seed={seed}", "personalize.copies=1")[0].state_dict() for seed in (7, 8)
    )
    soup, result = fine_tuned("seed=7", "personalize.copies=2")
    assert not torch.equal(first["fg_head.weight"], second["fg_head.weight"])  # seeds differ
    for key, value in soup.state_dict().items():
        expected = (first[key].double() + second[key].double()) / 2
        assert torch.allclose(value.double(), expected, atol=1e-6), key
    assert result.epochs == 1 and np.isfinite(result.loss) and not soup.training


def _maps(labels: list[np.ndarray]) -> SiteMaps:
    return SiteMaps({}, Stage("maps", "maps", {}, {}, 0.0), {"val": labels})


def test_the_model_kept_is_the_one_whose_validation_maps_are_better():
    truth = np.zeros((8, 8), np.uint8)
    truth[2:6, 2:6] = 1
    right, wrong = _maps([truth]), _maps([np.ones_like(truth)])
    assert kept_model({"global": wrong, "personalized": right}, val_evaluation([truth])) == (
        "personalized"
    )
    assert kept_model({"global": right, "personalized": wrong}, val_evaluation([truth])) == "global"
    # a tie keeps the global model
    assert kept_model({"global": right, "personalized": right}, val_evaluation([truth])) == "global"
    # without ground truth the configured fine-tune is used
    assert kept_model({"global": right, "personalized": wrong}, val_evaluation(None)) == (
        "personalized"
    )
