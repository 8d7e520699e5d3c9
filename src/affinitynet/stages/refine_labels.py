"""Stage ``refine-labels``: the refinement round's labels (``labels.refine``). The first network
(``draft_seg``), trained on the label method's pseudo labels, segments every label image with the
multi-scale + flip averaging of Appendix A.2, restricted to the image's tags; its label replaces
the method's where it is confident, and a pixel where the two differ and it is not is ignored
(``pseudo_labels.network_refinement``). These labels train ``train_seg`` in place of the method's.
"""
from __future__ import annotations

from typing import Any

from ..data.transforms import normalize
from ..engine import distributed
from ..files import load_label_png, save_label_png
from ..models.segmentation import predict_scores
from ..ops.pseudo_labels import network_refinement, tagged_prediction
from ..pipeline import Stage, StageRun, label_stage, map_images, register_stage
from .common import label_images, segmentation_model, setup, table1


def label_rows(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(Table 1 title, output) of the round's labels; the last, ``pseudo_labels``, trains the network."""
    return [("First network", "network_labels"), ("Refined", "pseudo_labels")]


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    device = setup(config)
    job = StageRun(config, STAGE.name, force)
    data = label_images(config)
    job.skipped.extend(data.skipped)
    model, meta = segmentation_model(config, "draft_seg", device, data.class_names)
    section = config["segmentation"]
    threshold = config["labels"]["refine_confidence"]
    method_dir = label_stage(config).output("pseudo_labels", config)
    dirs = {name: STAGE.output(name, config) for name in STAGE.outputs}

    def outputs(sample):
        return [dirs[name] / f"{sample.id}.png" for name in sorted(dirs)]

    def work(sample):
        labels = load_label_png(method_dir / f"{sample.id}.png")
        image = data.load_image(sample)
        probs = predict_scores(model, normalize(image, meta["mean"], meta["std"]).to(device), section["scales"],
                               section["flip"])
        network, confidence = tagged_prediction(probs.float().cpu().numpy(), sample.labels)
        save_label_png(dirs["network_labels"] / f"{sample.id}.png", network)
        save_label_png(dirs["pseudo_labels"] / f"{sample.id}.png",
                       network_refinement(labels, network, confidence, threshold))

    map_images(job, data.samples, outputs, work, "refine-labels", config["strict"])
    distributed.barrier()
    method_title = label_stage(config).label_rows(config)[-1][0]
    return job.finish(table1=table1(config, data, [(method_title, method_dir)]
                                    + [(title, dirs[folder]) for title, folder in label_rows(config)]))


STAGE = register_stage(Stage("refine_labels", "refine-labels", "refinement round: the first network's labels with "
                                                               "the method's (labels.refine)",
              keys=("labels.refine_confidence", "segmentation.scales", "segmentation.flip"),
              upstream=lambda config: ("draft_seg", label_stage(config).name),
              outputs={"network_labels": "network_labels", "pseudo_labels": "pseudo_labels"}, run=run,
              label_rows=label_rows, refines_labels=True))
