"""Stage ``train-irn`` (``labels.method: irn``): IRNet's boundary and displacement branches
trained on the inter-pixel relations of the confident regions (IRN 3.2-3.3): pairs within
``irn.radius`` on the stride-4 grid, the backbone frozen."""
from __future__ import annotations

from typing import Any

from ..models.affinity import pair_labels
from ..models.irnet import STRIDE, irn_loss
from ..pipeline import Stage, register_stage, training_keys
from .common import train_on_pairs


def make_step(radius: int):
    def step(model, batch):
        images, grid_labels = batch
        boundary, displacement = model(images)
        masks = pair_labels(grid_labels, radius)
        return irn_loss(boundary, displacement, masks, radius)
    return step


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    # The confident regions' flips and crops of AffinityNet's training, labels on IRN's grid.
    return train_on_pairs(config, force, "irn", STRIDE, make_step(config["irn"]["radius"]))


STAGE = register_stage(Stage("train_irn", "train-irn", "train IRNet's boundary and displacement branches (IRN 3.2-3.3)",
              keys=("seed", "backbone", "irn.radius") + training_keys("irn"),
              upstream=("confident_regions",), outputs={"model": "model.pt", "log": "log.csv"}, run=run,
              optional_keys=("irn.layout",)))
