"""Stage ``infer-seg``: the segmentation network on every image of the evaluation split, with the
multi-scale + flip averaging of Appendix A.2 (and the dense CRF if ``segmentation.crf``), scored
in the layout of Table 2 (per class IoU and mean)."""
from __future__ import annotations

from typing import Any

from ..engine import distributed
from ..files import save_label_png
from ..metrics import format_table
from ..models.segmentation import predict_labels
from ..pipeline import Stage, StageRun, map_images, register_stage
from .common import dataset, score, segmentation_model, setup


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device = setup(config)
    job = StageRun(config, "infer_seg", force)
    data = dataset(config, "eval_split")
    job.skipped.extend(data.skipped)
    model, meta = segmentation_model(config, "train_seg", device, data.class_names)
    section = config["segmentation"]
    crf = config["crf"] if section["crf"] else None
    pred_dir = STAGE.output("predictions", config)

    def outputs(sample):
        return [pred_dir / f"{sample.id}.png"]

    def work(sample):
        image = data.load_image(sample)
        labels = predict_labels(model, image, meta["mean"], meta["std"], section["scales"], section["flip"], crf)
        save_label_png(pred_dir / f"{sample.id}.png", labels)

    map_images(job, data.samples, outputs, work, "infer-seg", config["strict"])
    distributed.barrier()
    row = ("Fully supervised" if meta.get("supervision") == "gt" else "Ours") + f"-{meta['backbone']}"
    result = score(config, pred_dir, "eval_split", row)
    if result is not None:
        print(format_table({row: result}, data.class_names,
                           f"Table 2 layout (segmentation network), {result['split']}: mIoU "
                           f"{result['miou']:.1f} over {result['num_images']} images"))
    return job.finish(segmentation=result)


STAGE = register_stage(Stage("infer_seg", "infer-seg", "segment the evaluation split, multi-scale + flip (A.2)",
              keys=("dataset.eval_split", "segmentation.scales", "segmentation.flip", "segmentation.crf", "crf"),
              upstream=("train_seg",), outputs={"predictions": "predictions"}, run=run))
