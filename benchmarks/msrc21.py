"""The real-data benchmark: the whole pipeline on MSRC-21 (object protocol) with the CPU default
backbone, plus the fully supervised upper bound (the same segmentation network and schedule
trained on the ground truth), printed as the paper's Tables 1, 2 and 5.

    python -m benchmarks.msrc21 [--run-dir runs/msrc21] [--seeds 3] [--no-whole-pipeline] [key=value ...]

Every seed runs the whole pipeline (``seed=k``: the CAM network, AffinityNet, the walk and the
segmentation network), with the bound trained beside it on the ground truth, so that Table 1, the
network's and the bound's val mIoU are given as mean +- std over the seeds: val has 59 images, and
one training differs from the next by a few points. ``--no-whole-pipeline`` trains only the
segmentation network again on seed 0's pseudo labels for the further seeds.
``--seeds 1`` is seed 0 alone: the pipeline, with the bound trained beside it (the pipeline's own
stages are the wait of a user, who has no bound to train). The procedure, and the options, are
``benchmarks/seed_spread.py``'s. Writes
``benchmarks/results/msrc21.json`` (``--json PATH``), which renders the MSRC-21 row of the README's
headline table and the MSRC-21 tables of docs/results.md (``python -m benchmarks.render``).

Unpacks ../shared/datasets/msrc21-trainval.tar.xz into data/msrc21 if needed. Resumable: run the
command again after an interruption.
"""
from __future__ import annotations

import sys

from affinitynet.data.datasets import ensure_msrc21

from .common import Benchmark
from .seed_spread import add_options, run


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__, devices=("auto", "cpu", "cuda"))
    add_options(bench, config_given=True, run_dir="runs/msrc21", whole_pipeline=True)
    args = bench.parse(argv)   # --help and option errors before the dataset is unpacked
    return run(bench, args, "msrc21", root=str(ensure_msrc21("data/msrc21")), default_run_dir="runs/msrc21")


if __name__ == "__main__":
    sys.exit(main())
