"""Stage ``train-seg``: a fully supervised segmentation network trained on the synthesized labels
(3.4, 4.2), or on the ground-truth masks for the fully supervised bound of Table 4
(``segmentation.supervision: gt``; the same code path, only the labels differ).

Cross-entropy over the labelled pixels (255 ignored), augmentation of 5.1 (random scale, flip,
colour jitter, random crop), Adam by default (5.1) or SGD, either under the poly schedule. The
labels are those of the label method (``labels.method``) or, with ``labels.refine``, those of the
refinement round (``refine_labels``).
"""
from __future__ import annotations

from typing import Any

from ..pipeline import Stage, register_stage, training_label_stage
from .common import SEGMENTATION_KEYS, SEGMENTATION_OPTIONAL_KEYS, train_segmentation


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    return train_segmentation(config, force, training_label_stage(config))


def upstream(config: dict[str, Any]) -> tuple[str, ...]:
    """The stage of the training labels; none for the fully supervised bound, which trains on the
    ground truth."""
    return () if config["segmentation"]["supervision"] == "gt" else (training_label_stage(config).name,)


STAGE = register_stage(Stage("train_seg", "train-seg", "train the segmentation network on the pseudo labels (3.4, 4.2)",
              keys=SEGMENTATION_KEYS, upstream=upstream, outputs={"model": "model.pt", "log": "log.csv"}, run=run,
              optional_keys=SEGMENTATION_OPTIONAL_KEYS))
