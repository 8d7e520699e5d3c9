"""Segmentation scores: confusion matrices, per-class IoU, mIoU, and tables laid out like the
paper's Tables 1-3.

Conventions (used by every number the package reports):

- Pixels whose ground truth is ``ignore`` (255) are left out entirely.
- A prediction of ``ignore`` on a labelled pixel is a miss: a false negative for the true class and
  a false positive for no class. Predictions must otherwise be class indices ``0..C-1``.
- IoU of class c = TP / (TP + FP + FN), accumulated over all pixels of all images (not averaged per
  image), as the VOC devkit does.
- A class absent from both the ground truth and the predictions of the evaluated set has no IoU
  (NaN): 0/0 says nothing about the method. It is left out of the mean (a nan-mean), and
  :func:`evaluate_predictions` lists it under ``"absent"`` instead of writing NaN into JSON.
- :func:`evaluate_predictions` reports IoU and mIoU in percent (0-100), the unit of the paper.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError
from .files import IGNORE_INDEX, load_label_png


def _counts(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int) -> np.ndarray:
    """(C, C + 1) int64 counts: rows = truth, columns = prediction, last column = predicted ignore."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    # int64 before any arithmetic: uint8 * C would wrap around.
    gt = gt.reshape(-1).astype(np.int64, copy=False)
    pred = pred.reshape(-1).astype(np.int64, copy=False)
    valid = gt != ignore
    gt = gt[valid]
    pred = pred[valid]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        bad = gt[(gt < 0) | (gt >= num_classes)]
        raise ValueError(f"ground-truth value {int(bad[0])} out of range (0..{num_classes - 1} or {ignore})")
    pred = np.where(pred == ignore, num_classes, pred)
    if pred.size and (pred.min() < 0 or pred.max() > num_classes):
        bad = pred[(pred < 0) | (pred > num_classes)]
        raise ValueError(f"prediction value {int(bad[0])} out of range (0..{num_classes - 1} or {ignore})")
    flat = np.bincount(gt * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return flat.reshape(num_classes, num_classes + 1).astype(np.int64, copy=False)


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore: int = IGNORE_INDEX) -> np.ndarray:
    """(C, C) int64 matrix, ``m[true, predicted]`` pixel counts, leaving out ``gt == ignore``.

    Labelled pixels predicted as ``ignore`` are not in this matrix; :class:`ConfusionMatrix` keeps
    them and counts them as misses. Values outside ``0..C-1`` (other than ``ignore``) raise
    ValueError.
    """
    return _counts(gt, pred, num_classes, ignore)[:, :num_classes].copy()


def iou_from_confusion(matrix: np.ndarray) -> np.ndarray:
    """Per-class IoU as fractions (float64, shape (C,)); NaN where TP + FP + FN = 0.

    ``matrix`` is (C, C), or (C, C + 1) with a last column of labelled pixels predicted as ignore
    (as :attr:`ConfusionMatrix.counts`), which then count as false negatives.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    num_classes = matrix.shape[0]
    if matrix.ndim != 2 or matrix.shape[1] not in (num_classes, num_classes + 1):
        raise ValueError(f"confusion matrix must be (C, C) or (C, C+1), got {matrix.shape}")
    tp = np.diag(matrix[:, :num_classes])
    fn = matrix.sum(axis=1) - tp
    fp = matrix[:, :num_classes].sum(axis=0) - tp
    union = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1), np.nan)


def nanmean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of the non-NaN values; NaN when there are none (without numpy's warning)."""
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    return float(array.mean()) if array.size else float("nan")


class ConfusionMatrix:
    """Pixel counts accumulated over images.

    ``counts`` is (C, C + 1) int64; the last column holds labelled pixels predicted as ``ignore``.
    :meth:`state` / :meth:`from_state` give a single int64 array, so partial results from several
    processes can be summed (e.g. an all-reduce) and rebuilt with :meth:`merge` or ``from_state``.
    """

    def __init__(self, num_classes: int, ignore: int = IGNORE_INDEX):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.ignore = int(ignore)
        self.counts = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def add(self, gt: np.ndarray, pred: np.ndarray) -> "ConfusionMatrix":
        self.counts += _counts(gt, pred, self.num_classes, self.ignore)
        return self

    def merge(self, other: "ConfusionMatrix | np.ndarray") -> "ConfusionMatrix":
        counts = other.counts if isinstance(other, ConfusionMatrix) else np.asarray(other, dtype=np.int64)
        if counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge counts of shape {counts.shape} into {self.counts.shape}")
        self.counts += counts
        return self

    def state(self) -> np.ndarray:
        return self.counts.copy()

    @classmethod
    def from_state(cls, state: np.ndarray, ignore: int = IGNORE_INDEX) -> "ConfusionMatrix":
        state = np.asarray(state, dtype=np.int64)
        result = cls(state.shape[0], ignore)
        return result.merge(state)

    @property
    def matrix(self) -> np.ndarray:
        """(C, C) counts, without the predicted-ignore column."""
        return self.counts[:, : self.num_classes].copy()

    def iou(self) -> np.ndarray:
        return iou_from_confusion(self.counts)

    def miou(self) -> float:
        return nanmean(self.iou())

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts[:, : self.num_classes]) / total) if total else float("nan")


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    value = float(value)
    return "-" if math.isnan(value) else f"{value:.1f}"


