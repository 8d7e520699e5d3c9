"""Stage ``train-irn`` (``labels.method: irn``): IRNet's boundary and displacement branches
trained on the inter-pixel relations of the confident regions (IRN 3.2-3.3): pairs within
``irn.radius`` on the stride-4 grid, the backbone frozen."""
from __future__ import annotations

from typing import Any

from ..affinity import pair_labels
from ..irnet import STRIDE, irn_loss
from ..pipeline import Stage, stage, training_keys
from . import train_stage
from .train_affinity import AffinityTrainSet


def make_step(radius: int):
    def step(model, batch):
        images, grid_labels = batch
        device = next(model.parameters()).device
        boundary, displacement = model(images.to(device, non_blocking=True))
        masks = pair_labels(grid_labels.to(device), radius)
        return irn_loss(boundary, displacement, masks, radius)
    return step


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    section = config["irn"]
    labels = stage("confident_regions").output("labels", config)
    # The confident regions' flips and crops of AffinityNet's training, labels on IRN's grid.
    return train_stage(config, force, "irn",
                       lambda data, backbone: AffinityTrainSet(data, labels, section, backbone.mean, backbone.std,
                                                               STRIDE, config["seed"]),
                       make_step(section["radius"]))


STAGE = Stage("train_irn", "train-irn", "train IRNet's boundary and displacement branches (IRN 3.2-3.3)",
              keys=("seed", "backbone", "irn.radius") + training_keys("irn"),
              upstream=("confident_regions",), outputs={"model": "model.pt", "log": "log.csv"}, run=run)
