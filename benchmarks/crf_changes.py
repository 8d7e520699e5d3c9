"""Where does the dCRF of Section 3.4 gain or lose? (CAM+RW -> CAM+RW+dCRF in Table 1)

For every image of a finished run's label split that has ground truth, the CAM+RW labels and the
CAM+RW+dCRF labels are compared pixel by pixel. A pixel the dCRF relabels is either near a label
boundary of the walk (within ``band`` pixels of it: the boundary refinement the dCRF is there for,
since the walk's labels come from a grid of stride 8) or inside a region (a whole region or object
part relabelled by colour). For each kind, among the relabelled pixels that the ground truth
scores, the script counts how many the dCRF gets right and how many the walk had right, and it
reports how much of the boundary band the ground truth leaves void. It also scores a
"band-limited" dCRF: the dCRF's labels inside the band, the walk's elsewhere.

    python -m benchmarks.crf_changes runs/msrc21

Only saved label PNGs are read; nothing is recomputed, so the figures are those of the run.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from affinitynet.config import load_config
from affinitynet.files import load_label_png
from affinitynet.metrics import IGNORE_INDEX, ConfusionMatrix
from affinitynet.ops.pseudo_labels import boundary_band
from affinitynet.stages.common import dataset

from .common import Benchmark


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("run_dir")
    parser.add_argument("--bands", type=int, nargs="+", default=[4, 8],
                        help="band widths in pixels around the walk's label boundaries")
    args = bench.parse(argv)
    run_dir = Path(args.run_dir)
    config = load_config(run_dir / "config.yaml")
    data = dataset(config, "label_split")
    walk_dir = run_dir / "random_walk" / "rw_labels"
    mode = config["random_walk"]["crf"]
    if mode == "off":
        print(f"{run_dir}: this run has no dCRF (random_walk.crf is off)", file=sys.stderr)
        return 1
    # The paper's whole-image dCRF: the pseudo labels themselves, or kept beside the band's.
    crf_dir = run_dir / "random_walk" / ("crf_labels" if mode == "band" else "pseudo_labels")
    kinds = [f"band{w}" for w in args.bands] + [f"outside{w}" for w in args.bands]
    counts = {kind: np.zeros(4, dtype=np.int64) for kind in kinds}  # changed, scored, crf right, walk right
    band_void = {w: np.zeros(2, dtype=np.int64) for w in args.bands}  # band pixels, void among them
    scores = {name: ConfusionMatrix(data.num_classes)
              for name in ["CAM+RW", "CAM+RW+dCRF"] + [f"dCRF within {w} px" for w in args.bands]}
    changed_total = pixels = images = 0
    for sample in tqdm(data.samples, desc="dCRF changes", dynamic_ncols=True):
        walk_path, crf_path = walk_dir / f"{sample.id}.png", crf_dir / f"{sample.id}.png"
        if sample.mask_path is None or not walk_path.exists() or not crf_path.exists():
            continue
        walk, refined, gt = load_label_png(walk_path), load_label_png(crf_path), data.load_mask(sample)
        images += 1
        pixels += gt.size
        changed = walk != refined
        changed_total += int(changed.sum())
        scored = gt != IGNORE_INDEX
        scores["CAM+RW"].add(gt, walk)
        scores["CAM+RW+dCRF"].add(gt, refined)
        for width in args.bands:
            band = boundary_band(walk, width)
            band_void[width] += (int(band.sum()), int((band & ~scored).sum()))
            scores[f"dCRF within {width} px"].add(gt, np.where(band, refined, walk))
            for kind, where in ((f"band{width}", band), (f"outside{width}", ~band)):
                mask = changed & where
                hit = mask & scored
                counts[kind] += (int(mask.sum()), int(hit.sum()), int((hit & (refined == gt)).sum()),
                                 int((hit & (walk == gt)).sum()))
    if not images:
        print(f"{run_dir}: no image with ground truth and both label maps", file=sys.stderr)
        return 1
    print(f"{data.name} {data.split}, {images} images: the dCRF relabels {100 * changed_total / pixels:.1f}% "
          f"of the pixels")
    for width in args.bands:
        print(f"\nband = within {width} px of a CAM+RW label boundary "
              f"({100 * band_void[width][1] / max(band_void[width][0], 1):.1f}% of the band is void in the ground truth)")
        for kind, title in ((f"band{width}", "in the band"), (f"outside{width}", "outside it")):
            changed, scored, crf_right, walk_right = counts[kind]
            print(f"  relabelled {title}: {100 * changed / max(changed_total, 1):5.1f}% of the changes; "
                  f"of the {scored} scored: dCRF right {crf_right} ({100 * crf_right / max(scored, 1):.1f}%), "
                  f"CAM+RW right {walk_right} ({100 * walk_right / max(scored, 1):.1f}%)")
    print("\nmIoU %: " + ", ".join(f"{name} {100 * cm.miou():.1f}" for name, cm in scores.items()))
    kinds_out = {kind: dict(zip(("changed", "scored", "crf_right", "walk_right"), counts[kind].tolist()))
                 for kind in kinds}
    bench.write({"run_dir": str(run_dir), "dataset": data.name, "split": data.split, "images": images,
                 "relabelled_pct": 100 * changed_total / pixels, "counts": kinds_out,
                 "band_void_pct": {str(w): 100 * band_void[w][1] / max(band_void[w][0], 1) for w in args.bands},
                 "miou": {name: 100 * cm.miou() for name, cm in scores.items()},
                 "summary": {"relabelled by the dCRF (%)": 100 * changed_total / pixels,
                             **{f"mIoU {name}": 100 * cm.miou() for name, cm in scores.items()}}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
