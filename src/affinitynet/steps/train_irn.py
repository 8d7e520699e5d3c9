"""Stage ``train-irn`` (``labels.method: irn``): IRNet's boundary and displacement branches
trained on the inter-pixel relations of the confident regions (IRN 3.2-3.3): pairs within
``irn.radius`` on the stride-4 grid, the backbone frozen."""
from __future__ import annotations

from typing import Any

from ..affinity import pair_labels
from ..irnet import STRIDE, irn_loss
from ..networks import build_network, network_meta
from ..pipeline import Stage, StageRun, stage, training_keys
from . import dataset, setup, train_network
from .train_affinity import AffinityTrainSet


def make_step(radius: int):
    def step(model, batch):
        images, grid_labels = batch
        device = next(model.parameters()).device
        boundary, displacement = model(images.to(device, non_blocking=True))
        masks = pair_labels(grid_labels.to(device), radius)
        return irn_loss(boundary, displacement, masks, radius)
    return step


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device = setup(config)
    job = StageRun(config, "train_irn", force)
    data = dataset(config, "train_split")
    job.skipped.extend(data.skipped)
    model = build_network("irn", config, data.num_classes)
    section = config["irn"]
    backbone = model.backbone
    meta = network_meta("irn", config, data.class_names, backbone)
    # The confident regions' flips and crops of AffinityNet's training, labels on IRN's grid.
    train_set = AffinityTrainSet(data, stage("confident_regions").output("labels", config), section,
                                 backbone.mean, backbone.std, STRIDE, config["seed"])
    result = train_network(config, job, device, model, section, train_set, make_step(section["radius"]), meta, "irn")
    return job.finish(epochs=result.epochs, final_loss=result.history[-1].get("loss") if result.history else None)


STAGE = Stage("train_irn", "train-irn", "train IRNet's boundary and displacement branches (IRN 3.2-3.3)",
              keys=("seed", "backbone", "irn.radius") + training_keys("irn"),
              upstream=("confident_regions",), outputs={"model": "model.pt", "log": "log.csv"}, run=run)
