"""Stage ``walk-cams`` (``affinity.refine_cams``): a class-wise refinement of the CAMs by the
first AffinityNet's affinities before the confident regions are cut. Each image's CAMs are walked
as the walk walks them (Eq. 11-12, ``random_walk``'s alpha, beta, t and radius) and each class's
walked map is divided by its maximum again (Eq. 1's normalisation): ``confident_regions`` then
cuts the regions of these maps, and the second AffinityNet (``train_affinity``) learns from them."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..engine import distributed
from ..engine.precision import for_inference
from ..files import load_npz, save_npz
from ..models.cam import divide_by_peak
from ..ops.pseudo_labels import walk_scores
from ..ops.random_walk import pair_affinities
from ..pipeline import Stage, StageRun, map_images, register_stage, stage
from .common import affinity_features, label_images, load_network, setup


def walked_cams(cams: np.ndarray, affinities: torch.Tensor, section: dict[str, Any], stride: int) -> np.ndarray:
    """The CAMs (K, H, W) walked with ``affinities`` (the background of Eq. 2 walks beside them and
    is dropped: each class walks on its own), each divided by its maximum."""
    walked = walk_scores(cams, affinities, section["alpha"], section["beta"], section["t"], section["radius"],
                         stride)[1:]
    return divide_by_peak(walked).numpy()


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device = setup(config)
    job = StageRun(config, STAGE.name, force)
    data = label_images(config)
    job.skipped.extend(data.skipped)
    model = for_inference(load_network("affinity", config, device, data.num_classes, data.class_names,
                                       name="draft_affinity"),
                          device, config["amp"], config["channels_last"], methods=("features",))
    section, distance = config["random_walk"], config["affinity"]["distance"]
    cam_dir, out_dir = stage("infer_cam").output("cams", config), STAGE.output("cams", config)

    def work(sample):
        image = data.load_image(sample)
        stored = load_npz(cam_dir / f"{sample.id}.npz")
        with torch.no_grad():
            affinities = pair_affinities(affinity_features(model, image, device), section["radius"], distance)
        maps = walked_cams(stored["cams"].astype(np.float32), affinities.float(), section, model.output_stride)
        save_npz(out_dir / f"{sample.id}.npz", classes=stored["classes"], cams=maps.astype(np.float16))

    map_images(job, data.samples, lambda s: [out_dir / f"{s.id}.npz"], work, STAGE.command, config["strict"])
    distributed.barrier()
    return job.finish()


STAGE = register_stage(Stage("walk_cams", "walk-cams", "affinity.refine_cams: the CAMs walked with the first "
                                                       "AffinityNet, class by class (Eq. 11-12)",
              keys=("random_walk.alpha", "random_walk.beta", "random_walk.t", "random_walk.radius",
                    "affinity.distance"),
              upstream=("infer_cam", "draft_affinity"), outputs={"cams": "cams"}, run=run))
