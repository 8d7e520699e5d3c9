"""Stage ``infer-cam``: multi-scale + flip CAMs of every image (Eq. 1) and the CAM-only labels
(background from Eq. 2 or a constant), the "CAM" row of Table 1."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import distributed, transforms
from ..cam import infer_cams, labels_from_scores, with_background
from ..io import save_label_png, save_npz
from ..metrics import format_table
from ..training import for_inference
from ..pipeline import StageRun, map_images, stage_dir
from . import check_model_meta, label_images, load_model_checkpoint, load_weights, score, setup
from .train_cam import build_model, layout


def load_cam_model(config: dict[str, Any], device: torch.device, num_object_classes: int, class_names=None):
    path = stage_dir(config, "train_cam") / "model.pt"
    state, meta = load_model_checkpoint(path)
    check_model_meta(path, meta, class_names, config["backbone"]["name"], "train-cam", layout(config))
    model = build_model(config, num_object_classes, pretrained=False)
    load_weights(model, state, path)
    return model.to(device).eval()


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device = setup(config)
    stage = StageRun(config, "infer_cam", force)
    data = label_images(config)
    stage.skipped.extend(data.skipped)
    model = for_inference(load_cam_model(config, device, data.num_object_classes, data.class_names),
                          device, config["amp"], config["channels_last"], methods=("cams",))
    mean, std = model.backbone.mean, model.backbone.std
    section = config["cam"]
    cam_dir, label_dir = stage.dir / "cams", stage.dir / "labels"

    def outputs(sample):
        return [cam_dir / f"{sample.id}.npz", label_dir / f"{sample.id}.png"]

    def work(sample):
        image = data.load_image(sample)
        tensor = transforms.normalize(image, mean, std).to(device)
        cams = infer_cams(model, tensor, sample.labels, section["scales"], section["flip"]).cpu().numpy()
        scores = with_background(cams, section["eval_alpha"], section["eval_bg_threshold"])
        save_label_png(label_dir / f"{sample.id}.png", labels_from_scores(scores, sample.labels))
        # float16 halves the disk; CAMs live in [0, 1] where its 3 decimal digits are plenty.
        save_npz(cam_dir / f"{sample.id}.npz", classes=np.asarray(sample.labels, dtype=np.int16),
                 cams=cams.astype(np.float16))

    map_images(stage, data.samples, outputs, work, "infer-cam", config["strict"])
    distributed.barrier()
    result = score(config, label_dir, "label_split", "CAM")
    if result is not None:
        print(format_table({"CAM": result["iou"]}, data.class_names,
                           f"Table 1 (CAM only), {result['split']}: mIoU {result['miou']:.1f}"))
    return stage.finish(cam=result)
