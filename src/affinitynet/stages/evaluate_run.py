"""Stage ``evaluate-run``: every stage's labels scored on the ground truth, gathered in
``<run_dir>/results.json`` and printed as Table 1 (pseudo labels), Table 2 (network, per class)
and Table 5 (CAM / CAM+RW / CAM+RW+dCRF / final network). With ground truth or without, the
labels' coverage of the tagged classes (``coverage``) is measured too."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..data.label_coverage import run_coverage
from ..engine import distributed
from ..files import read_json, write_json
from ..metrics import format_table
from ..pipeline import (
    MARKER,
    Stage,
    StageRun,
    companion_stages,
    label_stage,
    register_stage,
    stage,
    training_label_stage,
)
from .common import dataset, label_images, score, setup


def rows(config: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(title, stage, output, split key) of every scored row, in the order of the pipeline: the
    CAM labels, each kind of label the configured label method writes (and the refinement round,
    with ``labels.refine``), the network."""
    return ([("CAM", "infer_cam", "labels", "label_split")]
            + [(title, name, output, "label_split") for name in label_stage_names(config)
               for title, output in stage(name).label_rows(config)]
            + [("Network", "infer_seg", "predictions", "eval_split")])


def label_stage_names(config: dict[str, Any]) -> tuple[str, ...]:
    """The label method's stage and, with ``labels.refine``, the refinement round's."""
    return tuple(dict.fromkeys([label_stage(config).name, training_label_stage(config).name]))


def coverage_sources(config: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(title, folder, split key) of the labels whose coverage of the tags is measured."""
    return [("CAM labels", stage("infer_cam").output("labels", config), "label_split"),
            ("pseudo labels", training_label_stage(config).output("pseudo_labels", config), "label_split"),
            ("predictions", stage("infer_seg").output("predictions", config), "eval_split")]


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    setup(config)
    job = StageRun(config, "evaluate_run", force)
    data = dataset(config, "eval_split")
    results: dict[str, Any] = {}
    for title, stage_name, output, split_key in rows(config):
        directory = stage(stage_name).output(output, config)
        if not directory.is_dir():
            continue
        result = score(config, directory, split_key, title)
        if result is not None:
            results[title] = result
    if distributed.is_main():
        summary = {"run_dir": str(config["run_dir"]), "dataset": config["dataset"]["name"],
                   "backbone": config["backbone"]["name"], "class_names": data.class_names,
                   "training_labels": training_label_stage(config).label_rows(config)[-1][0],
                   "rows": {title: {"split": r["split"], "miou": r["miou"], "iou": r["iou"],
                                    "num_images": r["num_images"]} for title, r in results.items()}}
        stages = {}
        for spec_dir in sorted(Path(config["run_dir"]).glob(f"*/{MARKER}")):
            state = read_json(spec_dir)
            stages[state.get("stage", spec_dir.parent.name)] = {"seconds": state.get("seconds"),
                                                                "images": state.get("images"),
                                                                "skipped": len(state.get("skipped", []))}
        summary["stages"] = stages
        # The companions' own scores (IRN's instance mAP^r), as their stages recorded them.
        for spec in companion_stages(config):
            recorded = read_json(spec.marker(config))
            if recorded.get("map_r") is not None:
                summary.setdefault("instances", {})[spec.name] = {
                    "map_r": recorded["map_r"], "ap_r": recorded["ap_r"], "num_images": recorded["instance_images"]}
        summary["coverage"] = run_coverage(label_images(config), data,
                                           coverage_sources(config))
        write_json(STAGE.output("results", config), summary)
        if "Network" in results:
            net = results["Network"]
            print(format_table({"Network": net["iou"]}, data.class_names,
                               f"Table 2: segmentation network on {data.name} {net['split']} (IoU %)"))
        if results:
            labelled = {f"{title} ({r['split']})": r["iou"] for title, r in results.items()}
            print(format_table(labelled, data.class_names, "Table 5: every stage (mIoU %)"))
    return job.finish(rows={t: r["miou"] for t, r in results.items()})


def upstream(config: dict[str, Any]) -> tuple[str, ...]:
    return ("infer_cam", *label_stage_names(config), *(spec.name for spec in companion_stages(config)), "infer_seg")


# results.json lies in the run directory, beside config.yaml, where a user looks first.
STAGE = register_stage(Stage("evaluate_run", "evaluate-run", "score every stage: Table 1, Table 2 and Table 5",
              keys=("dataset.label_split", "dataset.eval_split"), upstream=upstream,
              outputs={"results": "../results.json"}, run=run))
