"""Stage ``train-affinity``: AffinityNet trained on affinity labels drawn from the confident
regions (3.2.2, Eq. 4-10). Its backbone starts from ImageNet, not from the CAM network."""
from __future__ import annotations

from typing import Any

from ..models.affinity import (
    affinity_loss_from_distances,
    feature_distances,
    pair_labels,
)
from ..pipeline import Stage, register_stage, training_keys
from .common import train_on_pairs


def make_step(radius: int, distance: str):
    def step(model, batch):
        images, grid_labels = batch
        distances = feature_distances(model(images), radius, distance)
        masks = pair_labels(grid_labels, radius)
        loss, parts = affinity_loss_from_distances(distances, masks["pos_fg"], masks["pos_bg"], masks["neg"])
        return loss, {name: float(value) for name, value in parts.items()}
    return step


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    section = config["affinity"]
    # The labels go onto the walk's grid, whatever stride the backbone runs at.
    return train_on_pairs(config, force, "affinity", config["backbone"]["output_stride"],
                          make_step(section["radius"], section["distance"]))


STAGE = register_stage(Stage("train_affinity", "train-affinity", "train AffinityNet on the affinity labels (3.2.2, Eq. 7-10)",
              keys=("seed", "backbone", "affinity.radius", "affinity.distance", "affinity.channels")
              + training_keys("affinity"),
              upstream=("confident_regions",), outputs={"model": "model.pt", "log": "log.csv"}, run=run,
              optional_keys=("affinity.backbone_stride",)))
