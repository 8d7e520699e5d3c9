"""Stage ``irn-instances`` (``labels.method: irn``): IRN's instance pseudo labels (IRN 3.4;
``instance_labels``). Per image: IRNet's displacement field (image and mirror averaged) gives the
instances' seed areas, each class's CAM restricted to each is walked on the boundary affinities at
stride 4, and the semantic pseudo labels of ``irn-walk`` are split among the instances; with
``irn.background: threshold``, irn's way: every class in every group of cells walked with the CAMs
times ``1 - B``, and each pixel given to the largest walked seed or, under
``irn.instance_bg_threshold``, to the background.

Writes a SegmentationObject-style PNG and a JSON of classes and scores per image, and one
COCO-style ``instances.json``. Where the label split has instance ground truth (VOC's
``SegmentationObject``, the demo) it prints IRN's Table 3: mAP^r at IoU 0.25, 0.5 and 0.75."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.datasets.coco import coco_document
from ..engine import distributed
from ..errors import InputError
from ..files import IGNORE_INDEX, load_label_png, load_npz, write_json
from ..metrics import format_table, instance_average_precision
from ..models.irnet import STRIDE
from ..ops.instance_labels import (
    group_seeds,
    instance_seeds,
    load_instances,
    save_instances,
    split_instances,
    threshold_instances,
)
from ..ops.inter_pixel import instance_map
from ..ops.pseudo_labels import to_grid, to_image
from ..ops.random_walk import random_walk
from ..pipeline import Stage, map_images, register_stage, stage
from .common import dataset, relations, start

THRESHOLDS = (0.25, 0.5, 0.75)


def instances_of(model, image: np.ndarray, cams: np.ndarray, classes, semantic: np.ndarray,
                 section: dict[str, Any], device: torch.device):
    """The instances (``metrics.Instance``, highest score first) of one image from its CAMs
    (K, H, W) of ``classes`` and its semantic pseudo labels (H, W)."""
    if len(classes) == 0:
        return []
    boundary, displacement, affinities = relations(model, image, section["radius"], device)
    ids = instance_map(displacement.cpu().numpy())
    grid = to_grid(torch.from_numpy(np.asarray(cams, dtype=np.float32)), STRIDE).numpy()
    irn = section["background"] == "threshold"
    seeds, owners = group_seeds(grid, classes, ids) if irn else instance_seeds(grid, classes, ids)
    if not owners:
        return []
    seeds = torch.from_numpy(seeds)
    if irn:   # irn's walk input: the seeds times (1 - B)
        seeds = seeds * (1 - boundary.float().cpu())
    walked = random_walk(seeds, affinities=affinities, radius=section["radius"], beta=section["beta"], t=section["t"])
    walked = to_image(walked.float().cpu(), image.shape[0], image.shape[1], STRIDE).numpy()
    if irn:
        return threshold_instances(walked, owners, section["instance_bg_threshold"])
    return split_instances(semantic, walked, owners)


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device, job, data, model = start(config, "irn_instances", force)
    section = config["irn"]
    cam_dir = stage("infer_cam").output("cams", config)
    semantic_dir = stage("irn_walk").output("pseudo_labels", config)
    objects, detections = STAGE.output("objects", config), STAGE.output("detections", config)

    def outputs(sample):
        return [objects / f"{sample.id}.png", detections / f"{sample.id}.json"]

    def work(sample):
        image = data.load_image(sample)
        stored = load_npz(cam_dir / f"{sample.id}.npz")
        semantic = load_label_png(semantic_dir / f"{sample.id}.png")
        if semantic.shape != image.shape[:2]:
            raise InputError(semantic_dir / f"{sample.id}.png", "pseudo labels differ in size from their image")
        found = instances_of(model, image, stored["cams"], stored["classes"].tolist(), semantic, section, device)
        save_instances(objects / f"{sample.id}.png", detections / f"{sample.id}.json", found, semantic.shape,
                       semantic == IGNORE_INDEX)

    map_images(job, data.samples, outputs, work, "irn-instances", config["strict"])
    distributed.barrier()
    result: dict[str, Any] = {}
    if distributed.is_main():
        written = [(sample, *load_instances(*outputs(sample))) for sample in data.samples
                   if all(path.exists() for path in outputs(sample))]
        write_json(STAGE.output("coco", config), coco_document(
            [(s.id, s.image_path.name, shape, found) for s, found, shape in written], data.class_names))
        result = table3(config, {s.id: found for s, found, _ in written})
    return job.finish(**result)


def table3(config: dict[str, Any], predicted: dict[str, list]) -> dict[str, Any]:
    """mAP^r of the instance labels on the label split where it has instance ground truth
    (printed as IRN's Table 3); {} without."""
    scored = dataset(config, "label_split")
    if not scored.has_instances:
        return {}
    predictions, truths, skipped = [], [], []
    for sample in scored.samples:
        if sample.instance_path is None or sample.id not in predicted:
            continue
        try:
            truths.append(scored.load_instances(sample))
        except InputError as error:
            skipped.append(str(error))
            continue
        predictions.append(predicted[sample.id])
    scores = instance_average_precision(predictions, truths, scored.num_classes, THRESHOLDS)
    names = scored.class_names[1:]
    rows = {f"mAP^r@{t:g}": {**dict(zip(names, scores[f"{t:g}"]["ap"])), "mean": scores[f"{t:g}"]["map"]}
            for t in THRESHOLDS}
    print(format_table(rows, names, f"Table 3: instance pseudo labels on {scored.name} {scored.split}, "
                                    f"{len(truths)} images (AP %)"))
    return {"map_r": {f"{t:g}": scores[f"{t:g}"]["map"] for t in THRESHOLDS},
            "ap_r": {f"{t:g}": dict(zip(names, scores[f"{t:g}"]["ap"])) for t in THRESHOLDS},
            "instance_images": len(truths), "instance_skipped": skipped}


STAGE = register_stage(Stage("irn_instances", "irn-instances",
              "IRN's instance pseudo labels: centroids, a walk per instance, COCO and VOC files (IRN 3.4)",
              keys=("irn.radius", "irn.beta", "irn.t"), upstream=("infer_cam", "train_irn", "irn_walk"),
              outputs={"objects": "SegmentationObject", "detections": "detections", "coco": "instances.json"},
              run=run, companion_of="irn", optional_keys=("irn.background", "irn.instance_bg_threshold")))
