"""Stage ``evaluate-run``: every stage's labels scored on the ground truth, gathered in
``<run_dir>/results.json`` and printed as Table 1 (pseudo labels), Table 2 (network, per class)
and Table 5 (CAM / CAM+RW / CAM+RW+dCRF / final network). With ground truth or without, the
labels' coverage of the tagged classes (``coverage``) is measured too."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import distributed
from ..coverage import SOURCES, run_coverage
from ..io import write_json
from ..metrics import format_table
from ..pipeline import StageRun, stage_dir
from . import dataset, label_images, score, setup
from .random_walk import label_rows


def rows(config: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(title, stage, folder, split key) of every scored row, in the order of the pipeline."""
    return ([("CAM", "infer_cam", "labels", "label_split")]
            + [(title, "random_walk", folder, "label_split") for title, folder in label_rows(config)]
            + [("Network", "infer_seg", "predictions", "eval_split")])


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    setup(config)
    stage = StageRun(config, "evaluate_run", force)
    data = dataset(config, "eval_split")
    results: dict[str, Any] = {}
    for title, stage_name, folder, split_key in rows(config):
        directory = stage_dir(config, stage_name) / folder
        if not directory.is_dir():
            continue
        result = score(config, directory, split_key, title)
        if result is not None:
            results[title] = result
    if distributed.is_main():
        summary = {"run_dir": str(config["run_dir"]), "dataset": config["dataset"]["name"],
                   "backbone": config["backbone"]["name"], "class_names": data.class_names,
                   "training_labels": label_rows(config)[-1][0],
                   "rows": {title: {"split": r["split"], "miou": r["miou"], "iou": r["iou"],
                                    "num_images": r["num_images"]} for title, r in results.items()}}
        stages = {}
        for spec_dir in sorted(Path(config["run_dir"]).glob("*/_stage.json")):
            from ..io import read_json
            state = read_json(spec_dir)
            stages[state.get("stage", spec_dir.parent.name)] = {"seconds": state.get("seconds"),
                                                                "images": state.get("images"),
                                                                "skipped": len(state.get("skipped", []))}
        summary["stages"] = stages
        summary["coverage"] = run_coverage(label_images(config), data,
                                           {title: stage_dir(config, stage_name) / folder
                                            for title, stage_name, folder, _ in SOURCES})
        write_json(Path(config["run_dir"]) / "results.json", summary)
        if "Network" in results:
            net = results["Network"]
            print(format_table({"Network": net["iou"]}, data.class_names,
                               f"Table 2: segmentation network on {data.name} {net['split']} (IoU %)"))
        if results:
            labelled = {f"{title} ({r['split']})": r["iou"] for title, r in results.items()}
            print(format_table(labelled, data.class_names, "Table 5: every stage (mIoU %)"))
    return stage.finish(rows={t: r["miou"] for t, r in results.items()})
