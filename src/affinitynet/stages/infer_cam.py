"""Stage ``infer-cam``: multi-scale + flip CAMs of every image (Eq. 1) and the CAM-only labels
(background from Eq. 2 or a constant), the "CAM" row of Table 1."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..data import transforms
from ..engine import distributed
from ..engine.precision import for_inference
from ..files import save_label_png, save_npz
from ..metrics import format_table
from ..models.cam import infer_cams, method_network
from ..models.networks import network
from ..ops.background import labels_from_scores, with_background
from ..pipeline import Stage, StageRun, map_images, register_stage
from .common import label_images, load_network, score, setup


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device = setup(config)
    job = StageRun(config, "infer_cam", force)
    data = label_images(config)
    job.skipped.extend(data.skipped)
    section = config["cam"]
    model = for_inference(load_network(method_network(section["method"]), config, device, data.num_classes,
                                       data.class_names),
                          device, config["amp"], config["channels_last"], methods=("cams", "features", "classify"))
    mean, std = model.backbone.mean, model.backbone.std
    cam_dir, label_dir = STAGE.output("cams", config), STAGE.output("labels", config)

    def outputs(sample):
        return [cam_dir / f"{sample.id}.npz", label_dir / f"{sample.id}.png"]

    def work(sample):
        image = data.load_image(sample)
        tensor = transforms.normalize(image, mean, std).to(device)
        cams = infer_cams(model, tensor, sample.labels, section["scales"], section["flip"],
                          section["method"]).cpu().numpy()
        scores = with_background(cams, section["eval_alpha"], section["eval_bg_threshold"])
        save_label_png(label_dir / f"{sample.id}.png", labels_from_scores(scores, sample.labels))
        # float16 halves the disk; CAMs live in [0, 1] where its 3 decimal digits are plenty.
        save_npz(cam_dir / f"{sample.id}.npz", classes=np.asarray(sample.labels, dtype=np.int16),
                 cams=cams.astype(np.float16))

    map_images(job, data.samples, outputs, work, "infer-cam", config["strict"])
    distributed.barrier()
    result = score(config, label_dir, "label_split", "CAM")
    if result is not None:
        print(format_table({"CAM": result["iou"]}, data.class_names,
                           f"Table 1 (CAM only), {result['split']}: mIoU {result['miou']:.1f}"))
    return job.finish(cam=result)


STAGE = register_stage(Stage("infer_cam", "infer-cam", "multi-scale CAMs and the CAM-only labels (Eq. 1-2, Table 1 'CAM')",
              keys=("dataset.label_split", "cam.scales", "cam.flip", "cam.eval_alpha", "cam.eval_bg_threshold"),
              upstream=lambda config: (network(method_network(config["cam"]["method"])).stage,),
              outputs={"cams": "cams", "labels": "labels"}, run=run,
              optional_keys=("cam.method",)))
