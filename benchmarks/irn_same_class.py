"""IRN's instance pseudo labels where instance separation matters: the demo with several objects
of one class in an image (``dataset.demo_same_class``), mAP^r at IoU 0.25, 0.5 and 0.75 on its
label split (Table 3 of ``irn-instances``), with the spread over seeds (each seed trains the CAM
network and IRNet again, on the same images).

    python -m benchmarks.irn_same_class [--run-dir runs/demo_same_class] [--seeds 3] [key=value ...]

Runs ``train-cam``, ``infer-cam``, ``confident-regions``, ``train-irn``, ``irn-walk`` and
``irn-instances`` per seed (the segmentation network is not needed); resumable. Also prints, per
seed, IRNet's last-epoch displacement losses, to read against a flat field (foreground loss 2.0
on radius 5's pairs, ``docs/irn.md``): a field that did not learn gives one instance per class.
Writes ``benchmarks/results/irn_same_class.json`` (``--json PATH``); ``--device`` and ``--threads``
go to every stage."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from .common import Benchmark
from .render import spread

STAGES = ("train-cam", "infer-cam", "confident-regions", "train-irn", "irn-walk", "irn-instances")
THRESHOLDS = ("0.25", "0.5", "0.75")


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__, devices=("auto", "cpu", "cuda"), default_device="auto")
    parser = bench.parser
    parser.add_argument("--run-dir", default="runs/demo_same_class", help="seed N runs in RUN_DIR/seedN")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--same-class", type=float, default=0.5, help="dataset.demo_same_class")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = bench.parse(argv)
    scores: dict[str, list[float]] = {t: [] for t in THRESHOLDS}
    seeds = []
    for seed in range(args.seeds):
        run_dir = Path(args.run_dir) / f"seed{seed}"
        common = ["--config", "demo", f"run_dir={run_dir}", f"seed={seed}", "labels.method=irn",
                  f"dataset.demo_same_class={args.same_class}", f"device={args.device}",
                  *([f"threads={args.threads}"] if args.threads else []), *args.overrides]
        for command in STAGES:
            if subprocess.run([sys.executable, "-m", "affinitynet", command, *common]).returncode != 0:
                print(f"benchmark: {command} failed for seed {seed}; run again to resume", file=sys.stderr)
                return 1
        state = json.loads((run_dir / "irn_instances" / "_stage.json").read_text())
        train = json.loads((run_dir / "train_irn" / "_stage.json").read_text())
        for t in THRESHOLDS:
            scores[t].append(state["map_r"][t])
        seeds.append({"seed": seed, "map_r": state["map_r"], "instance_images": state["instance_images"],
                      "displacement_loss": {part: train.get(f"final_disp_{part}") for part in ("fg", "bg")},
                      "stage_seconds": {name: json.loads((run_dir / name.replace("-", "_") / "_stage.json").read_text())
                                        .get("seconds") for name in STAGES}})
        print(f"seed {seed}: mAP^r " + ", ".join(f"{t}: {state['map_r'][t]:.1f}" for t in THRESHOLDS)
              + f" on {state['instance_images']} images; displacement loss fg {train.get('final_disp_fg', float('nan')):.3f}"
              f" bg {train.get('final_disp_bg', float('nan')):.3f}")
    for t in THRESHOLDS:
        print(f"mAP^r at {t}: {spread(scores[t])}")
    bench.write({"map_r": scores, "seeds": seeds, "same_class": args.same_class,
                 "summary": {f"map_r_{t}": statistics.mean(scores[t]) for t in THRESHOLDS}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
