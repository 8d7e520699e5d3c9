"""A whole pipeline run and its seed spread, for any built-in config with ground truth: seed 0
runs the pipeline and, beside it, the fully supervised upper bound (the same segmentation network
and schedule trained on the ground truth); every further seed (``--seeds``) trains the
segmentation network again on seed 0's pseudo labels (``segmentation.seed``) and the bound again,
so the network's and the bound's mIoU are given as mean +- std over the seeds. With
``--whole-pipeline`` every further seed runs the whole pipeline again instead (``seed=k``: the CAM
network, AffinityNet and the walk too, in ``<run-dir>_pipeline<k>``, its bound in
``<run-dir>_pipeline<k>_gt``), so the spread holds the labels' own seed as well and Table 1 is
given over the seeds too. Printed as the paper's Tables 1, 2 and 5.

    python -m benchmarks.seed_spread --config demo [--run-dir runs/demo_seeds] [--seeds 3] [key=value ...]

Writes ``benchmarks/results/seed_spread_<config>.json`` (``--json PATH``), which renders the
demo's row of the README's headline table and the demo's tables of docs/results.md
(``python -m benchmarks.render``). ``--device`` (default: the config's) and ``--threads N``
(default: the config's) are passed to every stage as ``device=...`` and, for the stages after the
two trainings, ``threads=N``. ``benchmarks/msrc21.py`` is this on MSRC-21.

The CAM network and the upper bound's first training (and its evaluation) do not depend on each
other and run side by side as two single-threaded processes; the later stages run as
``affinitynet run --procs`` (each training in one process with every core, every other stage as
``--procs`` single-threaded processes under torch.distributed: on a 2-core machine the per-image
stages are faster so than one process with two threads, and the trainings slower:
docs/performance.md, "Threads and processes"), starting when the CAM network is done, beside
what is left of the bound.
Everything is resumable: run the command again after an interruption.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from affinitynet.config import load_config
from affinitynet.files import read_json, write_json
from affinitynet.metrics import format_table
from affinitynet.pipeline import DATASET_FILE, MARKER, is_complete, stage, stage_hash, stages
from affinitynet.pipeline.size_rules import resolve_auto

from .common import Benchmark


def affinitynet(*args: str, procs: int = 1) -> list[str]:
    return [sys.executable, "-m", "affinitynet", *args, f"--procs={procs}"]


def finished_stages(sources: list[Path]) -> dict[str, Path]:
    """Recorded hash -> directory of every finished stage in ``sources`` (the first one wins)."""
    found: dict[str, Path] = {}
    for source in sources:
        for marker in sorted(source.glob(f"*/{MARKER}")):
            state = read_json(marker)
            if state.get("complete") is True and state.get("hash"):
                found.setdefault(state["hash"], marker.parent)
    return found


def link_finished(config: dict, sources: list[Path]) -> list[str]:
    """Link into ``config``'s run directory every stage of its graph whose hash a finished stage
    of ``sources`` recorded: the work another seed or a lever leaves unchanged is not done twice.
    Hard links, no copies of the affinities and CAMs: every stage writes by atomic rename, so
    neither run can change the other's files. The stage's record is its own copy, under its own
    name (the refinement round's first network is found as another run's ``train_seg``). The
    names of the stages linked, in pipeline order."""
    resolve_auto(config)   # the 'auto' keys as the stages hashed them
    target = Path(config["run_dir"])
    finished = finished_stages(sources)
    linked = []
    for spec in stages(config):
        source = finished.get(stage_hash(config, spec.name))
        if source is None:
            continue
        linked.append(spec.name)
        if is_complete(config, spec.name):
            continue
        for path in sorted(source.rglob("*")):
            if path.is_file() and path.name not in ("checkpoint.pt", MARKER):
                copy = target / spec.name / path.relative_to(source)
                if not copy.exists():
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    os.link(path, copy)
        write_json(spec.marker(config), {**read_json(source / MARKER), "stage": spec.name,
                                         "linked_from": str(source)})
    if linked and not (target / DATASET_FILE).exists():
        os.link(sources[-1] / DATASET_FILE, target / DATASET_FILE)
    return linked


def seed_weak_dir(weak_dir: Path, seed: int, whole_pipeline: bool) -> Path:
    """Where seed ``seed`` of the runs whose seed 0 is in ``weak_dir`` runs: a whole pipeline in
    ``<weak_dir>_pipeline<k>``, a network on seed 0's labels in ``<weak_dir>_seed<k>``."""
    if seed == 0:
        return weak_dir
    return Path(f"{weak_dir}_{'pipeline' if whole_pipeline else 'seed'}{seed}")


def seed_run_dirs(weak_dir: Path, bound_dir: Path, seed: int, whole_pipeline: bool) -> tuple[Path, Path]:
    """Where seed ``seed`` of a run whose seed 0 is in ``weak_dir`` runs (``seed_weak_dir``), and
    its bound: a whole pipeline's in ``<weak_dir>_pipeline<k>_gt``, a network's in
    ``<bound_dir>_seed<k>``."""
    if seed == 0:
        return weak_dir, bound_dir
    weak = seed_weak_dir(weak_dir, seed, whole_pipeline)
    return weak, Path(f"{weak}_gt") if whole_pipeline else Path(f"{bound_dir}_seed{seed}")