def format_table(rows: Mapping[str, Mapping[str, float] | Mapping[str, Any]], class_names: Sequence[str],
                 title: str = "") -> str:
    """A text table in the layout of the paper's Tables 1-3: one column per class, then the mean.

    ``rows`` maps a row name (a method, a stage) to ``{class_name: IoU in percent}``; a row may also
    be a result of :func:`evaluate_predictions` (its ``"iou"`` and ``"miou"`` are used). The mean is
    the row's ``"mean"``/``"miou"`` entry if given, else the nan-mean over ``class_names``. Missing or
    NaN values print as ``-``. Columns are separated by spaces and right-aligned.
    """
    names = list(class_names)
    header = ["", *names, "mean"]
    body: list[list[str]] = []
    for row_name, row in rows.items():
        mean = None
        if "iou" in row and isinstance(row["iou"], Mapping):
            mean = row.get("miou")
            row = row["iou"]
        elif "mean" in row:
            mean = row["mean"]
        values = [row.get(name) for name in names]
        if mean is None:
            mean = nanmean([np.nan if v is None else float(v) for v in values])
        body.append([str(row_name), *(_format_value(v) for v in values), _format_value(mean)])
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]
    lines = [title] if title else []
    for index, line in enumerate([header, *body]):
        cells = [line[0].ljust(widths[0])] + [cell.rjust(widths[col]) for col, cell in enumerate(line) if col]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("-" * len(lines[-1]))
    return "\n".join(lines)


def evaluate_predictions(dataset, pred_dir: str | os.PathLike, progress: bool = True) -> dict[str, Any]:
    """Score ``<pred_dir>/<id>.png`` (index PNGs) against the dataset's masks.

    Returns ``{"miou": %, "iou": {class: %}, "num_images": n, "absent": [classes without IoU],
    "skipped": ["<file>: <problem>", ...], "confusion": (C, C+1) counts as nested lists}``.
    ``skipped`` holds this evaluation's problems only (the dataset's own ``skipped`` entries, refused
    when the split was read, are not repeated). Images without ground truth, with a missing, unreadable or wrongly sized prediction, or with
    values outside the class range are skipped with one line each; the rest are still scored.

    The work splits over processes: :func:`scored_samples` lists the images, :func:`score_samples`
    scores any share of them, and :func:`summarize_scores` turns the summed parts into this dict.
    """
    samples = scored_samples(dataset)
    confusion, num_images, skipped = score_samples(dataset, pred_dir, samples, progress=progress)
    return summarize_scores(dataset.class_names, confusion, num_images, [line for _, line in skipped])


def scored_samples(dataset) -> list[tuple[int, Any]]:
    """(position, sample) of every sample with a ground-truth mask, in dataset order."""
    return list(enumerate(s for s in dataset.samples if s.mask_path is not None))


def score_samples(dataset, pred_dir: str | os.PathLike, samples: Sequence[tuple[int, Any]],
                  progress: bool = False) -> tuple[ConfusionMatrix, int, list[tuple[int, str]]]:
    """Confusion matrix, number of scored images and ``(position, problem)`` of the skipped ones
    over ``samples`` (a share of :func:`scored_samples`); partial results of several shares add
    up (``ConfusionMatrix.merge`` or an all-reduce of :meth:`ConfusionMatrix.state`)."""
    from tqdm import tqdm

    pred_dir = Path(pred_dir)
    confusion = ConfusionMatrix(len(dataset.class_names))
    skipped: list[tuple[int, str]] = []
    num_images = 0
    for position, sample in tqdm(samples, desc=f"evaluate {dataset.name}/{dataset.split}", unit="img",
                                 disable=not progress, leave=False):
        pred_path = pred_dir / f"{sample.id}.png"
        try:
            gt = dataset.load_mask(sample)
            if gt is None:
                continue
            pred = load_label_png(pred_path)
            if pred.shape != gt.shape:
                raise InputError(pred_path, f"prediction size {pred.shape[1]}x{pred.shape[0]} differs from "
                                            f"the ground truth {gt.shape[1]}x{gt.shape[0]}")
            try:
                counts = _counts(gt, pred, confusion.num_classes, confusion.ignore)
            except ValueError as error:
                raise InputError(pred_path, str(error)) from None
        except InputError as error:
            skipped.append((position, str(error)))
            continue
        confusion.merge(counts)
        num_images += 1
    return confusion, num_images, skipped


