"""Stage ``train-recam``: ReCAM (Chen et al., CVPR 2022), the trained CAM network fine-tuned with a
second classifier on its class-pooled features; ``cam.method: recam`` reads its maps."""
from __future__ import annotations

from typing import Any

from ..models.cam import recam_loss
from ..models.networks import load_weights, network
from ..pipeline import Stage, register_stage, training_keys
from .common import CAMTrainSet, train_stage, trained_weights

# ReCAM's own keys; the images, batches and optimizer are the CAM network's (training_keys("cam")).
RECAM_KEYS = tuple(f"recam.{key}" for key in network("recam").own_keys + ("loss_weight",))


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    cam = config["cam"]

    def start_from_cam(model, data):
        path, state = trained_weights("cam", config, data.class_names)
        load_weights(model, model.with_recam(state), path)

    def step(model, batch):
        images, targets = batch
        loss, cross_entropy = recam_loss(*model(images), targets, config["recam"]["loss_weight"])
        return loss, {"recam": float(cross_entropy.detach())}

    return train_stage(config, force, "recam",
                       lambda data, backbone: CAMTrainSet(data, cam, backbone.mean, backbone.std, config["seed"]),
                       step, init=start_from_cam)


STAGE = register_stage(Stage("train_recam", "train-recam", "fine-tune the CAM network with ReCAM's loss "
                                                           "(cam.method: recam)",
              keys=("seed", "backbone", "cam.head", "cam.head_channels", "cam.resize_long") + training_keys("cam")
              + RECAM_KEYS,
              upstream=("train_cam",), outputs={"model": "model.pt", "log": "log.csv"}, run=run,
              optional_keys=("cam.train_output_stride",)))
