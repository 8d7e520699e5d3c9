"""Speed-up of the ``infer-cam`` stage (multi-scale + flip CAMs and labels of every image) when
``torchrun`` shards the images over processes, on this machine's CPU.

    python -m benchmarks.distributed_cam_inference [--images 24] [--size 128] [--repeats 2]

Compares, on the same demo images and the same CAM network (a quickly trained MobileNetV2; its
weights do not change the speed):

- 1 process, 1 thread (``threads=1``)
- 1 process, 2 threads (``threads=2``): intra-op parallelism
- 2 processes under ``torchrun --nproc_per_node 2``, 1 thread each: data parallelism

These three settings are the comparison, whatever ``--threads``; ``--threads`` (default: every
core) is that of the CAM network's short training before them (two threads before it was an
option).

The time is the stage's own (``seconds`` in ``infer_cam/_stage.json``: from the stage's start,
model loading included, to its end, scoring included), the best of ``--repeats`` runs with
``--force``; the wall time of the whole command (Python and torch start-up, torchrun's
rendezvous) is printed beside it. The sharded run's label PNGs are checked to be the
single-process ones. On a machine shared with other jobs the numbers swing; compare the
settings of one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from affinitynet.config import builtin_config_path

from .common import Benchmark


def command(run_dir: Path, data: Path, args: argparse.Namespace, stage: str, threads: int, nproc: int,
            force: bool) -> list[str]:
    return [sys.executable, "-m", "affinitynet", stage, "--config", str(builtin_config_path("demo")),
            f"--procs={nproc}", *(["--force"] if force else []),
            f"dataset.root={data}", f"run_dir={run_dir}", f"threads={threads}", "backbone.name=mobilenetv2",
            f"dataset.demo_size={args.size}", f"dataset.demo_train={args.images}", "dataset.demo_val=4",
            f"cam.crop_size={args.size}", f"cam.resize_long=[{args.size - 16},{args.size + 16}]",
            "cam.batch_size=8", "cam.epochs=1"]


def run(cmd: list[str], cwd: Path, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE", TQDM_DISABLE="1")
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("--images", type=int, default=24, help="demo training images that get CAMs")
    parser.add_argument("--size", type=int, default=128, help="demo image side in pixels")
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the best counts")
    args = bench.parse(argv)
    training_threads = args.threads or os.cpu_count() or 1

    with tempfile.TemporaryDirectory(prefix="affinitynet-bench-") as tmp:
        work = Path(tmp)
        data, trained = work / "data", work / "trained"
        print(f"training a CAM network on {args.images} demo images of {args.size}x{args.size} ...", flush=True)
        run(command(trained, data, args, "train-cam", training_threads, 1, False), work, training_threads)

        settings = [("1 process x 1 thread", 1, 1), ("1 process x 2 threads", 1, 2),
                    ("2 processes x 1 thread", 2, 1)]
        results = {}
        for name, nproc, threads in settings:
            run_dir = work / name.replace(" ", "_")
            shutil.copytree(trained / "train_cam", run_dir / "train_cam")
            stage, wall = [], []
            for repeat in range(args.repeats):
                wall.append(run(command(run_dir, data, args, "infer-cam", threads, nproc, repeat > 0), work, threads))
                stage.append(json.loads((run_dir / "infer_cam" / "_stage.json").read_text())["seconds"])
            results[name] = (min(stage), min(wall), run_dir)
            print(f"  {name:24s} stage {min(stage):6.2f} s   command {min(wall):6.2f} s", flush=True)

        base_stage, base_wall, base_dir = results[settings[0][0]]
        sharded_dir = results[settings[2][0]][2]
        same = all((base_dir / "infer_cam" / sub / path.name).read_bytes() == path.read_bytes()
                   for sub in ("labels", "cams") for path in (sharded_dir / "infer_cam" / sub).iterdir()
                   if not path.name.startswith("."))
        print(f"\ninfer-cam on {args.images} images of {args.size}x{args.size} (scales 1, 0.5, 1.5, 2 x flip), "
              f"{os.cpu_count()} CPUs:")
        print(f"{'setting':26s}{'stage s':>9s}{'speed-up':>10s}{'command s':>11s}{'speed-up':>10s}")
        for name, (stage, wall, _) in results.items():
            print(f"{name:26s}{stage:9.2f}{base_stage / stage:9.2f}x{wall:11.2f}{base_wall / wall:9.2f}x")
        two_threads, two_procs = results[settings[1][0]][0], results[settings[2][0]][0]
        print(f"2 processes over 1 process x 2 threads: {two_threads / two_procs:.2f}x (stage time)")
        print(f"sharded outputs identical to the single-process ones: {same}")
        bench.write({"images": args.images, "size": args.size, "repeats": args.repeats,
                     "settings": {name: {"stage_seconds": stage, "command_seconds": wall,
                                         "speedup_stage": base_stage / stage, "speedup_command": base_wall / wall}
                                  for name, (stage, wall, _) in results.items()},
                     "two_processes_over_two_threads": two_threads / two_procs, "sharded_outputs_identical": same,
                     "summary": {"2 processes x 1 thread over 1 x 1 (stage)": base_stage / two_procs,
                                 "2 processes over 1 process x 2 threads": two_threads / two_procs,
                                 "outputs identical": same}})


if __name__ == "__main__":
    main()
