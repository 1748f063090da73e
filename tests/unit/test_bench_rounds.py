"""The in-process rounds that the throughput benchmarks time train what they say they train."""

import sys

import pytest
import torch

from benchmarks import bench_model_step
from benchmarks.bench_federated_round import in_process
from benchmarks.soak_memory import SoakStopped, soak, soak_overrides
from common.augment import train_cache_size
from common.config import compose_config
from common.data import hospital_names, split_tensors
from common.training import local_steps_per_epoch

# 30 training images a hospital: one full batch of 16 an epoch, the other 14 left out.
SMALL = [f"data.hospitals.hospital_{h}.num_images=50" for h in "abc"] + [
    "train.local_epochs=1",
    "pretrain=masked",
    "pretrain.local_epochs=2",
]


def test_each_phase_counts_the_images_it_steps_on_once_per_local_epoch():
    cfg = compose_config(SMALL)
    size = train_cache_size(cfg.model.img_size)
    sizes = [
        len(split_tensors(cfg.data, name, "train", size).labels)
        for name in hospital_names(cfg.data)
    ]

    def stepped(batch: int) -> int:
        return sum(local_steps_per_epoch(n, min(batch, n)) * min(batch, n) for n in sizes)

    assert stepped(cfg.train.batch_size) < sum(sizes), "a partial batch is left out"
    pretraining, _ = in_process(SMALL, 1, "pretrain")
    mct, _ = in_process(SMALL, 2, "mct")
    assert [t.train_images for t in pretraining] == [2 * stepped(cfg.pretrain.batch_size)]
    assert [t.train_images for t in mct] == [stepped(cfg.train.batch_size)] * 2
    assert all(t.seconds >= t.train_seconds > 0 for t in [*pretraining, *mct])


def test_a_hospitals_own_settings_are_trained_as_its_clientapp_trains_them():
    # The in-process loop trained every hospital with the shared settings.
    cfg = compose_config(SMALL)
    n = len(
        split_tensors(cfg.data, "hospital_a", "train", train_cache_size(cfg.model.img_size)).labels
    )
    batch = min(cfg.train.batch_size, n)
    [shared], _ = in_process(SMALL, 1, "mct")
    [own], _ = in_process([*SMALL, "+train.per_hospital.hospital_a.local_epochs=3"], 1, "mct")
    assert own.train_images - shared.train_images == 2 * local_steps_per_epoch(n, batch) * batch


def test_the_mct_rounds_start_from_the_pretrained_weights_when_given():
    _, pretrained = in_process(SMALL, 1, "pretrain")
    _, from_scratch = in_process(SMALL, 1, "mct")
    _, from_pretrained = in_process(SMALL, 1, "mct", initial=pretrained)
    assert pretrained.keys() == from_scratch.keys() == from_pretrained.keys()
    assert not torch.equal(from_scratch["pos_embed"], from_pretrained["pos_embed"])


def test_the_soak_counts_mct_rounds_alone():
    # Its metrics rows must be the rounds it asks for: a pretraining phase adds its own.
    cfg = compose_config(soak_overrides([]))
    assert cfg.pretrain.method == "none" and cfg.pretrain.rounds == 0
    assert {h.num_images for h in cfg.data.hospitals.values()} == {40}


def test_the_soak_takes_another_data_config_and_the_users_own_sizes():
    # Its small hospitals were named hospital_a..c: data=synthetic10 could not compose.
    cfg = compose_config(soak_overrides(["data=synthetic10"]))
    assert len(cfg.data.hospitals) == 10 and {
        h.num_images for h in cfg.data.hospitals.values()
    } == {40}
    assert "num_images" not in str(soak_overrides(["data=wbc_zxaoyou"]))  # image folders
    mine = compose_config(soak_overrides(["data.hospitals.hospital_a.num_images=60"]))
    assert mine.data.hospitals.hospital_a.num_images == 60


def test_a_soak_that_ends_early_says_why(tmp_path):
    with pytest.raises(
        SoakStopped, match=r"ended after 0 of 2 rounds(.|\n)*no such setting"
    ) as stopped:
        soak(2, [*soak_overrides([]), "federation.round=5"], tmp_path, deployed=False)
    assert stopped.value.rows == []


def test_the_step_benchmark_refuses_mixed_precision_where_training_runs_none(monkeypatch, capsys):
    # Training autocasts on CUDA only: a CPU --amp timed a bf16 step no run takes.
    monkeypatch.setattr(sys, "argv", ["bench_model_step", "--amp", "--device", "cpu"])
    with pytest.raises(SystemExit):
        bench_model_step.main()
    assert "--amp: training runs mixed precision on CUDA only" in capsys.readouterr().err
