import torch

from common.batches import BatchBuilder, border_crops
from common.data import SplitTensors


def _data(n: int = 6, size: int = 16) -> SplitTensors:
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    images[:, :, 4:12, 4:12] = 200  # a centred "cell" on a dark background
    return SplitTensors(images, torch.arange(n) % 3, None)


def _builder(data: SplitTensors, **levers) -> BatchBuilder:
    settings = {"negatives": {"fraction": 0.0, "crop": 0.25}, "mosaic_p": 0.0}
    settings.update(levers)
    return BatchBuilder(
        data, 3, lambda img: img.float(), settings, torch.Generator().manual_seed(0)
    )


def test_border_crops_see_only_the_border():
    crops = border_crops(_data().images, 0.25, torch.Generator().manual_seed(0))
    assert crops.shape == (6, 3, 16, 16) and crops.dtype == torch.uint8
    assert crops.max() == 0  # the centred cell never enters a corner crop


def test_plain_batches_are_one_hot():
    images, targets = _builder(_data()).batch(torch.tensor([0, 1, 2]))
    assert images.shape == (3, 3, 16, 16)
    assert torch.equal(targets, torch.eye(3))


def test_negatives_are_appended_with_no_class():
    images, targets = _builder(_data(), negatives={"fraction": 0.5, "crop": 0.25}).batch(
        torch.tensor([0, 1, 2, 3])
    )
    assert images.shape[0] == 6
    assert torch.equal(targets[4:], torch.zeros(2, 3))
    assert images[4:].max() == 0


def test_mosaics_carry_the_union_of_their_tiles_labels():
    images, targets = _builder(_data(n=3), mosaic_p=1.0).batch(torch.tensor([0, 1]))
    assert images.shape == (2, 3, 16, 16)
    assert ((targets == 0) | (targets == 1)).all() and (targets.sum(dim=1) >= 1).all()
