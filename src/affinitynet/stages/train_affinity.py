"""Stage ``train-affinity``: AffinityNet trained on affinity labels drawn from the confident
regions (3.2.2, Eq. 4-10). Its backbone starts from ImageNet, not from the CAM network."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import transforms
from ..affinity import (
    affinity_loss_from_distances,
    downsample_labels,
    feature_distances,
    pair_labels,
)
from ..files import load_label_png
from ..pipeline import Stage, stage, training_keys
from ..training import ImageTrainSet
from . import train_stage


class AffinityTrainSet(ImageTrainSet):
    """Flip, colour jitter and random crop as for the CAM network, no random rescale (5.1); the
    confident-region labels follow the same flip and crop, then move to the feature grid."""

    def __init__(self, data, label_dir, section: dict[str, Any], mean, std, stride: int, seed: int):
        super().__init__(data, seed, load_label=lambda sample: load_label_png(label_dir / f"{sample.id}.png"))
        self.section, self.mean, self.std, self.stride = section, mean, std, stride

    def make_item(self, image, label, sample, rng):
        image, label = transforms.random_flip(image, label, rng)
        image = transforms.color_jitter(image, self.section["color_jitter"], rng)
        image, label, _ = transforms.random_crop(image, label, self.section["crop_size"], rng,
                                                 fill=transforms.mean_fill(self.mean))
        grid = downsample_labels(label, stride=self.stride)
        return transforms.normalize(image, self.mean, self.std), torch.from_numpy(np.ascontiguousarray(grid))


def make_step(radius: int, distance: str):
    def step(model, batch):
        images, grid_labels = batch
        device = next(model.parameters()).device
        features = model(images.to(device, non_blocking=True))
        distances = feature_distances(features, radius, distance)
        masks = pair_labels(grid_labels.to(device), radius)
        loss, parts = affinity_loss_from_distances(distances, masks["pos_fg"], masks["pos_bg"], masks["neg"])
        return loss, {name: float(value) for name, value in parts.items()}
    return step


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    section = config["affinity"]
    labels = stage("confident_regions").output("labels", config)
    return train_stage(config, force, "affinity",
                       # The labels go onto the walk's grid, whatever stride the backbone runs at.
                       lambda data, backbone: AffinityTrainSet(data, labels, section, backbone.mean, backbone.std,
                                                               config["backbone"]["output_stride"], config["seed"]),
                       make_step(section["radius"], section["distance"]))


STAGE = Stage("train_affinity", "train-affinity", "train AffinityNet on the affinity labels (3.2.2, Eq. 7-10)",
              keys=("seed", "backbone", "affinity.radius", "affinity.distance", "affinity.channels")
              + training_keys("affinity"),
              upstream=("confident_regions",), outputs={"model": "model.pt", "log": "log.csv"}, run=run,
              optional_keys=("affinity.backbone_stride",))
