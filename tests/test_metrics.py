"""Scores: confusion matrix, IoU with absent classes, tables, and evaluation of prediction folders."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from affinitynet.data.datasets import build_dataset
from affinitynet.data.datasets.base import Sample, SegmentationDataset
from affinitynet.files import VOC_PALETTE, save_label_png
from affinitynet.metrics import (
    ConfusionMatrix,
    confusion_matrix,
    evaluate_predictions,
    format_table,
    iou_from_confusion,
    nanmean,
)


def reference_confusion(gt, pred, num_classes, ignore=255):
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
        if g != ignore and p != ignore:
            matrix[g, p] += 1
    return matrix


def test_confusion_matrix_matches_a_loop():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, (37, 23)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = 255
    pred = rng.integers(0, 6, gt.shape).astype(np.uint8)
    result = confusion_matrix(gt, pred, 6)
    assert result.dtype == np.int64
    np.testing.assert_array_equal(result, reference_confusion(gt, pred, 6))
    assert result.sum() == (gt != 255).sum()


def test_large_class_counts_do_not_overflow_uint8_arithmetic():
    gt = np.full((4, 4), 200, dtype=np.uint8)
    pred = np.full((4, 4), 201, dtype=np.uint8)
    matrix = confusion_matrix(gt, pred, 210)
    assert matrix[200, 201] == 16 and matrix.sum() == 16


def test_ignore_label_in_ground_truth_is_left_out_and_in_prediction_is_a_miss():
    gt = np.array([[0, 1, 255], [1, 1, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [255, 1, 0]], dtype=np.uint8)
    cm = ConfusionMatrix(2).add(gt, pred)
    assert cm.matrix.tolist() == [[1, 0], [0, 2]]
    assert cm.counts[:, 2].tolist() == [0, 1]          # one class-1 pixel predicted as ignore
    iou = cm.iou()
    assert iou[0] == 1.0
    assert iou[1] == pytest.approx(2 / 3)             # TP 2, FN 1 (the ignored prediction), FP 0


def test_out_of_range_values_raise():
    with pytest.raises(ValueError, match="prediction value 7"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.full((2, 2), 7, np.uint8), 3)
    with pytest.raises(ValueError, match="ground-truth value 9"):
        confusion_matrix(np.full((2, 2), 9, np.uint8), np.zeros((2, 2), np.uint8), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), 3)


def test_absent_classes_are_nan_and_left_out_of_the_mean():
    gt = np.array([[0, 0, 2, 2]], dtype=np.uint8)
    pred = np.array([[0, 2, 2, 2]], dtype=np.uint8)
    iou = iou_from_confusion(confusion_matrix(gt, pred, 4))
    assert iou[0] == 0.5 and iou[2] == pytest.approx(2 / 3)
    assert math.isnan(iou[1]) and math.isnan(iou[3])
    assert nanmean(iou) == pytest.approx((0.5 + 2 / 3) / 2)
    assert math.isnan(nanmean([float("nan")]))


def test_merge_and_state_sum_partial_results():
    rng = np.random.default_rng(1)
    pairs = [(rng.integers(0, 4, (8, 8)), rng.integers(0, 4, (8, 8))) for _ in range(6)]
    whole = ConfusionMatrix(4)
    first, second = ConfusionMatrix(4), ConfusionMatrix(4)
    for index, (gt, pred) in enumerate(pairs):
        whole.add(gt, pred)
        (first if index % 2 else second).add(gt, pred)
    summed = ConfusionMatrix.from_state(first.state() + second.state())
    assert summed.state().dtype == np.int64
    np.testing.assert_array_equal(summed.counts, whole.counts)
    np.testing.assert_array_equal(first.merge(second).counts, whole.counts)
    with pytest.raises(ValueError):
        whole.merge(ConfusionMatrix(3))


def test_format_table_layout():
    rows = {"CAM": {"background": 71.23, "cat": 40.06, "dog": float("nan")},
            "RW": {"iou": {"background": 80.0, "cat": 55.0}, "miou": 67.5}}
    text = format_table(rows, ["background", "cat", "dog"], title="Table 1: train")
    lines = text.splitlines()
    assert lines[0] == "Table 1: train"
    header = lines[1].split()
    assert header == ["background", "cat", "dog", "mean"]
    cam = lines[3].split()
    assert cam == ["CAM", "71.2", "40.1", "-", "55.6"]     # mean over the classes with a value
    assert lines[4].split() == ["RW", "80.0", "55.0", "-", "67.5"]
    # Right-aligned columns: every row has the same length up to the last column.
    assert len({len(line) for line in lines[1:] if not line.startswith("-")}) == 1


# --- evaluate_predictions --------------------------------------------------------------------------

class _ArrayDataset(SegmentationDataset):
    masks: dict

    def load_mask(self, sample):
        return self.masks[sample.id]


def _toy_dataset(tmp_path):
    masks = {"a": np.array([[0, 1], [1, 255]], np.uint8), "b": np.array([[0, 0], [2, 2]], np.uint8),
             "c": np.zeros((2, 2), np.uint8), "d": np.zeros((2, 2), np.uint8), "e": np.zeros((2, 2), np.uint8)}
    dataset = _ArrayDataset("toy", tmp_path, "val", ["background", "cat", "dog"])
    dataset.masks = masks
    for key in masks:
        dataset.samples.append(Sample(key, tmp_path / f"{key}.png", (), tmp_path / f"{key}_gt.png"))
    return dataset


def test_evaluate_reports_bad_predictions_and_scores_the_rest(tmp_path):
    dataset = _toy_dataset(tmp_path)
    preds = tmp_path / "pred"
    save_label_png(preds / "a.png", np.array([[0, 1], [1, 1]], np.uint8))
    save_label_png(preds / "b.png", np.array([[0, 0], [2, 2]], np.uint8))
    save_label_png(preds / "c.png", np.zeros((3, 2), np.uint8))          # wrong size
    save_label_png(preds / "d.png", np.full((2, 2), 9, np.uint8))        # not a class
    # e.png missing
    result = evaluate_predictions(dataset, preds, progress=False)
    assert result["num_images"] == 2
    assert result["miou"] == 100.0 and result["iou"] == {"background": 100.0, "cat": 100.0, "dog": 100.0}
    skipped = result["skipped"]
    assert len(skipped) == 3
    assert skipped[0] == f"{preds / 'c.png'}: prediction size 2x3 differs from the ground truth 2x2"
    assert skipped[1].startswith(f"{preds / 'd.png'}: prediction value 9 out of range")
    assert skipped[2] == f"{preds / 'e.png'}: file not found"
    assert all("\n" not in line for line in skipped)
    json.dumps(result, allow_nan=False)                                   # strict JSON


def test_evaluate_lists_absent_classes_without_nan(tmp_path):
    dataset = _toy_dataset(tmp_path)
    dataset.samples = [s for s in dataset.samples if s.id in ("c",)]
    save_label_png(tmp_path / "pred" / "c.png", np.zeros((2, 2), np.uint8))
    result = evaluate_predictions(dataset, tmp_path / "pred", progress=False)
    assert result["iou"] == {"background": 100.0}
    assert result["absent"] == ["cat", "dog"]
    assert result["miou"] == 100.0


# --- MSRC-21: the real data ---------------------------------------------------------------------

def test_msrc21_ground_truth_scores_100_and_all_background_matches_a_loop(msrc21_root, tmp_path):
    dataset = build_dataset({"name": "msrc21", "root": str(msrc21_root)}, "train")
    assert len(dataset) == 355
    gt_dir, bg_dir = tmp_path / "gt", tmp_path / "bg"
    gt_dir.mkdir()
    bg_dir.mkdir()
    masks = {}
    for sample in dataset.samples:
        mask = dataset.load_mask(sample)
        masks[sample.id] = mask
        # Plain palette PNGs, as save_label_png writes them, minus its fsync (710 files).
        for folder, array in ((gt_dir, mask), (bg_dir, np.zeros_like(mask))):
            image = Image.fromarray(array, mode="P")
            image.putpalette(VOC_PALETTE.flatten().tolist())
            image.save(folder / f"{sample.id}.png")

    perfect = evaluate_predictions(dataset, gt_dir, progress=False)
    assert perfect["miou"] == 100.0
    assert perfect["num_images"] == 355 and perfect["skipped"] == []
    assert set(perfect["iou"]) == set(dataset.class_names)               # every class occurs in train

    result = evaluate_predictions(dataset, bg_dir, progress=False)
    num = dataset.num_classes
    tp, fp, fn = np.zeros(num), np.zeros(num), np.zeros(num)
    for mask in masks.values():
        valid = mask != 255
        for c in range(num):
            gt_c = (mask == c) & valid
            pred_c = valid if c == 0 else np.zeros_like(valid)
            tp[c] += (gt_c & pred_c).sum()
            fp[c] += (~gt_c & pred_c).sum()
            fn[c] += (gt_c & ~pred_c).sum()
    expected = {name: 100.0 * tp[c] / (tp[c] + fp[c] + fn[c]) for c, name in enumerate(dataset.class_names)}
    assert result["iou"] == pytest.approx(expected, rel=1e-12)
    assert result["miou"] == pytest.approx(float(np.mean(list(expected.values()))), rel=1e-12)
    assert 0 < result["iou"]["background"] < 100
    assert all(result["iou"][name] == 0.0 for name in dataset.class_names[1:])
