"""The synthetic hospitals: deterministic, well-formed, every class present, distinct domains."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import compose_config
from common.data import BACKGROUND, CYTOPLASM, NUCLEUS, generate_hospital, load_hospital
from common.data.synthetic import CELL_TYPES, DOMAINS, synthetic_labels

VOCAB = ["eosinophil", "basophil", "neutrophil", "monocyte", "lymphocyte", "band_neutrophil"]


@pytest.fixture(scope="module")
def hospitals():
    return {d: generate_hospital(d, 60, 64, seed=11, classes=CELL_TYPES) for d in DOMAINS}


def test_same_seed_same_arrays_other_seed_differs():
    first = generate_hospital("a", 12, 48, seed=3, classes=CELL_TYPES)
    second = generate_hospital("a", 12, 48, seed=3, classes=CELL_TYPES)
    other = generate_hospital("a", 12, 48, seed=4, classes=CELL_TYPES)
    for a, b in zip(first[0] + first[2], second[0] + second[2], strict=True):
        assert np.array_equal(a, b)
    assert np.array_equal(first[1], second[1])
    assert not all(np.array_equal(a, b) for a, b in zip(first[0], other[0], strict=True))


def test_shapes_and_dtypes(hospitals):
    images, labels, masks = hospitals["b"]
    assert len(images) == len(masks) == len(labels) == 60
    assert labels.dtype == np.int64 and labels.shape == (60,)
    for image, mask in zip(images, masks, strict=True):
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == np.uint8


def test_every_class_present_at_least_five_percent(hospitals):
    for images, labels, _ in hospitals.values():
        counts = np.bincount(labels, minlength=len(CELL_TYPES))
        assert counts.min() >= 0.05 * len(images)


def test_masks_nontrivial_and_nucleus_inside_cell(hospitals):
    for _, _, masks in hospitals.values():
        for mask in masks:
            assert set(np.unique(mask)) == {BACKGROUND, CYTOPLASM, NUCLEUS}
            cell = mask != BACKGROUND
            assert 0.05 < cell.mean() < 0.8
            # The white cell is one roughly centred blob: its bounding box holds the crop centre.
            rows, cols = np.nonzero(cell)
            assert rows.min() < 32 < rows.max() and cols.min() < 32 < cols.max()
            # The nucleus lies inside the cell, which is painted well away from the crop border.
            assert not (mask[[0, -1]] == NUCLEUS).any() and not (mask[:, [0, -1]] == NUCLEUS).any()


def test_lymphocytes_smaller_than_monocytes(hospitals):
    _, labels, masks = hospitals["c"]
    area = np.array([(m != BACKGROUND).sum() for m in masks])
    lymph, mono = CELL_TYPES.index("lymphocyte"), CELL_TYPES.index("monocyte")
    assert area[labels == lymph].mean() < 0.6 * area[labels == mono].mean()


def test_domains_differ_in_mean_colour(hospitals):
    means = {d: np.mean([im.mean((0, 1)) for im in h[0]], axis=0) for d, h in hospitals.items()}
    for a, b in [("a", "b"), ("a", "c"), ("b", "c")]:
        assert np.abs(means[a] - means[b]).max() > 8, (a, b, means[a], means[b])


def test_labels_index_the_vocabulary_by_name():
    images, labels, _ = generate_hospital("c", 20, 40, seed=1, classes=VOCAB)
    names = {VOCAB[i] for i in labels}
    assert names == set(CELL_TYPES)
    assert np.array_equal(synthetic_labels("c", 20, 40, 1, VOCAB), labels)


def test_vocabulary_without_cell_types_is_a_clear_error():
    with pytest.raises(ValueError, match="missing \\['basophil'\\]"):
        generate_hospital("a", 5, 40, seed=0, classes=CELL_TYPES[:4])
    with pytest.raises(ValueError, match="unknown synthetic domain"):
        generate_hospital("z", 5, 40, seed=0, classes=CELL_TYPES)


def test_default_config_hospitals_load():
    cfg = compose_config([]).data
    data = load_hospital(cfg, "hospital_a")
    assert len(data) == 160 and data.images[0].shape == (128, 128, 3)
    assert data.sample_ids[:2] == ["synthetic/0", "synthetic/1"]
