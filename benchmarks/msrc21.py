"""The real-data benchmark: the whole pipeline on MSRC-21 (object protocol) with the CPU default
backbone, plus the fully supervised upper bound (the same segmentation network and schedule
trained on the ground truth), printed as the paper's Tables 1, 2 and 5.

    python benchmarks/msrc21.py [--run-dir runs/msrc21] [key=value ...]

Unpacks ../shared/datasets/msrc21-trainval.tar.xz into data/msrc21 if needed. The two trainings
that do not depend on each other, the CAM network and the upper bound's segmentation network, run
side by side as two single-threaded processes; every later stage then runs as two single-threaded
processes under torch.distributed (on this 2-core machine both are faster than one process with
two threads). ``--procs`` sets that number. Everything is resumable: run the command again after
an interruption.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from affinitynet.datasets import ensure_msrc21
from affinitynet.io import read_json, write_json
from affinitynet.metrics import format_table


def affinitynet(*args: str, procs: int = 1) -> list[str]:
    if procs == 1:
        return [sys.executable, "-m", "affinitynet", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
            "-m", "affinitynet", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/msrc21")
    parser.add_argument("--procs", type=int, default=2, help="processes for the stages after the two trainings")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    root = ensure_msrc21("data/msrc21")
    common = ["--config", "msrc21", f"dataset.root={root}", *args.overrides]
    weak_dir, bound_dir = Path(args.run_dir), Path(args.run_dir + "_gt")
    started = time.time()
    bound_args = (*common, "--run-dir", str(bound_dir), "segmentation.supervision=gt")
    bound = subprocess.Popen(affinitynet("train-seg", *bound_args))
    cam = subprocess.run(affinitynet("train-cam", *common, "--run-dir", str(weak_dir)))
    if bound.wait() != 0 or cam.returncode != 0:
        print("msrc21 benchmark: a training failed (see above); run the command again to resume", file=sys.stderr)
        return 1
    for command in (affinitynet("run", *common, "--run-dir", str(weak_dir), procs=args.procs),
                    affinitynet("infer-seg", *bound_args, procs=args.procs)):
        if subprocess.run(command).returncode != 0:
            print("msrc21 benchmark: a stage failed (see above); run the command again to resume", file=sys.stderr)
            return 1
    wall = time.time() - started

    results = read_json(weak_dir / "results.json")
    bound_state = read_json(bound_dir / "infer_seg" / "_stage.json")
    names = results["class_names"]
    rows = results["rows"]
    upper = bound_state.get("segmentation")
    print(format_table({t: r for t, r in rows.items() if t != "Network"}, names,
                       "Table 1: pseudo labels on MSRC-21 train (object protocol, mIoU %)"))
    table2 = {"Ours (pseudo labels)": rows["Network"]}
    if upper:
        table2["Upper bound (ground truth)"] = upper
    print(format_table(table2, names, "Table 2 layout: segmentation network on MSRC-21 val (IoU %)"))
    stages = {}
    for directory in (weak_dir, bound_dir):
        for marker in sorted(directory.glob("*/_stage.json")):
            state = read_json(marker)
            stages[f"{directory.name}/{marker.parent.name}"] = state.get("seconds")
    print("Runtime per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items() if v is not None))
    summary = {"table1": {t: r["miou"] for t, r in rows.items() if t != "Network"},
               "network_val_miou": rows["Network"]["miou"],
               "upper_bound_val_miou": upper["miou"] if upper else None,
               "ratio": rows["Network"]["miou"] / upper["miou"] if upper else None,
               "stage_seconds": stages, "wall_seconds": round(wall, 1)}
    if upper:
        print(f"network / upper bound: {summary['ratio']:.3f} ({rows['Network']['miou']:.1f} / {upper['miou']:.1f})")
    print(f"wall time of this command: {wall / 60:.1f} min")
    write_json(weak_dir / "benchmark.json", summary)
    print(json.dumps(summary["table1"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
