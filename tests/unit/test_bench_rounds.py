"""The in-process rounds that the throughput benchmarks time train what they say they train."""

import torch

from benchmarks.bench_federated_round import in_process
from common.augment import train_cache_size
from common.config import compose_config
from common.data import hospital_names, split_tensors

SMALL = [f"data.hospitals.hospital_{h}.num_images=20" for h in "abc"] + [
    "train.local_epochs=1",
    "pretrain=masked",
    "pretrain.local_epochs=2",
]


def test_each_phase_counts_every_hospitals_images_once_per_local_epoch():
    cfg = compose_config(SMALL)
    size = train_cache_size(cfg.model.img_size)
    images = sum(
        len(split_tensors(cfg.data, name, "train", size).labels)
        for name in hospital_names(cfg.data)
    )
    pretraining, _ = in_process(SMALL, 1, "pretrain")
    mct, _ = in_process(SMALL, 2, "mct")
    assert [t.train_images for t in pretraining] == [2 * images]
    assert [t.train_images for t in mct] == [images, images]
    assert all(t.seconds >= t.train_seconds > 0 for t in [*pretraining, *mct])


def test_the_mct_rounds_start_from_the_pretrained_weights_when_given():
    _, pretrained = in_process(SMALL, 1, "pretrain")
    _, from_scratch = in_process(SMALL, 1, "mct")
    _, from_pretrained = in_process(SMALL, 1, "mct", initial=pretrained)
    assert pretrained.keys() == from_scratch.keys() == from_pretrained.keys()
    assert not torch.equal(from_scratch["pos_embed"], from_pretrained["pos_embed"])