def seed_overrides(seed: int, whole_pipeline: bool) -> list[str]:
    """Seed ``seed``'s overrides: seed 0 is the run's; a further one seeds the whole pipeline
    (``seed=k``) or only the segmentation network (``segmentation.seed=k``)."""
    if seed == 0:
        return []
    return [f"seed={seed}"] if whole_pipeline else [f"segmentation.seed={seed}"]


def pipeline_with_bound(common: list[str], threads: list[str], procs: int, weak_dir: Path, bound_dir: Path) -> bool:
    """The whole pipeline in ``weak_dir`` and, beside it, the bound in ``bound_dir``."""
    bound_args = (*common, "--run-dir", str(bound_dir), "segmentation.supervision=gt")
    beside_each_other = "threads=1"   # the CAM network and the bound, one core each
    # The bound's evaluation follows its training on one core while the CAM network trains on the
    # other. The later stages start as soon as the CAM network is done, not when the bound is:
    # the bound's training and evaluation ran 5 minutes longer than the CAM network's training
    # with MobileNetV2 and 17 with EfficientNet-Lite2 (MSRC-21), and waiting for them left a core
    # idle for that long.
    bound: list[bool] = []
    beside = threading.Thread(target=lambda: bound.append(run_all([
        affinitynet("train-seg", *bound_args, beside_each_other),
        affinitynet("infer-seg", *bound_args, beside_each_other)])))
    beside.start()
    cam = subprocess.run(affinitynet("train-cam", *common, "--run-dir", str(weak_dir), beside_each_other))
    pipeline = cam.returncode == 0 and run_all([affinitynet("run", *common, *threads, "--run-dir", str(weak_dir),
                                                            procs=procs)])
    beside.join()
    if cam.returncode != 0 or not bound[0]:
        print("benchmark: a training failed (see above); run the command again to resume", file=sys.stderr)
        return False
    return pipeline


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f} (one seed)"
    return (f"{statistics.mean(values):.1f} +- {statistics.stdev(values):.1f} over {len(values)} seeds "
            f"({', '.join(f'{v:.1f}' for v in values)})")


def run_all(commands: list[list[str]]) -> bool:
    for command in commands:
        if subprocess.run(command).returncode != 0:
            print("benchmark: a stage failed (see above); run the command again to resume", file=sys.stderr)
            return False
    return True


def add_options(bench: Benchmark, config_given: bool = False, run_dir: str = "runs/<config>_seeds",
                whole_pipeline: bool = False) -> None:
    """This benchmark's options on ``bench``'s parser; ``--config`` unless a wrapper fixes it."""
    parser = bench.parser
    if not config_given:
        parser.add_argument("--config", required=True, help="a built-in config with ground truth (demo, msrc21)")
    parser.add_argument("--run-dir", default=None, help=f"seed 0's run directory (default {run_dir})")
    parser.add_argument("--procs", type=int, default=2, help="processes for the stages after the two trainings")
    parser.add_argument("--seeds", type=int, default=3, help="seeds: of the whole pipeline with --whole-pipeline, else of the network; "
                                                        "and of the bound")
    parser.add_argument("--whole-pipeline", action=argparse.BooleanOptionalAction, default=whole_pipeline,
                        help="every further seed runs the whole pipeline (seed=k), not only the segmentation "
                             "network on seed 0's labels")
    parser.add_argument("overrides", nargs="*")


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__, devices=("auto", "cpu", "cuda"), results_name="seed_spread_<config>")
    add_options(bench)
    args = bench.parse(argv)
    return run(bench, args, args.config, name=f"{bench.name}_{args.config}")


