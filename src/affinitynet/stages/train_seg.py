"""Stage ``train-seg``: a fully supervised segmentation network trained on the synthesized labels
(3.4, 4.2), or on the ground-truth masks for the fully supervised bound of Table 4
(``segmentation.supervision: gt``; the same code path, only the labels differ).

Cross-entropy over the labelled pixels (255 ignored), augmentation of 5.1 (random scale, flip,
colour jitter, random crop), Adam by default (5.1) or SGD, either under the poly schedule.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data import transforms
from ..engine.training import AugmentedTrainSet
from ..errors import InputError, TrainingError
from ..files import IGNORE_INDEX, load_label_png
from ..pipeline import Stage, label_stage, register_stage, training_keys
from .common import train_stage


class SegTrainSet(AugmentedTrainSet):
    """Random rescale, then the shared augmentation with the label padded by 255 (5.1)."""

    def rescale(self, image, label, rng):
        return transforms.random_scale(image, label, self.section["scale_range"], rng)

    def target(self, label, sample):
        return torch.from_numpy(label.astype(np.int64))


def pseudo_label_dir(config: dict[str, Any]) -> Path:
    """The pseudo labels of the configured label method (``labels.method``)."""
    return label_stage(config).output("pseudo_labels", config)


def label_loader(config: dict[str, Any], data) -> Callable[[Any], np.ndarray]:
    """The training labels of a sample: its pseudo label PNG (3.4) or its ground-truth mask."""
    supervision = config["segmentation"]["supervision"]
    num_classes = data.num_classes
    label_dir = pseudo_label_dir(config)

    def load(sample) -> np.ndarray:
        if supervision == "gt":
            path = sample.mask_path or sample.image_path
            label = data.load_mask(sample)
            if label is None:
                raise InputError(path, "no ground-truth mask (segmentation.supervision is 'gt')")
        else:
            path = label_dir / f"{sample.id}.png"
            label = load_label_png(path)
        # An out-of-range index would abort cross-entropy for the whole batch; refuse the file.
        bad = (label >= num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise InputError(path, f"label value {int(label[bad].max())} out of range "
                                   f"(0..{num_classes - 1} or {IGNORE_INDEX})")
        return label

    return load


def check_labels_exist(config: dict[str, Any], data) -> None:
    """Fail at once, with the fix, when no training image has a label, instead of skipping them
    all one by one through an epoch that learns nothing."""
    if config["segmentation"]["supervision"] == "gt":
        if not data.has_masks:
            raise TrainingError(f"segmentation.supervision is 'gt' but {data.name} split '{data.split}' has "
                                f"no ground-truth masks; use segmentation.supervision=pseudo")
        return
    label_dir = pseudo_label_dir(config)
    if not any((label_dir / f"{sample.id}.png").exists() for sample in data.samples):
        raise TrainingError(f"no pseudo labels for the {data.split} split in {label_dir}: run "
                            f"`affinitynet {label_stage(config).command}` first (or segmentation.supervision=gt)")


def segmentation_step(model, batch):
    """Mean cross-entropy over the labelled pixels of the batch; a crop with no labelled pixel
    (all padding or neutral) contributes zero instead of making the loss NaN."""
    images, labels = batch
    logits = model(images)
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
    with torch.no_grad():
        correct = ((logits.argmax(1) == labels) & valid).sum()
    return loss, {"pixel_accuracy": float(correct) / float(count)}


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    section = config["segmentation"]
    seed = config["seed"] if section["seed"] is None else section["seed"]
    return train_stage(config, force, "segmentation",
                       lambda data, backbone: SegTrainSet(data, section, backbone.mean, backbone.std, seed,
                                                          label_loader(config, data)),
                       segmentation_step, seed=seed, check=lambda data: check_labels_exist(config, data))


def upstream(config: dict[str, Any]) -> tuple[str, ...]:
    """The label method's stage; none for the fully supervised bound, which trains on the ground
    truth."""
    return () if config["segmentation"]["supervision"] == "gt" else (label_stage(config).name,)


STAGE = register_stage(Stage("train_seg", "train-seg", "train the segmentation network on the pseudo labels (3.4, 4.2)",
              keys=("seed", "backbone", "segmentation.head", "segmentation.supervision", "segmentation.scale_range")
              + training_keys("segmentation"),
              upstream=upstream, outputs={"model": "model.pt", "log": "log.csv"}, run=run,
              optional_keys=("segmentation.seed", "segmentation.train_output_stride",
                             "segmentation.fine_tune_epochs")))
