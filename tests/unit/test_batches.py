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
    n = 6
    images = (torch.arange(n, dtype=torch.uint8) * 40).view(n, 1, 1, 1).expand(n, 3, 16, 16)
    data = SplitTensors(images.contiguous(), torch.arange(n) % 3, None)  # image i is 40 * i
    mosaics, targets = _builder(data, mosaic_p=1.0).batch(torch.tensor([0, 1, 2, 3]))
    assert mosaics.shape == (4, 3, 16, 16)
    for mosaic, target in zip(mosaics, targets, strict=True):
        tiles = [mosaic[:, r : r + 8, c : c + 8] for r in (0, 8) for c in (0, 8)]
        assert all((tile == tile[0, 0, 0]).all() for tile in tiles)  # each quarter one image
        sources = [int(tile[0, 0, 0]) // 40 for tile in tiles]
        assert torch.equal(target, torch.eye(3)[torch.tensor(sources) % 3].amax(dim=0))
    assert (targets.sum(dim=1) >= 2).any()  # some mosaic holds two classes
