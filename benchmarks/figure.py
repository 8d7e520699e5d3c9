"""The picture of what a run makes: a few photos with their pseudo labels and their ground truth
(the label split: what the random walk made of the tags) beside a few others with the trained
network's predictions and their ground truth (the evaluation split), as one PNG.

    python -m benchmarks.figure RUN_DIR --out docs/img/demo.png [--images 3] [--root DATASET_DIR]

``RUN_DIR`` is a finished run (``affinitynet run``): its pseudo labels (``random_walk/`` or, with
``labels.method: irn``, ``irn_walk/``) and its predictions (``infer_seg/``) are read, the photos
and the ground truth come from the run's dataset (``--root`` if it has moved). Nothing is
recomputed. The README's picture is this command on the demo run of the README's first command;
on an MSRC-21 or VOC run it makes the same picture locally, which must stay out of the
repository (the photos' licences do not allow their redistribution).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .common import commit

WHITE = np.array([255, 255, 255], dtype=np.uint8)


def evenly(ids: list[str], count: int) -> list[str]:
    """``count`` ids spread evenly over the sorted list (the same choice on every call)."""
    ids = sorted(ids)
    if len(ids) <= count:
        return ids
    return [ids[(2 * k + 1) * len(ids) // (2 * count)] for k in range(count)]


def colour(labels: np.ndarray) -> np.ndarray:
    from affinitynet.files import voc_palette

    palette = voc_palette()
    palette[255] = WHITE  # neutral / void, as the paper's Fig. 4a draws it
    return palette[labels]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.figure", description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run directory")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--images", type=int, default=3, help="photos of each split (default 3)")
    parser.add_argument("--root", default=None, help="the dataset's folder, if not the run config's dataset.root")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from affinitynet.config import load_config
    from affinitynet.files import load_label_png
    from affinitynet.pipeline import label_stage, stage
    from affinitynet.stages.common import dataset

    config_path = args.run_dir / "config.yaml"
    if not config_path.is_file():
        parser.error(f"{args.run_dir}: no config.yaml (not a run directory)")
    config = load_config(config_path, [f"dataset.root={args.root}"] if args.root else [], check=False)
    root = Path(config["dataset"]["root"])
    if not root.exists():
        parser.error(f"the run's dataset is not at {root}: give --root")
    labels_dir = label_stage(config).output("pseudo_labels", args.run_dir)
    predictions_dir = stage("infer_seg").output("predictions", args.run_dir)

    panels = []  # (split's data, folder, what the middle column is)
    for split_key, folder, what in (("label_split", labels_dir, "pseudo label"),
                                    ("eval_split", predictions_dir, "network's prediction")):
        if not folder.is_dir():
            parser.error(f"{folder} is missing: the run has not finished the stage that writes it")
        data = dataset(config, split_key)
        by_id = {s.id: s for s in data.samples if s.mask_path is not None}
        present = [i for i in by_id if (folder / f"{i}.png").is_file()]
        if not present:
            parser.error(f"no image of {data.split} has both its ground truth and a label in {folder}")
        tagged = [i for i in present if len(by_id[i].labels)]   # photos with an object, if enough
        present = tagged if len(tagged) >= args.images else present
        panels.append((data, folder, what, [by_id[i] for i in evenly(present, args.images)]))

    rows = max(len(samples) for *_, samples in panels)
    cell, top, bottom = 1.5, 0.45, 0.4   # inches: an image, the titles above, the legend below
    height = rows * cell * 1.04 + top + bottom
    figure = plt.figure(figsize=(6 * cell + 0.3, height))
    grid = figure.add_gridspec(rows, 7, width_ratios=[1, 1, 1, 0.2, 1, 1, 1], wspace=0.04, hspace=0.04,
                               left=0.005, right=0.995, top=1 - top / height, bottom=bottom / height)
    seen: set[int] = set()
    for first, (data, folder, what, samples) in zip((0, 4), panels):
        titles = (f"{data.split} photo" + (" (tags only)" if first == 0 else ""), what, "ground truth")
        for row in range(rows):
            axes = [figure.add_subplot(grid[row, first + k]) for k in range(3)]
            for k, axis in enumerate(axes):
                axis.set_axis_off()
                if row == 0:
                    axis.set_title(titles[k], fontsize=9)
            if row >= len(samples):
                continue
            sample = samples[row]
            made = load_label_png(folder / f"{sample.id}.png")
            truth = data.load_mask(sample)
            seen.update(np.unique(made).tolist() + np.unique(truth).tolist())
            names = [data.class_names[c] for c in sorted(sample.labels)]
            tags = "\n".join(", ".join(names[k:k + 2]) for k in range(0, len(names), 2))
            axes[0].imshow(data.load_image(sample))
            axes[0].text(0.03, 0.03, tags, transform=axes[0].transAxes, fontsize=6, color="black", va="bottom",
                         bbox={"facecolor": "white", "alpha": 0.75, "pad": 1, "linewidth": 0})
            axes[1].imshow(colour(made), interpolation="nearest")
            axes[2].imshow(colour(truth), interpolation="nearest")
    names = panels[0][0].class_names
    handles = [Patch(facecolor=colour(np.array([c]))[0] / 255, edgecolor="#888", label=names[c])
               for c in sorted(seen) if c < len(names)]
    if 255 in seen:
        handles.append(Patch(facecolor="white", edgecolor="#888", label="neutral / void"))
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False,
                  borderaxespad=0.3)
    head, dirty = commit()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=args.dpi, metadata={
        "Title": f"affinitynet: {config['dataset']['name']} run {args.run_dir.name}",
        "Source": f"python -m benchmarks.figure (commit {head}{' with local changes' if dirty else ''})",
        "Description": f"dataset {config['dataset']['name']}, backbone {config['backbone']['name']}, "
                       f"labels {label_stage(config).name}"})
    plt.close(figure)
    print(f"wrote {args.out}: {sum(len(s) for *_, s in panels)} photos of {config['dataset']['name']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
