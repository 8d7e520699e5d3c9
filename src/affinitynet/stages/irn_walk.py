"""Stage ``irn-walk`` (``labels.method: irn``): IRN's semantic pseudo labels (IRN 3.4). Per image
the class-boundary map of IRNet (the image and its mirror averaged), affinities ``1 - max B``
along each pair's path, and the walk of Eq. 11-12 on the stride-4 grid, sparse and exact; the
labels refined as ``irn.crf`` says. Table 1's rows IRN, IRN+dCRF. The walk's background is Eq. 2's
(``irn.alpha``) or, with ``irn.background: threshold``, irn's constant ``irn.bg_threshold`` over
the CAMs times ``1 - B``."""
from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from ..engine import distributed
from ..files import load_npz, save_rgb_png
from ..models.irnet import STRIDE
from ..ops.crf import CRFParams
from ..ops.pseudo_labels import label_maps, refined_rows, save_refined
from ..pipeline import Stage, map_images, register_stage, stage
from .common import relations, start, table1


def label_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(Table 1 title, output) of each kind of label this stage writes, the training labels last."""
    return refined_rows("CAM+IRN", config["irn"]["crf"])


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device, job, data, model = start(config, "irn_walk", force)
    section = config["irn"]
    mode = section["crf"]
    crf = CRFParams.from_config(config["crf"]) if mode != "off" else None
    cam_dir = stage("infer_cam").output("cams", config)
    dirs = {name: STAGE.output(name, config) for name in STAGE.outputs}
    folders = sorted({folder for _, folder in label_rows(config)} | {"pseudo_labels"})

    def outputs(sample):
        return [dirs["boundaries"] / f"{sample.id}.png"] + [dirs[f] / f"{sample.id}.png" for f in folders]

    def work(sample):
        image = data.load_image(sample)
        stored = load_npz(cam_dir / f"{sample.id}.npz")
        boundary, _, affinities = relations(model, image, section["radius"], device)
        threshold = section["bg_threshold"] if section["background"] == "threshold" else None
        walked, refined = label_maps(image, stored["cams"].astype(np.float32), stored["classes"].tolist(),
                                     affinities, section["alpha"], section["beta"], section["t"],
                                     section["radius"], STRIDE, crf, threshold=threshold, boundary=boundary.cpu())
        picture = np.round(boundary.cpu().numpy() * 255).astype(np.uint8)
        big = np.asarray(Image.fromarray(picture).resize(image.shape[1::-1], Image.NEAREST))
        save_rgb_png(dirs["boundaries"] / f"{sample.id}.png", np.repeat(big[:, :, None], 3, axis=2))
        save_refined(dirs, sample.id, mode, walked, refined, STRIDE)

    map_images(job, data.samples, outputs, work, "irn-walk", config["strict"])
    distributed.barrier()
    return job.finish(table1=table1(config, data, [("CAM", stage("infer_cam").output("labels", config))]
                                    + [(title, dirs[folder]) for title, folder in label_rows(config)]))


STAGE = register_stage(Stage("irn_walk", "irn-walk", "IRN's semantic pseudo labels: boundary affinities and the walk (IRN 3.4)",
              keys=("irn.alpha", "irn.beta", "irn.t", "irn.radius", "irn.crf", "crf"),
              upstream=("infer_cam", "train_irn"),
              outputs={name: name for name in ("boundaries", "rw_labels", "crf_labels", "pseudo_labels")},
              run=run, label_method="irn", label_rows=label_rows,
              optional_keys=("irn.background", "irn.bg_threshold")))
