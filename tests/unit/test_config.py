"""Real Hydra composition of every config group, as the apps and the launcher do it."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from common.config import CONF_DIR, compose_config, number_setting, parse_overrides
from common.data import hospital_names
from common.errors import JobError


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group",
    ["model", "data", "train", "pretrain", "federation", "strategy", "localization", "privacy"],
)
def test_every_option_of_every_group_composes_to_its_own_settings(group):
    composed = [compose_config([f"{group}={option}"])[group] for option in _options(group)]
    assert composed and all(
        composed[i] != composed[j] for i in range(len(composed)) for j in range(i)
    )


def test_default_is_three_synthetic_hospitals_on_the_tiny_model():
    cfg = compose_config([])
    assert hospital_names(cfg.data) == ["hospital_a", "hospital_b", "hospital_c"]
    assert cfg.model.name == "mct_tiny_patch8_96"
    assert cfg.output_dir is None and Path(cfg.output_root).is_absolute()


def test_paper_experiment_is_deit_small_224_batch_64_45_rounds():
    cfg = compose_config(["experiment=paper"])
    assert cfg.model.name == "mct_deit_small_patch16_224" and cfg.model.img_size == 224
    assert cfg.train.batch_size == 64 and cfg.federation.rounds == 45


def test_unknown_override_is_refused():
    with pytest.raises(ConfigCompositionException):
        compose_config(["model=no_such_model"])


def test_run_config_overrides_round_trip_through_shell_quoting():
    text = "data=wbc_zxaoyou 'data.root=/a path/with spaces' federation.rounds=2"
    assert parse_overrides(text) == [
        "data=wbc_zxaoyou",
        "data.root=/a path/with spaces",
        "federation.rounds=2",
    ]


def test_a_setting_that_is_not_a_number_is_named():
    cfg = compose_config(["federation.rounds=3", "train.lr=2e-4", "seed=1O"])
    assert number_setting(cfg, "federation.rounds", whole=True) == 3
    assert number_setting(cfg, "train.lr") == pytest.approx(2e-4)
    with pytest.raises(JobError, match="seed=1O: expected a whole number"):
        number_setting(cfg, "seed", whole=True)
    refused = [("train.lr=true", False), ("train.lr=fast", False)]
    refused += [("train.local_epochs=2.5", True), ("train.local_epochs=null", True)]
    for override, whole in refused:
        key = override.split("=")[0]
        with pytest.raises(JobError, match=f"{key}=.*: expected a"):
            number_setting(compose_config([override]), key, whole=whole)


def test_post_training_averages_flipped_views_where_that_was_measured():
    cfg = compose_config([], config_name="postprocess")
    assert cfg.segmenter.test_time_augmentation is True and cfg.localization.vflip is True
    # The reference's maps and the paper-scale segmenter keep their single orientation.
    paper = compose_config(["localization=fused", "segmenter=resnet50"], config_name="postprocess")
    assert paper.segmenter.test_time_augmentation is False and paper.localization.vflip is False
