"""Stage ``train-cam``: the multi-label classifier whose CAMs seed everything (3.1, 4.2)."""
from __future__ import annotations

from typing import Any

import torch.nn.functional as F

from .. import transforms
from ..backbones import create_backbone
from ..cam import CAMNet
from ..pipeline import StageRun
from ..training import ImageTrainSet
from . import dataset, imagenet_weights, setup, train_network


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


def build_model(config: dict[str, Any], num_object_classes: int, pretrained=True) -> CAMNet:
    backbone_cfg = config["backbone"]
    weights = imagenet_weights(config, pretrained)
    backbone = create_backbone(backbone_cfg["name"], output_stride=backbone_cfg["output_stride"], pretrained=weights,
                               atrous=backbone_cfg["atrous"])
    return CAMNet(backbone, num_object_classes, config["cam"]["head_channels"], config["cam"]["head"])


def model_meta(config: dict[str, Any], class_names, backbone) -> dict[str, Any]:
    """What ``model.pt`` records beside the weights (also written by ``import-weights``)."""
    return {"kind": "cam", "class_names": list(class_names), "backbone": config["backbone"]["name"],
            "output_stride": config["backbone"]["output_stride"], "atrous": config["backbone"]["atrous"],
            "head": config["cam"]["head"], "head_channels": config["cam"]["head_channels"],
            "mean": list(backbone.mean), "std": list(backbone.std)}


def layout(config: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """The meta keys that must match the config for the weights to mean what they meant."""
    return {"head": ("cam.head", config["cam"]["head"]), "atrous": ("backbone.atrous", config["backbone"]["atrous"])}


def classification_step(model, batch):
    images, targets = batch
    device = next(model.parameters()).device
    logits = model(images.to(device, non_blocking=True))
    return F.multilabel_soft_margin_loss(logits, targets.to(device, non_blocking=True)), {}


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device = setup(config)
    stage = StageRun(config, "train_cam", force)
    data = dataset(config, "train_split")
    stage.skipped.extend(data.skipped)
    model = build_model(config, data.num_object_classes)
    section = config["cam"]
    backbone = model.backbone
    meta = model_meta(config, data.class_names, backbone)
    result = train_network(config, stage, device, model, section,
                           CAMTrainSet(data, section, backbone.mean, backbone.std, config["seed"]),
                           classification_step, meta, "cam")
    return stage.finish(epochs=result.epochs, final_loss=result.history[-1].get("loss") if result.history else None)
