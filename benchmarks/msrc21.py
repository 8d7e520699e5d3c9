"""The real-data benchmark: the whole pipeline on MSRC-21 (object protocol) with the CPU default
backbone, plus the fully supervised upper bound (the same segmentation network and schedule
trained on the ground truth), printed as the paper's Tables 1, 2 and 5.

    python benchmarks/msrc21.py [--run-dir runs/msrc21] [--seeds 3] [key=value ...]

Seed 0 runs the whole pipeline. Every further seed trains the segmentation network again on seed
0's pseudo labels, and the bound again on the ground truth, so that the network's and the bound's
val mIoU are given as mean +- std over the seeds: val has 59 images, and one training differs
from the next by a few points. ``--seeds 1`` is seed 0 alone: the pipeline, with the bound trained
beside it (the pipeline's own stages are the wait of a user, who has no bound to train). The
procedure is ``benchmarks/seed_spread.py``'s.

Unpacks ../shared/datasets/msrc21-trainval.tar.xz into data/msrc21 if needed. Resumable: run the
command again after an interruption.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seed_spread import main  # noqa: E402

from affinitynet.datasets import ensure_msrc21  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(config="msrc21", root=str(ensure_msrc21("data/msrc21")), description=__doc__.splitlines()[0],
                  default_run_dir="runs/msrc21"))
