"""What every dataset provides: ids, class names, images, image-level labels, optional masks
and optional instance masks.

Class index 0 is ``background``; object classes are 1..K, as in PASCAL VOC. Image-level labels
are the object classes present (never background). Masks are uint8 (H, W) with 255 = ignore.
Instance masks follow VOC's ``SegmentationObject`` layout: an index PNG with 0 = background,
1..N = the objects, 255 = void; each object's class is read from the class mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...files import IGNORE_INDEX, load_image, load_label_png
from ...metrics import Instance
from ...registry import Registry

# Every dataset registers a builder ``(section, split, progress) -> SegmentationDataset`` with
# ``description`` (one line, for ``affinitynet datasets list``) and ``keys``: the ``dataset.*``
# config keys it reads beyond ``name`` and ``root``, with their defaults. Every stage hashes them.
# Optional: ``needs_root=False`` (a generated dataset), ``required``: keys that must be set, each
# with what it names, ``optional_keys``: keys added after runs were made, hashed only when they
# differ from their default (so that those runs stay current).
DATASETS = Registry("dataset", package="affinitynet.data.datasets")
register_dataset = DATASETS.register


@dataclass
class Sample:
    id: str
    image_path: Path
    labels: tuple[int, ...]             # object class indices present, 1..K, sorted
    mask_path: Path | None = None
    instance_path: Path | None = None   # SegmentationObject-style PNG, where the dataset has one


@dataclass
class SegmentationDataset:
    """A split of a dataset. Subclasses fill ``samples`` and may override :meth:`load_mask`."""

    name: str
    root: Path
    split: str
    class_names: list[str]              # index 0 = "background"
    samples: list[Sample] = field(default_factory=list)
    # Inputs refused while the split was read (one line each), reported by batch commands.
    skipped: list[str] = field(default_factory=list)
    # Images found beside the dataset that it leaves out (a folder's untagged photos), and
    # things worth a look that refuse nothing (a tag that looks like a typo of a class).
    untagged: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def has_instances(self) -> bool:
        return any(sample.instance_path is not None for sample in self.samples)

    @property
    def num_classes(self) -> int:
        """Background plus object classes."""
        return len(self.class_names)

    @property
    def num_object_classes(self) -> int:
        return len(self.class_names) - 1

    @property
    def ids(self) -> list[str]:
        return [sample.id for sample in self.samples]

    @property
    def has_masks(self) -> bool:
        return any(sample.mask_path is not None for sample in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def by_id(self, sample_id: str) -> Sample:
        if not hasattr(self, "_index"):
            self._index = {sample.id: sample for sample in self.samples}
        return self._index[sample_id]

    def load_image(self, sample: Sample) -> np.ndarray:
        """RGB uint8 (H, W, 3); raises InputError naming the file."""
        return load_image(sample.image_path)

    def load_mask(self, sample: Sample) -> np.ndarray | None:
        """uint8 (H, W) class indices with 255 = ignore, or None without ground truth."""
        raise NotImplementedError

    def load_instances(self, sample: Sample) -> list[Instance] | None:
        """The sample's objects (``metrics.Instance``, in index order) from its SegmentationObject
        PNG, each with the class that most of its pixels have in the class mask; None without
        instance ground truth. Raises InputError naming the file when the two masks disagree in
        size or an object has no class."""
        if sample.instance_path is None:
            return None
        objects = load_label_png(sample.instance_path)
        classes = self.load_mask(sample)
        if classes is None or classes.shape != objects.shape:
            raise InputError(sample.instance_path, "instance mask without a class mask of the same size")
        instances = []
        for index in np.unique(objects):
            if index in (0, IGNORE_INDEX):
                continue
            pixels = objects == index
            labels = classes[pixels]
            labels = labels[(labels != 0) & (labels != IGNORE_INDEX)]
            if labels.size == 0:
                raise InputError(sample.instance_path, f"object {index} has no object class in the class mask")
            instances.append(Instance(int(np.bincount(labels).argmax()), pixels))
        return instances

    def multi_hot(self, sample: Sample) -> np.ndarray:
        """Image-level labels over the K object classes (float32, shape (K,))."""
        target = np.zeros(self.num_object_classes, dtype=np.float32)
        for label in sample.labels:
            target[label - 1] = 1.0
        return target

    def check_mask(self, sample: Sample, mask: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
        """Refuse a mask whose size differs from its image or whose values are not class indices."""
        path = sample.mask_path or sample.image_path
        if mask.shape[:2] != tuple(image_shape[:2]):
            raise InputError(path, f"mask size {mask.shape[1]}x{mask.shape[0]} differs from its image "
                                   f"{image_shape[1]}x{image_shape[0]}")
        bad = (mask >= self.num_classes) & (mask != IGNORE_INDEX)
        if bad.any():
            raise InputError(path, f"mask value {int(mask[bad].max())} out of range "
                                   f"(0..{self.num_classes - 1} or 255)")
        return mask
