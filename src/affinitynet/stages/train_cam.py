"""Stage ``train-cam``: the multi-label classifier whose CAMs seed everything (3.1, 4.2)."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from ..pipeline import Stage, register_stage, training_keys
from .common import CAMTrainSet, train_stage


def classification_step(model, batch):
    images, targets = batch
    return F.multilabel_soft_margin_loss(model(images), targets), {}


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    section = config["cam"]
    return train_stage(config, force, "cam",
                       lambda data, backbone: CAMTrainSet(data, section, backbone.mean, backbone.std, config["seed"]),
                       classification_step)


STAGE = register_stage(Stage("train_cam", "train-cam", "train the CAM network (paper 3.1, 4.2)",
              keys=("seed", "backbone", "cam.head", "cam.head_channels", "cam.resize_long")
              + training_keys("cam"),
              upstream=(), outputs={"model": "model.pt", "log": "log.csv"}, run=run,
              optional_keys=("cam.train_output_stride", "cam.fine_tune_epochs")))