def run(bench: Benchmark, args, config: str, root: str | None = None, default_run_dir: str | None = None,
        name: str | None = None) -> int:
    """The benchmark on ``config`` (a wrapper, msrc21.py, fixes it, the dataset's ``root`` and
    the run directory's default); its results go to ``benchmarks/results/<name>.json``."""
    run_dir = args.run_dir or default_run_dir or f"runs/{config}_seeds"
    placed = [f"device={args.device}"] if args.device != "auto" else []
    threads = [f"threads={args.threads}"] if args.threads else []
    common = ["--config", config, *([f"dataset.root={root}"] if root else []), *placed, *args.overrides]
    weak_dir, bound_dir = Path(run_dir), Path(run_dir + "_gt")
    started = time.time()
    if not pipeline_with_bound(common, threads, args.procs, weak_dir, bound_dir):
        return 1
    wall = time.time() - started
    seed_dirs = [(weak_dir, bound_dir)]
    for seed in range(1, args.seeds):
        weak_k, bound_k = seed_run_dirs(weak_dir, bound_dir, seed, args.whole_pipeline)
        if args.whole_pipeline:
            if not pipeline_with_bound([*common, *seed_overrides(seed, True)], threads, args.procs, weak_k, bound_k):
                return 1
            seed_dirs.append((weak_k, bound_k))
            continue
        # The network on seed 0's labels, the bound on the ground truth.
        seeded = (*common, *seed_overrides(seed, False))
        link_finished(load_config(config, [*seeded[2:], f"run_dir={weak_k}"], check=False), [weak_dir])
        if not run_all([affinitynet("run", *seeded, *threads, "--run-dir", str(weak_k), procs=args.procs),
                        affinitynet("train-seg", *seeded, "--run-dir", str(bound_k), "segmentation.supervision=gt"),
                        affinitynet("infer-seg", *seeded, *threads, "--run-dir", str(bound_k),
                                    "segmentation.supervision=gt", procs=args.procs)]):
            return 1
        seed_dirs.append((weak_k, bound_k))

    results = read_json(stage("evaluate_run").output("results", weak_dir))
    names = results["class_names"]
    rows = results["rows"]
    upper = read_json(stage("infer_seg").marker(bound_dir)).get("segmentation")
    label_split = rows[results["training_labels"]]["split"]
    eval_split = rows["Network"]["split"]
    print(format_table({t: r for t, r in rows.items() if t != "Network"}, names,
                       f"Table 1: pseudo labels on {results['dataset']} {label_split} (mIoU %)"))
    table2 = {"Ours (pseudo labels), seed 0": rows["Network"]}
    if upper:
        table2["Upper bound (ground truth), seed 0"] = upper
    print(format_table(table2, names, f"Table 2 layout: segmentation network on {results['dataset']} "
                                      f"{eval_split} (IoU %)"))
    stages = {}
    for directory in (weak_dir, bound_dir):
        for marker in sorted(directory.glob(f"*/{MARKER}")):
            state = read_json(marker)
            stages[f"{directory.name}/{marker.parent.name}"] = state.get("seconds")
    print("Runtime per stage of seed 0 (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in stages.items() if v is not None))
    # What a resumed command's clock cannot give: seed 0 from its stages' records, the pipeline's
    # stages one after another, beside the bound's training and evaluation.
    bound_seconds = sum(v or 0 for k, v in stages.items() if k.startswith(f"{bound_dir.name}/"))
    pipeline_seconds = sum(v or 0 for k, v in stages.items() if k.startswith(f"{weak_dir.name}/"))
    recorded = max(pipeline_seconds, bound_seconds)
    seed_rows = [read_json(stage("evaluate_run").output("results", w))["rows"] for w, _ in seed_dirs]
    networks = [r["Network"]["miou"] for r in seed_rows]
    bounds = [read_json(stage("infer_seg").marker(b))["segmentation"]["miou"] for _, b in seed_dirs]
    ratios = [n / b for n, b in zip(networks, bounds)]
    summary = {"table1": {t: r["miou"] for t, r in rows.items() if t != "Network"},
               "training_labels": results.get("training_labels"),
               "network_val_miou": networks, "upper_bound_val_miou": bounds, "ratio": ratios,
               "ratio_of_means": statistics.mean(networks) / statistics.mean(bounds),
               "stage_seconds": stages, "wall_seconds_seed0": round(wall, 1),
               "wall_seconds": round(time.time() - started, 1), "recorded_seconds_seed0": round(recorded, 1)}
    if args.whole_pipeline:
        # The labels differ from seed to seed only when the whole pipeline ran again.
        summary["table1_seeds"] = [{t: r["miou"] for t, r in rows_k.items() if t != "Network"} for rows_k in seed_rows]
        for title in summary["table1"]:
            print(f"{title} on {label_split}: {spread([t[title] for t in summary['table1_seeds']])}")
    print(f"network on {eval_split}: {spread(networks)}")
    print(f"upper bound on {eval_split}: {spread(bounds)}")
    print(f"network / upper bound: {summary['ratio_of_means']:.3f} (mean over seeds; per seed "
          f"{', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"wall time of this command: {summary['wall_seconds'] / 60:.1f} min "
          f"(the pipeline and the bound on seed 0: {wall / 60:.1f} min; from the stages' records, which a "
          f"resumed run keeps: {recorded / 60:.1f} min)")
    write_json(weak_dir / "benchmark.json", summary)
    print(json.dumps(summary["table1"]))
    bench.write({**summary, "config": config, "overrides": args.overrides, "procs": args.procs, "seeds": args.seeds,
                 "whole_pipeline": args.whole_pipeline,
                 "run_dir": str(weak_dir), "dataset": results["dataset"], "backbone": results.get("backbone"),
                 "class_names": names, "label_split": label_split, "eval_split": eval_split,
                 "rows": {t: {"split": r["split"], "miou": r["miou"], "iou": r["iou"]} for t, r in rows.items()},
                 "upper_bound_seed0": None if not upper else {"miou": upper["miou"], "iou": upper.get("iou")},
                 "summary": {**{f"{t} ({rows[t]['split']}), seed 0": m for t, m in summary["table1"].items()},
                             f"network ({eval_split}), mean over {len(networks)} seeds": statistics.mean(networks),
                             f"upper bound ({eval_split}), mean": statistics.mean(bounds)}}, name=name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
