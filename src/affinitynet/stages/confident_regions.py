"""Stage ``confident-regions``: confident object / background / neutral label maps from the CAMs
with low and high alpha, each refined by the dense CRF (3.2.1, Fig. 4a); or, with
``affinity.confidence: threshold``, irn's: constant foreground and background thresholds, each
argmax refined by irn's label dCRF."""
from __future__ import annotations

from typing import Any

import torch

from ..engine import distributed
from ..files import load_label_png, load_npz, save_label_png
from ..models.affinity import NEUTRAL, confident_regions, threshold_confident_regions
from ..ops.crf import CRFParams
from ..pipeline import Stage, StageRun, map_images, register_stage, stage
from .common import dataset, setup


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    setup(config)
    job = StageRun(config, "confident_regions", force)
    data = dataset(config, "train_split")
    job.skipped.extend(data.skipped)
    cam_dir = stage("infer_cam").output("cams", config)
    out_dir = STAGE.output("labels", config)
    section = config["affinity"]
    crf_params = CRFParams.from_config(config["crf"])

    counted: dict[str, tuple[int, int]] = {}   # confident and all pixels of each image's map

    def work(sample):
        image = data.load_image(sample)
        stored = load_npz(cam_dir / f"{sample.id}.npz")
        cams, classes = stored["cams"].astype("float32"), stored["classes"].tolist()
        if section["confidence"] == "threshold":
            labels = threshold_confident_regions(image, cams, classes, section["conf_fg_threshold"],
                                                 section["conf_bg_threshold"])
        else:
            labels = confident_regions(image, cams, classes, section["alpha_low"], section["alpha_high"], crf_params)
        save_label_png(out_dir / f"{sample.id}.png", labels)
        counted[sample.id] = (int((labels != NEUTRAL).sum()), labels.size)

    map_images(job, data.samples, lambda s: [out_dir / f"{s.id}.png"], work, "confident-regions",
               config["strict"])
    # A resumed stage's share covers the maps an earlier run wrote too; each process counts its shard.
    for sample in distributed.shard(data.samples):
        path = out_dir / f"{sample.id}.png"
        if sample.id not in counted and path.exists():
            labels = load_label_png(path)
            counted[sample.id] = (int((labels != NEUTRAL).sum()), labels.size)
    counts = torch.tensor([sum(c for c, _ in counted.values()), sum(n for _, n in counted.values())])
    confident, pixels = distributed.all_reduce_sum(counts).tolist()
    share = confident / pixels if pixels else None
    if share is not None and distributed.is_main():
        print(f"[confident_regions] confident pixels: {100 * share:.1f}% (neutral {100 * (1 - share):.1f}%)")
    return job.finish(confident_share=share)


STAGE = register_stage(Stage("confident_regions", "confident-regions",
              "confident object/background regions from low/high alpha + dCRF (3.2.1)",
              keys=("affinity.alpha_low", "affinity.alpha_high", "crf"), upstream=("infer_cam",),
              outputs={"labels": "labels"}, run=run,
              optional_keys=("affinity.confidence", "affinity.conf_fg_threshold", "affinity.conf_bg_threshold")))
