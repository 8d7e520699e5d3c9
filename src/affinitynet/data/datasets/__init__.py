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

from ...config import declare_dataset_keys
from ...errors import InputError
from ...files import plural
from .base import DATASETS, IGNORE_INDEX, Sample, SegmentationDataset, register_dataset
from .demo import CLASS_NAMES as DEMO_CLASSES
from .demo import default_demo_root, generate_demo
from .msrc21 import ensure_msrc21, find_msrc21_tarball

__all__ = [
    "DATASETS", "DatasetReport", "IGNORE_INDEX", "InputError", "Sample", "SegmentationDataset",
    "build_dataset", "dataset_keys", "optional_dataset_keys", "register_dataset", "check_dataset", "check_skipped_share", "default_demo_root", "describe_classes", "ensure_msrc21", "find_msrc21_tarball",
    "generate_demo", "DEMO_CLASSES",
]

def _declared_keys() -> dict[str, Any]:
    """Every registered dataset's own keys with their defaults (the first declaration of a key wins)."""
    keys: dict[str, Any] = {}
    for entry in DATASETS:
        for key, value in entry.info["keys"].items():
            keys.setdefault(key, value)
    return keys


declare_dataset_keys(_declared_keys)


def dataset_keys() -> tuple[str, ...]:
    """Every ``dataset.*`` key some dataset reads to find its images (the splits excepted), but
    the optional ones (:func:`optional_dataset_keys`)."""
    keys = {"dataset.name", "dataset.root"} | {f"dataset.{key}" for entry in DATASETS for key in entry.info["keys"]}
    return tuple(sorted(keys - set(optional_dataset_keys())))


def optional_dataset_keys() -> dict[str, Any]:
    """The ``dataset.*`` keys that datasets declare optional, with their defaults: added after
    runs were made, a stage hashes them only when they differ from the default, so that those
    runs stay current."""
    return {f"dataset.{key}": entry.info["keys"][key] for entry in DATASETS
            for key in entry.info.get("optional_keys", ())}


def build_dataset(config_dataset_section: Mapping[str, Any], split: str, progress: bool = True) -> SegmentationDataset:
    """The ``split`` of the dataset the config's ``dataset`` section names (its registered
    builder, given ``root`` and the keys it declares; a key missing from the section takes the
    declared default). ``demo`` is generated into ``root`` (or a per-parameter cache folder when
    root is null) unless a complete generation with the same parameters is there. Raises
    InputError (one line) when the dataset itself cannot be read."""
    name = config_dataset_section.get("name", "voc12")
    if name not in DATASETS:
        raise InputError("dataset.name", f"unknown dataset '{name}' (known: {', '.join(DATASETS.names())})")
    entry = DATASETS.get(name)
    root = config_dataset_section.get("root")
    if not root and entry.info.get("needs_root", True):
        raise InputError("dataset.root", f"the {name} dataset needs a root directory")
    # Only the keys that say which images: the splits' names are the caller's.
    section = {"root": root, **{key: config_dataset_section.get(key, default)
                                for key, default in entry.info["keys"].items()}}
    return entry.builder(section, split, progress)


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
