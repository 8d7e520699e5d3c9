"""Where do objects become background? For every class, the share of its ground-truth pixels that
each label set of a finished run calls background: the pseudo labels of every row of Table 1 on
the label split, and the segmentation network's predictions on the evaluation split, beside those
of the fully supervised bound's run when one is given.

    python -m benchmarks.background_errors runs/msrc21 [runs/msrc21_gt]

Only saved label PNGs are read; the ground truth scores them and changes nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from affinitynet.config import load_config
from affinitynet.metrics import ConfusionMatrix, score_samples, scored_samples
from affinitynet.stages.common import dataset
from affinitynet.stages.evaluate_run import rows

from .common import Benchmark


def background_shares(confusion: ConfusionMatrix) -> np.ndarray:
    """Per class, the share (%) of its labelled pixels predicted as class 0 (background)."""
    counts = confusion.counts
    return 100.0 * counts[:, 0] / np.maximum(counts.sum(axis=1), 1)


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("run_dir")
    parser.add_argument("bound_dir", nargs="?")
    args = bench.parse(argv)
    config = load_config(Path(args.run_dir) / "config.yaml")
    table: dict[str, np.ndarray] = {}
    sources = [(title, Path(args.run_dir) / stage / folder, split)
               for title, stage, folder, split in rows(config)]
    if args.bound_dir:
        sources.append(("Upper bound", Path(args.bound_dir) / "infer_seg" / "predictions", "eval_split"))
    names = None
    for title, directory, split_key in sources:
        if not directory.is_dir():
            continue
        data = dataset(config, split_key)
        names = data.class_names
        confusion, images, _ = score_samples(data, directory, scored_samples(data))
        if images:
            table[f"{title} ({data.split})"] = background_shares(confusion)
    if not table or names is None:
        print(f"{args.run_dir}: no scored labels", file=sys.stderr)
        return 1
    width = max(len(t) for t in table)
    print("share of each class's ground-truth pixels called background (%)")
    print(" " * width + " | " + " | ".join(f"{n[:6]:>6}" for n in names[1:]) + " | objects")
    for title, shares in table.items():
        print(f"{title:<{width}} | " + " | ".join(f"{v:6.1f}" for v in shares[1:]) + f" | {shares[1:].mean():6.1f}")
    bench.write({"run_dir": args.run_dir, "bound_dir": args.bound_dir, "class_names": list(names),
                 "background_share_pct": {title: dict(zip(names, shares.tolist())) for title, shares in table.items()},
                 "summary": {f"{title}: objects called background (%)": float(shares[1:].mean())
                             for title, shares in table.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
