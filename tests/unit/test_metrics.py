"""common/metrics: confusion counts, mIoU, the federated-evaluation scores, selection on val."""

import math

import numpy as np
import pytest
import torch

from common.metrics import (
    SegmentationScores,
    average_precision,
    binary_confusion,
    binary_miou_sweep,
    cell_type_accuracy,
    cell_type_confusion,
    class_aware_truth,
    class_aware_truths,
    class_iou,
    confusion_matrix,
    mean_iou,
    score_label_maps,
    select_on_validation,
)


def test_confusion_counts_rows_truth_columns_prediction_and_ignores_255():
    truth = np.array([[0, 1, 255], [2, 2, 0]])
    pred = np.array([[0, 2, 1], [2, 0, 0]])
    matrix = confusion_matrix(pred, truth, num_labels=3)
    expected = np.array(
        [
            [2, 0, 0],  # truth 0: both predicted 0
            [0, 0, 1],  # truth 1: predicted 2
            [1, 0, 1],  # truth 2: predicted 0 and 2; the 255 pixel is not counted
        ]
    )
    np.testing.assert_array_equal(matrix, expected)
    assert matrix.sum() == 5


def test_confusion_rejects_mismatched_shapes_and_out_of_range_predictions():
    with pytest.raises(ValueError, match=r"prediction is \(3,\) but truth \(4,\)"):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)
    # As many pixels, turned: scored, it would compare pixels that do not lie on each other.
    with pytest.raises(ValueError, match=r"prediction is \(3, 2\) but truth \(2, 3\)"):
        confusion_matrix(np.zeros((3, 2)), np.zeros((2, 3)), 2)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([3]), np.array([0]), 2)


def test_iou_hand_case():
    # bg: TP 2, row 2, col 3 -> 2 / 3; class 1: TP 0 -> 0; class 2: TP 1, row 2, col 2 -> 1 / 3
    matrix = np.array([[2, 0, 0], [0, 0, 1], [1, 0, 1]])
    np.testing.assert_allclose(class_iou(matrix), [2 / 3, 0.0, 1 / 3])
    assert mean_iou(matrix) == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)


def test_absent_class_skipped_or_zero():
    # label 2 never in truth nor prediction
    matrix = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    skip = class_iou(matrix, "skip")
    assert math.isnan(skip[2])
    assert mean_iou(matrix, "skip") == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert mean_iou(matrix, "zero") == pytest.approx((3 / 4 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError, match="absent"):
        class_iou(matrix, "nan")


def test_predicted_but_absent_class_counts_zero_under_both_policies():
    matrix = np.array([[3, 0, 1], [0, 2, 0], [0, 0, 0]])  # label 2 predicted once, never true
    for policy in ("skip", "zero"):
        assert class_iou(matrix, policy)[2] == 0.0


def test_binary_collapse_forgives_the_wrong_cell_type():
    # one cell of class 1 predicted entirely as class 2: class-aware wrong, binary right
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 2, 2])
    matrix = confusion_matrix(pred, truth, 3)
    np.testing.assert_array_equal(binary_confusion(matrix), [[2, 0], [0, 2]])
    scores = SegmentationScores.from_confusion(matrix, "skip")
    assert scores.binary_miou == 1.0
    assert scores.class_aware_miou == pytest.approx((1 + 0 + 0) / 3)


def test_scores_are_dataset_level_not_mean_of_images():
    # image 1: big cell found; image 2: small cell missed entirely
    truths = [np.array([0, 1, 1, 1, 1, 1, 1, 1]), np.array([0, 0, 0, 1])]
    preds = [np.array([0, 1, 1, 1, 1, 1, 1, 1]), np.array([0, 0, 0, 0])]
    scores = score_label_maps(preds, truths, num_labels=2)
    # summed: bg TP 4, truth-bg 4, pred-bg 5 -> 4/5; cell TP 7, truth 8, pred 7 -> 7/8
    assert scores.class_aware_miou == pytest.approx((4 / 5 + 7 / 8) / 2)
    assert scores.to_dict()["class_iou"] == pytest.approx([4 / 5, 7 / 8])


def test_an_image_names_the_type_of_most_of_its_predicted_cell_pixels():
    truths = [np.array([0, 2, 2, 2]), np.array([0, 3, 3, 255]), np.array([0, 1, 1, 1])]
    preds = [
        np.array([1, 2, 2, 2]),  # mostly the right type: right, though not every pixel is
        np.array([0, 2, 2, 3]),  # mostly another type: wrong
        np.array([0, 0, 0, 0]),  # no cell found: names no type, wrong
    ]
    confusion = cell_type_confusion(preds, truths, num_labels=4)
    # rows: true types 1..3; columns: no cell, then named types 1..3
    assert confusion.tolist() == [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]]
    assert cell_type_accuracy(confusion) == pytest.approx(1 / 3)
    # An image whose truth holds no cell has no type to name and is left out.
    more = cell_type_confusion([*preds, np.array([0, 1])], [*truths, np.array([0, 0])], 4)
    assert (more == confusion).all()
    assert math.isnan(cell_type_accuracy(cell_type_confusion([np.array([1])], [np.array([0])], 2)))


