"""Hand-computed cases for the scores used during federated evaluation."""

import numpy as np
import pytest
import torch

from common.metrics import average_precision, binary_miou_sweep


def test_average_precision_perfect_and_hand_computed():
    labels = np.array([0, 1, 1])
    perfect = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.7]])
    assert average_precision(perfect, labels) == pytest.approx(1.0)
    # class 1 ranked: image0 (neg), image1 (pos), image2 (pos): AP = (1/2 + 2/3) / 2
    scores = np.array([[0.9, 0.9], [0.2, 0.8], [0.1, 0.7]])
    assert average_precision(scores, labels) == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 2)


def test_absent_class_is_skipped_not_zero():
    labels = np.array([0, 0])
    scores = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]])
    assert average_precision(scores, labels) == pytest.approx(1.0)


def test_binary_miou_is_counted_over_the_whole_split():
    truth = torch.zeros(2, 2, 2, dtype=torch.bool)
    truth[0, 0, 0] = truth[1, 0, 0] = True
    scores = torch.zeros(2, 2, 2)
    scores[0, 0, 0] = 0.9  # hit
    scores[1, 0, 1] = 0.9  # false positive; image 1's cell is missed
    ious = binary_miou_sweep(scores, truth, [0.5, 1.5])
    # t=0.5: tp 1, fp 1, fn 1 -> fg 1/3; bg: tn 5 / (5 + 1 + 1) -> mean
    assert ious[0] == pytest.approx((1 / 3 + 5 / 7) / 2)
    # t=1.5: nothing predicted -> fg 0, bg 6/8
    assert ious[1] == pytest.approx((0 + 6 / 8) / 2)
