"""Stage ``train-cam``: the multi-label classifier whose CAMs seed everything (3.1, 4.2)."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from .. import transforms
from ..pipeline import Stage, training_keys
from ..training import ImageTrainSet
from . import train_stage


class CAMTrainSet(ImageTrainSet):
    """Random rescale of the long side, flip, colour jitter, random crop (5.1)."""

    def __init__(self, data, section: dict[str, Any], mean, std, seed: int):
        super().__init__(data, seed)
        self.section, self.mean, self.std = section, mean, std

    def make_item(self, image, label, sample, rng):
        low, high = self.section["resize_long"]
        image, _ = transforms.random_resize_long(image, None, low, high, rng)
        image, _ = transforms.random_flip(image, None, rng)
        image = transforms.color_jitter(image, self.section["color_jitter"], rng)
        image, _, _ = transforms.random_crop(image, None, self.section["crop_size"], rng,
                                             fill=transforms.mean_fill(self.mean))
        return transforms.normalize(image, self.mean, self.std), self.dataset.multi_hot(sample)


def classification_step(model, batch):
    images, targets = batch
    device = next(model.parameters()).device
    logits = model(images.to(device, non_blocking=True))
    return F.multilabel_soft_margin_loss(logits, targets.to(device, non_blocking=True)), {}


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    section = config["cam"]
    return train_stage(config, force, "cam",
                       lambda data, backbone: CAMTrainSet(data, section, backbone.mean, backbone.std, config["seed"]),
                       classification_step)


STAGE = Stage("train_cam", "train-cam", "train the CAM network (paper 3.1, 4.2)",
              keys=("seed", "backbone", "cam.head", "cam.head_channels", "cam.resize_long")
              + training_keys("cam"),
              upstream=(), outputs={"model": "model.pt", "log": "log.csv"}, run=run,
              optional_keys=("cam.train_output_stride", "cam.fine_tune_epochs"))