def test_only_predictions_that_name_the_type_themselves_report_a_cell_type_accuracy():
    truths, preds = [np.array([0, 1, 1, 1])], [np.array([0, 1, 1, 2])]
    assert "cell_type_accuracy" not in score_label_maps(preds, truths, 3).to_dict()
    named = score_label_maps(preds, truths, 3, cell_types=True)
    assert named.to_dict()["cell_type_accuracy"] == 1.0
    assert named.to_dict()["cell_type_confusion"] == [[0, 1, 0], [0, 0, 0]]
    # Pixels weigh the class-aware mIoU; the image's type is still right.
    assert named.class_aware_miou < 1.0


def test_to_dict_turns_nan_into_none():
    scores = SegmentationScores.from_confusion(np.array([[2, 0], [0, 0]]), "skip")
    assert scores.to_dict()["class_iou"] == [1.0, None]


def test_class_aware_truth_gives_the_whole_cell_the_image_class():
    mask = np.array([[0, 1], [2, 0]], dtype=np.uint8)  # cytoplasm and nucleus
    np.testing.assert_array_equal(class_aware_truth(mask, 3), [[0, 4], [4, 0]])
    truths = class_aware_truths([mask, mask], np.array([0, 2]))
    np.testing.assert_array_equal(truths[0], [[0, 1], [1, 0]])
    np.testing.assert_array_equal(truths[1], [[0, 3], [3, 0]])
    with pytest.raises(ValueError):  # a label missing for a mask is not skipped silently
        class_aware_truths([mask, mask], [0])


def test_select_on_validation_picks_the_best_and_keeps_the_first_of_ties():
    truths = [np.array([0, 0, 1, 1])]
    predictions = {
        "a": [np.array([0, 1, 1, 1])],
        "b": [np.array([0, 0, 1, 1])],
        "c": [np.array([0, 0, 1, 1])],
    }
    best, scores = select_on_validation(
        ["a", "b", "c"], lambda k: predictions[k], truths, num_labels=2
    )
    assert best == "b" and scores.class_aware_miou == 1.0
    with pytest.raises(ValueError, match="empty"):
        select_on_validation([], lambda k: [], truths, 2)
    with pytest.raises(ValueError, match="select_by"):
        select_on_validation(["a"], lambda k: predictions[k], truths, 2, select_by="f1")


def test_binary_and_class_aware_selection_choose_differently_where_the_class_is_wrong():
    truths = [np.array([0, 0, 1, 1, 1, 1])]
    predictions = {
        "whole cell, wrong class": [np.array([0, 0, 2, 2, 2, 2])],  # binary 1.0, aware 1/3
        "right class, too large": [np.array([0, 1, 1, 1, 1, 1])],  # binary 0.65, aware 0.65
    }

    def best(select_by: str) -> str:
        chosen, _ = select_on_validation(
            list(predictions), predictions.get, truths, 3, select_by=select_by
        )
        return chosen

    assert best("binary") == "whole cell, wrong class"
    assert best("class_aware") == "right class, too large"


# Hand-computed cases for the scores used during federated evaluation.


def test_average_precision_perfect_and_hand_computed():
    labels = np.array([0, 1, 1])
    perfect = np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.7]])
    assert average_precision(perfect, labels) == pytest.approx(1.0)
    # class 1 ranked: image0 (neg), image1 (pos), image2 (pos): AP = (1/2 + 2/3) / 2
    scores = np.array([[0.9, 0.9], [0.2, 0.8], [0.1, 0.7]])
    assert average_precision(scores, labels) == pytest.approx((1.0 + (0.5 + 2 / 3) / 2) / 2)


def test_average_precision_of_tied_scores_does_not_depend_on_the_order_of_the_images():
    labels = np.repeat(np.arange(5), 10)  # read class folder by class folder
    constant = np.full((50, 5), 1.0, dtype=np.float32)
    assert average_precision(constant, labels) == pytest.approx(0.2)  # chance: the class share
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(50, 5)).astype(np.float32)  # many ties
    shuffled = rng.permutation(50)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision(scores[shuffled], labels[shuffled])
    )


def test_average_precision_skips_an_absent_class_instead_of_scoring_0():
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
