"""The in-process rounds that the throughput benchmarks time train what they say they train."""

import torch

from benchmarks.bench_federated_round import in_process
from benchmarks.soak_memory import DEFAULT_OVERRIDES
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


def test_the_mct_rounds_start_from_the_pretrained_weights_when_given():
    _, pretrained = in_process(SMALL, 1, "pretrain")
    _, from_scratch = in_process(SMALL, 1, "mct")
    _, from_pretrained = in_process(SMALL, 1, "mct", initial=pretrained)
    assert pretrained.keys() == from_scratch.keys() == from_pretrained.keys()
    assert not torch.equal(from_scratch["pos_embed"], from_pretrained["pos_embed"])


def test_the_soak_counts_mct_rounds_alone():
    # Its metrics rows must be the rounds it asks for: a pretraining phase adds its own.
    cfg = compose_config(DEFAULT_OVERRIDES)
    assert cfg.pretrain.method == "none" and cfg.pretrain.rounds == 0
