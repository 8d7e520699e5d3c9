"""How reliable are the affinity labels? (the premise of paper 3.2.1)

For every training image of a finished run: the confident-region map and the ground truth are
moved to the feature grid the same way (``downsample_labels``), the pairs within the radius are
labelled from each (Eq. 4-6), and among the pairs the confident regions label whose both ends
have ground truth, the share whose label agrees with the ground truth's is counted, per subset
(P+fg, P+bg, P-). Also the share of pixels that are confident.

    python -m benchmarks.affinity_label_precision runs/msrc21
"""
from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from affinitynet.models.affinity import downsample_labels, pair_labels
from affinitynet.config import load_config
from affinitynet.files import load_label_png
from affinitynet.stages.common import dataset

from .common import Benchmark


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("run_dir")
    parser.add_argument("--stride", type=int, default=8)
    args = bench.parse(argv)
    run_dir = Path(args.run_dir)
    config = load_config(run_dir / "config.yaml")
    data = dataset(config, "train_split")
    radius = config["affinity"]["radius"]
    label_dir = run_dir / "confident_regions" / "labels"
    agree = {"pos_fg": 0, "pos_bg": 0, "neg": 0}
    total = {"pos_fg": 0, "pos_bg": 0, "neg": 0}
    confident = pixels = confident_gt = correct_pixels = 0
    for sample in tqdm(data.samples, desc="pairs"):
        path = label_dir / f"{sample.id}.png"
        if not path.exists() or sample.mask_path is None:
            continue
        labels, gt = load_label_png(path), data.load_mask(sample)
        confident += int((labels != 255).sum())
        pixels += labels.size
        both = (labels != 255) & (gt != 255)
        confident_gt += int(both.sum())
        correct_pixels += int((labels[both] == gt[both]).sum())
        grid, grid_gt = downsample_labels(labels, stride=args.stride), downsample_labels(gt, stride=args.stride)
        ours, truth = pair_labels(grid, radius), pair_labels(grid_gt, radius)
        truth_same = (truth["pos_fg"] | truth["pos_bg"]).numpy()
        truth_known = truth_same | truth["neg"].numpy()
        for subset in total:
            mask = ours[subset].numpy() & truth_known
            total[subset] += int(mask.sum())
            expected = truth_same if subset != "neg" else truth["neg"].numpy()
            agree[subset] += int((mask & expected).sum())
    print(f"{data.name} {data.split}: confident pixels {100 * confident / pixels:.1f}% "
          f"(their label agrees with the ground truth on {100 * correct_pixels / max(confident_gt, 1):.1f}%)")
    all_agree, all_total = sum(agree.values()), sum(total.values())
    for subset in total:
        print(f"  {subset:6s}: {total[subset]:9d} labelled pairs with ground truth, "
              f"precision {100 * agree[subset] / max(total[subset], 1):.1f}%")
    print(f"  all   : {all_total:9d} pairs, precision {100 * all_agree / max(all_total, 1):.1f}%")
    precision = {subset: 100 * agree[subset] / max(total[subset], 1) for subset in total}
    bench.write({"run_dir": str(run_dir), "dataset": data.name, "split": data.split,
                 "confident_pixels_pct": 100 * confident / pixels,
                 "confident_right_pct": 100 * correct_pixels / max(confident_gt, 1),
                 "pairs": {subset: {"pairs": total[subset], "precision_pct": precision[subset]} for subset in total},
                 "all_pairs": all_total, "all_precision_pct": 100 * all_agree / max(all_total, 1),
                 "summary": {"confident pixels (%)": 100 * confident / pixels,
                             "confident pixels right (%)": 100 * correct_pixels / max(confident_gt, 1),
                             "P+fg / P+bg / P- precision (%)": [precision["pos_fg"], precision["pos_bg"],
                                                                precision["neg"]]}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
