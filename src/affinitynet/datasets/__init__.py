"""Datasets: building a split from the config's ``dataset`` section, listing and checking them.

Reading a split never stops at a bad entry: entries with a problem found while the split is read
(missing file, unknown tag, a path leaving the root, an undecodable ground truth when labels come
from it) are left out and recorded in ``dataset.skipped`` as ``"<file>: <problem>"``. Images that
exist but cannot be decoded are found by the stage that loads them (``InputError``), or all at once
by :func:`check_dataset`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..io import InputError, plural
from .base import IGNORE_INDEX, Sample, SegmentationDataset
from .demo import CLASS_NAMES as DEMO_CLASSES, build_demo, default_demo_root, generate_demo
from .folder import build_folder
from .msrc21 import build_msrc21, ensure_msrc21, find_msrc21_tarball
from .voc12 import build_voc12

__all__ = [
    "DATASETS", "DatasetReport", "IGNORE_INDEX", "InputError", "Sample", "SegmentationDataset",
    "build_dataset", "check_dataset", "check_skipped_share", "default_demo_root", "describe_classes", "ensure_msrc21", "find_msrc21_tarball",
    "generate_demo", "DEMO_CLASSES",
]

DATASETS: dict[str, str] = {
    "demo": "synthetic blobs whose class shows only in a small tag (generated, 5 classes + background)",
    "msrc21": "MSRC-21 v2, native layout; object protocol (14 + background) or standard21 (eval only)",
    "voc12": "PASCAL VOC 2012 + SBD train_aug, the paper's dataset (20 classes + background)",
    "folder": "your images with tags from a CSV/JSON, an optional class list and optional masks",
}

_DEFAULTS = {"name": "voc12", "root": None, "protocol": "object", "labels_file": None, "classes_file": None,
             "masks_dir": None, "demo_size": 128, "demo_train": 240, "demo_val": 60, "demo_seed": 0}


def build_dataset(config_dataset_section: Mapping[str, Any], split: str, progress: bool = True) -> SegmentationDataset:
    """The ``split`` of the dataset the config's ``dataset`` section names.

    ``demo`` is generated into ``root`` (or a per-parameter cache folder when root is null) unless a
    complete generation with the same parameters is there. Optional keys beyond the config schema:
    ``demo_seed`` (default 0; the demo images do not follow the run's seed) and ``masks_dir``
    (folder dataset). Raises InputError (one line) when the dataset itself cannot be read.
    """
    section = {**_DEFAULTS, **dict(config_dataset_section)}
    name = section["name"]
    root = section["root"]
    if name == "demo":
        return build_demo(root, split, size=int(section["demo_size"]), num_train=int(section["demo_train"]),
                          num_val=int(section["demo_val"]), seed=int(section["demo_seed"]), progress=progress)
    if not root:
        raise InputError("dataset.root", f"the {name} dataset needs a root directory")
    if name == "msrc21":
        return build_msrc21(root, split, protocol=section["protocol"])
    if name == "voc12":
        return build_voc12(root, split)
    if name == "folder":
        return build_folder(root, split, section["labels_file"], section["classes_file"], section["masks_dir"])
    raise InputError("dataset.name", f"unknown dataset '{name}' (known: {', '.join(DATASETS)})")


# Fewer training images than this cannot teach a class: its CAM is noise (a handful).
MIN_IMAGES_PER_CLASS = 5


def images_per_class(dataset: SegmentationDataset) -> dict[str, int]:
    """Images tagged with each object class (background excluded)."""
    counts = Counter(label for sample in dataset.samples for label in sample.labels)
    return {name: counts.get(index, 0) for index, name in enumerate(dataset.class_names) if index > 0}


def describe_classes(dataset: SegmentationDataset, listed: int = 10) -> list[str]:
    """What a run prints before training: the class list with image counts, then one line per
    warning (rare classes, likely typos, untagged and skipped images; the first ``listed`` each)."""
    counts = images_per_class(dataset)
    lines = [f"{dataset.name} '{dataset.split}': {plural(len(dataset), 'image')}, "
             f"{plural(len(counts), 'object class')} (images tagged): "
             + ", ".join(f"{name} {count}" for name, count in counts.items())]
    rare = [f"'{name}' ({count})" for name, count in counts.items() if count < MIN_IMAGES_PER_CLASS]
    if rare:
        lines.append(f"warning: fewer than {MIN_IMAGES_PER_CLASS} images for {', '.join(rare)}: "
                     f"too few to learn a class from; tag more images or merge the class")
    lines += [f"warning: {line}" for line in dataset.warnings]
    for title, entries in ((f"{plural(len(dataset.untagged), 'image')} beside the tags file have no tags "
                            f"and are left out", dataset.untagged),
                           (f"{plural(len(dataset.skipped), 'image')} skipped", dataset.skipped)):
        if entries:
            lines.append(f"{title}:")
            lines += [f"  {entry}" for entry in entries[:listed]]
            if len(entries) > listed:
                lines.append(f"  ... and {len(entries) - listed} more (affinitynet datasets check lists them all)")
    return lines


def check_skipped_share(dataset: SegmentationDataset, max_share: float) -> None:
    """Stop (InputError naming the dataset) when more than ``max_share`` of the images found are
    left out (skipped entries and untagged images): a mistake in the tags, not a few bad files."""
    left_out = len(dataset.skipped) + len(dataset.untagged)
    found = len(dataset) + left_out
    if found == 0 or left_out / found <= max_share:
        return
    first = (dataset.skipped or dataset.untagged)[0]
    raise InputError(dataset.root, f"{left_out} of {found} images ({100 * left_out / found:.0f}%) would be left "
                                   f"out of split '{dataset.split}', more than dataset.max_skipped "
                                   f"({100 * max_share:.0f}%); first: {first}. Fix the tags, or allow it with "
                                   f"dataset.max_skipped={min(1.0, round(left_out / found + 0.05, 2))}")


@dataclass
class DatasetReport:
    """What :func:`check_dataset` found.

    ``skipped``: entries refused while the split was read (``dataset.skipped``); ``problems``: files
    of the kept entries that failed to load or check. One line each. Also readable as a mapping
    (``report["problems"]``, ``report.get(...)``) with the keys of :meth:`to_dict`.
    """

    name: str
    split: str
    root: str
    num_listed: int                      # entries kept when the split was read
    num_images_ok: int = 0
    num_masks: int = 0
    num_masks_ok: int = 0
    images_per_class: dict[str, int] = field(default_factory=dict)
    objects_per_image: dict[int, int] = field(default_factory=dict)   # {number of classes: images}
    skipped: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # Suspicious but possibly fine (VOC XMLs name objects the masks may leave void).
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.skipped and not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "split": self.split, "root": self.root, "num_listed": self.num_listed,
                "num_images_ok": self.num_images_ok, "num_masks": self.num_masks,
                "num_masks_ok": self.num_masks_ok, "images_per_class": dict(self.images_per_class),
                "objects_per_image": {str(k): v for k, v in sorted(self.objects_per_image.items())},
                "skipped": list(self.skipped), "problems": list(self.problems), "warnings": list(self.warnings)}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def format(self) -> str:
        histogram = " / ".join(str(self.objects_per_image.get(k, 0))
                               for k in range(max(self.objects_per_image, default=0) + 1))
        lines = [f"{self.name}/{self.split} at {self.root}: {self.num_listed} images kept "
                 f"({len(self.skipped)} entries skipped), {self.num_images_ok} readable; "
                 f"{self.num_masks} masks, {self.num_masks_ok} valid",
                 f"images with 0/1/2/... object classes: {histogram}",
                 "images per class: " + ", ".join(f"{k} {v}" for k, v in self.images_per_class.items())]
        for title, entries in (("skipped", self.skipped), ("problems", self.problems), ("warnings", self.warnings)):
            if entries:
                lines.append(f"{len(entries)} {title}:")
                lines.extend(f"  {entry}" for entry in entries)
        if self.ok:
            lines.append("no problems")
        return "\n".join(lines)


def check_dataset(dataset: SegmentationDataset, progress: bool = True) -> DatasetReport:
    """Open every image and mask of the split; count what is there and list every problem.

    ``skipped`` repeats the split's refused entries; ``problems`` has one line per image or mask that
    cannot be read, has the wrong size, or holds values outside the class list. Images whose
    image-level labels name a class their mask does not contain go to ``warnings``.
    """
    from tqdm import tqdm

    report = DatasetReport(dataset.name, dataset.split, str(dataset.root), len(dataset), skipped=list(dataset.skipped))
    has_background = getattr(dataset, "has_background", True)
    object_names = dataset.class_names[1:] if has_background else dataset.class_names
    per_class: Counter = Counter()
    per_image: Counter = Counter()
    for sample in tqdm(dataset.samples, desc=f"check {dataset.name}/{dataset.split}", unit="img",
                       disable=not progress, leave=False):
        per_image[len(sample.labels)] += 1
        per_class.update(sample.labels)
        try:
            dataset.load_image(sample)
            report.num_images_ok += 1
        except InputError as error:
            report.problems.append(str(error))
            continue
        if sample.mask_path is None:
            continue
        report.num_masks += 1
        try:
            mask = dataset.load_mask(sample)
        except InputError as error:
            report.problems.append(str(error))
            continue
        report.num_masks_ok += 1
        in_mask = set(np.unique(mask).tolist())
        missing = [dataset.class_names[c] for c in sample.labels if c not in in_mask]
        if missing:
            report.warnings.append(f"{sample.mask_path}: image-level label '{missing[0]}' of {sample.id} "
                                   f"does not occur in its mask")
    offset = 1 if has_background else 0
    report.images_per_class = {name: per_class.get(index + offset, 0) for index, name in enumerate(object_names)}
    report.objects_per_image = dict(sorted(per_image.items()))
    return report
