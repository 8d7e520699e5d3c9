"""Stage ``random-walk``: AffinityNet's affinities for every image, the random walk that revises
its CAMs (3.3, Eq. 11-12), and the pseudo labels (3.4): Table 1's rows CAM+RW and CAM+RW+dCRF.

Per image it keeps the affinities (float16, the input of ``affinitynet sweep``), a boundary
picture (Fig. 5d), the CAM+RW labels and the pseudo labels that train the segmentation network:
the walk's labels refined as ``random_walk.crf`` says (``pseudo_labels.REFINEMENTS``). With the
``band`` refinement the paper's whole-image dCRF labels are kept beside them (``crf_labels``), so
that Table 1 always has the paper's row.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data import transforms
from ..engine import distributed
from ..engine.precision import for_inference
from ..errors import ConfigError
from ..files import load_npz, save_npz, save_rgb_png
from ..models.affinity import boundary_image, boundary_map
from ..ops.crf import CRFParams
from ..ops.pseudo_labels import label_maps, refined_rows, save_refined
from ..ops.random_walk import pair_affinities
from ..pipeline import Stage, StageRun, map_images, register_stage, stage
from .common import affinity_features, label_images, load_network, setup, table1


def label_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(Table 1 title, output) of each kind of label this stage writes under ``config``, in the
    order of the pipeline. The last row's labels are those in ``pseudo_labels``, which train the
    segmentation network."""
    return refined_rows("CAM+RW", config["random_walk"]["crf"])


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device = setup(config)
    job = StageRun(config, "random_walk", force)
    data = label_images(config)
    job.skipped.extend(data.skipped)
    model = for_inference(load_network("affinity", config, device, data.num_classes, data.class_names), device,
                          config["amp"], config["channels_last"], methods=("features",))
    section = config["random_walk"]
    # AffinityNet sees the image enlarged by `scale`, so one grid cell spans stride / scale pixels.
    stride = model.output_stride / section["scale"]
    if stride != int(stride) or stride < 1:
        raise ConfigError(f"config key 'random_walk.scale' must divide the output stride "
                          f"{model.output_stride} into whole pixels (e.g. 1, 2, 4), got {section['scale']}")
    stride = int(stride)
    distance = config["affinity"]["distance"]
    # The config's rule has already refused any other value.
    mode = section["crf"]
    crf = CRFParams.from_config(config["crf"]) if mode != "off" else None
    cam_dir = stage("infer_cam").output("cams", config)
    dirs = {name: STAGE.output(name, config) for name in STAGE.outputs}
    label_folders = {folder for _, folder in label_rows(config)} | {"pseudo_labels"}

    def outputs(sample):
        return ([dirs["affinities"] / f"{sample.id}.npz", dirs["boundaries"] / f"{sample.id}.png"]
                + [dirs[folder] / f"{sample.id}.png" for folder in sorted(label_folders)])

    def work(sample):
        image = data.load_image(sample)
        stored = load_npz(cam_dir / f"{sample.id}.npz")
        height, width = image.shape[:2]
        # Rounded up: AffinityNet's grid is then ceil(ceil(H * scale) / os) = ceil(H / stride), the
        # CAMs' grid. Rounding to nearest gave a 16x16 grid for a 513 px image at scale 0.25,
        # whose CAM grid is 17x17; at whole scales the two roundings agree.
        seen = image if section["scale"] == 1 else transforms.resize_image(
            image, (math.ceil(height * section["scale"]), math.ceil(width * section["scale"])))
        with torch.no_grad():
            features = affinity_features(model, seen, device, section["flip"])
            affinities = pair_affinities(features, section["radius"], distance)
            boundaries = boundary_image(boundary_map(features, section["radius"], distance))
        # The walk uses the float16 values it stores, so the sweep reproduces these labels exactly.
        affinities16 = affinities.half()  # stays on the device: the walk runs there
        walked, refined = label_maps(image, stored["cams"].astype(np.float32), stored["classes"].tolist(),
                                     affinities16.float(), section["alpha"], section["beta"], section["t"],
                                     section["radius"], stride, crf)
        big = np.asarray(Image.fromarray(boundaries).resize((width, height), Image.NEAREST))
        save_rgb_png(dirs["boundaries"] / f"{sample.id}.png", np.repeat(big[:, :, None], 3, axis=2))
        save_refined(dirs, sample.id, mode, walked, refined, stride)
        save_npz(dirs["affinities"] / f"{sample.id}.npz", affinities=affinities16.cpu().numpy(),
                 stride=np.int16(stride))

    map_images(job, data.samples, outputs, work, "random-walk", config["strict"])
    distributed.barrier()
    return job.finish(table1=table1(config, data, [("CAM", stage("infer_cam").output("labels", config))]
                                    + [(title, dirs[folder]) for title, folder in label_rows(config)]))


STAGE = register_stage(Stage("random_walk", "random-walk", "random walk with AffinityNet and the pseudo labels (3.3-3.4, Table 1)",
              keys=("random_walk", "affinity.distance", "crf"), upstream=("infer_cam", "train_affinity"),
              outputs={name: name for name in ("affinities", "boundaries", "rw_labels", "crf_labels", "pseudo_labels")},
              run=run, label_method="affinitynet", label_rows=label_rows, optional_keys=("random_walk.flip",)))
