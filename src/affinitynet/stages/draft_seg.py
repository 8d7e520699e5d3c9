"""Stage ``draft-seg``: the refinement round's first segmentation network (``labels.refine``),
trained as ``train_seg`` is, on the label method's pseudo labels; ``refine_labels`` segments the
training images with it."""
from __future__ import annotations

from typing import Any

from ..pipeline import Stage, label_stage, register_stage
from .common import SEGMENTATION_KEYS, SEGMENTATION_OPTIONAL_KEYS, train_segmentation


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    return train_segmentation(config, force, label_stage(config), name=STAGE.name)


STAGE = register_stage(Stage("draft_seg", "draft-seg", "refinement round: the first segmentation network, on the "
                                                       "label method's pseudo labels",
              keys=SEGMENTATION_KEYS, upstream=lambda config: (label_stage(config).name,),
              outputs={"model": "model.pt", "log": "log.csv"}, run=run, optional_keys=SEGMENTATION_OPTIONAL_KEYS))