def summarize_scores(class_names: Sequence[str], confusion: ConfusionMatrix, num_images: int,
                     skipped: Sequence[str]) -> dict[str, Any]:
    """The result dict of :func:`evaluate_predictions` from (summed) counts."""
    class_names = list(class_names)
    iou = confusion.iou()
    return {
        "miou": nanmean(iou) * 100.0,
        "iou": {name: float(value) * 100.0 for name, value in zip(class_names, iou) if not np.isnan(value)},
        "num_images": int(num_images),
        "absent": [name for name, value in zip(class_names, iou) if np.isnan(value)],
        "skipped": list(skipped),
        "confusion": confusion.counts.tolist(),
    }


# --- instance segmentation: mAP^r -----------------------------------------------------------

@dataclass(frozen=True)
class Instance:
    """One instance mask of an image: its class (1..K), a boolean (H, W) mask and, for a
    prediction, its score (ground truth: 1)."""
    label: int
    mask: np.ndarray
    score: float = 1.0


def _mask_ious(predicted: Sequence[Instance], truth: Sequence[Instance]) -> np.ndarray:
    """IoU of every predicted mask with every true mask of one image: (P, G)."""
    if not predicted or not truth:
        return np.zeros((len(predicted), len(truth)))
    p = np.stack([inst.mask.reshape(-1) for inst in predicted]).astype(np.float64)
    g = np.stack([inst.mask.reshape(-1) for inst in truth]).astype(np.float64)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def average_precision(scores: Sequence[float], correct: Sequence[bool], num_true: int) -> float:
    """The area under the precision/recall curve of detections ranked by ``scores`` (highest
    first; ``correct`` says which matched an instance), precision made monotone from the right
    (PASCAL VOC 2010+). NaN without true instances."""
    if num_true == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.asarray(correct, dtype=np.float64)[order]
    tp, fp = np.cumsum(hits), np.cumsum(1 - hits)
    # The devkit's sentinels: recall 0 and 1 at the ends, precision 0 there.
    recall = np.concatenate([[0.0], tp / num_true, [1.0]])
    precision = np.concatenate([[0.0], tp / np.maximum(tp + fp, 1), [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def instance_average_precision(predictions: Sequence[Sequence[Instance]], truths: Sequence[Sequence[Instance]],
                               num_classes: int, thresholds: Sequence[float] = (0.25, 0.5, 0.75)
                               ) -> dict[str, Any]:
    """mAP^r (Hariharan et al.; IRN Table 3): per class, the predictions of every image ranked by
    score; each is correct when its best-overlapping true instance of its class and image has IoU
    >= the threshold and was not matched by a higher-ranked prediction. Per threshold: AP per
    object class (NaN for a class without true instances) and their mean over the classes that
    have some. ``predictions[i]`` and ``truths[i]`` are the instances of image i."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} images of predictions but {len(truths)} of ground truth")
    result: dict[str, Any] = {}
    ious = [_mask_ious(p, t) for p, t in zip(predictions, truths)]
    for threshold in thresholds:
        per_class = []
        for label in range(1, num_classes):
            scores, correct, num_true = [], [], 0
            ranked = []
            for image, (predicted, truth) in enumerate(zip(predictions, truths)):
                num_true += sum(inst.label == label for inst in truth)
                ranked += [(inst.score, image, index) for index, inst in enumerate(predicted) if inst.label == label]
            ranked.sort(key=lambda item: -item[0])
            matched: set[tuple[int, int]] = set()
            for score, image, index in ranked:
                candidates = [g for g, inst in enumerate(truths[image]) if inst.label == label]
                best = max(candidates, key=lambda g: ious[image][index, g], default=None)
                hit = (best is not None and ious[image][index, best] >= threshold and (image, best) not in matched)
                if hit:
                    matched.add((image, best))
                scores.append(score)
                correct.append(hit)
            per_class.append(average_precision(scores, correct, num_true))
        values = np.asarray(per_class, dtype=np.float64)
        result[f"{threshold:g}"] = {"ap": [None if np.isnan(v) else 100 * v for v in values],
                                   "map": float(100 * np.nanmean(values)) if np.any(~np.isnan(values)) else None}
    return result
