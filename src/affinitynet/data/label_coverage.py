"""What a run's labels hold, measured without ground truth.

mIoU needs ground-truth masks, which a user's own photos do not have. The image-level tags are
enough to see the failures that matter most: a class whose pixels vanish from the labels, and
images whose tagged class is nowhere in their label map (the CAM never found it, or the random walk
and the dCRF washed it into the background). For each of the three label sources of a run
(the CAM labels and the pseudo labels of the label split, the network's predictions of the
evaluation split) this module counts

- the share of labelled pixels (255 excluded) that each class covers;
- the images that lack a class they are tagged with (``vanished``);
- per class, the images where it covers least (``worst``), which the report shows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import InputError
from ..files import load_label_png
from .datasets.base import IGNORE_INDEX

# A class under this share of the labelled pixels is reported as (almost) absent.
RARE_PIXEL_PERCENT = 0.5
WORST_PER_CLASS = 3


def label_coverage(data, label_dir: Path) -> dict[str, Any] | None:
    """Coverage of the label PNGs ``<label_dir>/<id>.png`` of ``data``'s images; None when there
    are none. Unreadable PNGs are left out (the stage that wrote them reported them)."""
    names = data.class_names
    pixels = np.zeros(len(names), dtype=np.int64)
    images = 0
    vanished: list[dict[str, Any]] = []
    worst: dict[str, list[tuple[float, str]]] = {name: [] for name in names[1:]}
    for sample in data.samples:
        path = Path(label_dir) / f"{sample.id}.png"
        if not path.is_file():
            continue
        try:
            label = load_label_png(path)
        except InputError:
            continue
        counts = np.bincount(label[label != IGNORE_INDEX].ravel(), minlength=256)[: len(names)]
        labelled = max(int(counts.sum()), 1)
        pixels += counts
        images += 1
        missing = [names[c] for c in sample.labels if counts[c] == 0]
        if missing:
            vanished.append({"id": sample.id, "classes": missing})
        for c in sample.labels:
            worst[names[c]].append((100.0 * counts[c] / labelled, sample.id))
    if images == 0:
        return None
    total = max(int(pixels.sum()), 1)
    return {"images": images,
            "pixel_percent": {name: 100.0 * int(pixels[i]) / total for i, name in enumerate(names)},
            "vanished": vanished,
            "worst": {name: [[sample_id, round(share, 3)] for share, sample_id in sorted(entries)[:WORST_PER_CLASS]]
                      for name, entries in worst.items()}}


def images_tagged(data) -> dict[str, int]:
    counts = np.bincount([c for sample in data.samples for c in sample.labels], minlength=len(data.class_names))
    return {name: int(counts[i]) for i, name in enumerate(data.class_names) if i > 0}


def run_coverage(label_data, eval_data, folders: Iterable[tuple[str, Path, str]]) -> dict[str, Any]:
    """Coverage of every source whose folder exists (``folders``: title, directory and split key
    ``label_split`` or ``eval_split`` of each)."""
    sources = {}
    for title, folder, split_key in folders:
        if not Path(folder).is_dir():
            continue
        data = label_data if split_key == "label_split" else eval_data
        measured = label_coverage(data, Path(folder))
        if measured is not None:
            measured["split"] = data.split
            sources[title] = measured
    return {"images_tagged": images_tagged(label_data), "label_split": label_data.split,
            "eval_split": eval_data.split,
            # A folder without split lists trains and evaluates on the same photos: the network's
            # predictions then say how well it fits its labels, not how it does on new photos.
            "eval_is_training_images": bool(set(eval_data.ids)) and set(eval_data.ids) <= set(label_data.ids),
            "sources": sources}


def summary_line(results: Mapping[str, Any]) -> str | None:
    """One line on a finished run (the end of ``affinitynet run``): mIoU where measured, then what
    the labels lack, ground truth or not."""
    parts = []
    rows = results.get("rows") or {}
    for title in (results.get("training_labels", "CAM+RW+dCRF"), "Network"):
        row = rows.get(title)
        if isinstance(row, dict) and row.get("miou") is not None:
            parts.append(f"{title} mIoU {row['miou']:.1f} ({row.get('split', '?')})")
    coverage = results.get("coverage") or {}
    sources = coverage.get("sources") or {}
    lacking = [f"{len(s['vanished'])} of {s['images']} {title}" for title, s in sources.items()
               if title != "CAM labels"]
    if lacking:
        parts.append("tagged class missing from " + " and ".join(lacking))
    for title in ("predictions", "pseudo labels"):
        source = sources.get(title)
        if source:
            rare = [f"{name} {share:.2f}%" for name, share in list(source["pixel_percent"].items())[1:]
                    if share < RARE_PIXEL_PERCENT]
            if rare:
                parts.append(f"classes under {RARE_PIXEL_PERCENT}% of the {title}' pixels: {', '.join(rare)}")
            break
    if not rows and sources:
        parts.append("no ground truth, so no mIoU")
    if coverage.get("eval_is_training_images"):
        parts.append("the evaluation images are the training images")
    if not parts:
        return None
    return "summary: " + "; ".join(parts) + " (affinitynet report shows them)"
