"""PASCAL VOC 2012 with the SBD augmentation (``train_aug``), the paper's dataset.

``dataset.root`` is ``VOC2012`` (``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    Annotations/<id>.xml               image-level labels
    SegmentationClass/<id>.png         palette masks (train, val)
    SegmentationClassAug/<id>.png      SBD-converted masks for train_aug (palette or grey)
    SegmentationObject/<id>.png        instance masks (train, val): IRN's instance labels are scored
    ImageSets/Segmentation/{train,val,trainval,test}.txt
    ImageSets/Segmentation/train_aug.txt  or  <root>/train_aug.txt

List lines may be bare ids or DeepLab-style ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``.

Image-level labels are the object names in the XML, *including* objects marked difficult or
truncated: they are in the image, and the released psa code labels them the same way. Without an
XML the labels come from the mask. The mask is ``SegmentationClass`` when present, else
``SegmentationClassAug``; both use the same 21 indices with 255 = ignore.
"""
from __future__ import annotations

import os
import posixpath
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...files import load_label_png
from .base import IGNORE_INDEX, Sample, SegmentationDataset, register_dataset
from .folder import listed_ids, load_checked_mask, relative_inside

CLASS_NAMES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def resolve_root(root: str | os.PathLike) -> Path:
    """``root`` if it holds JPEGImages/, else ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    root = Path(root).expanduser()
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise InputError(root, "not a PASCAL VOC 2012 directory (no JPEGImages/ folder)")


def split_list(root: Path, split: str) -> Path:
    candidates = [root / "ImageSets" / "Segmentation" / f"{split}.txt"]
    if split == "train_aug":
        candidates += [root / "ImageSets" / "SegmentationAug" / "train_aug.txt", root / "train_aug.txt"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(candidates[0], f"split list for '{split}' not found")


def _parse_line(text: str) -> str:
    """The image id on a list line; ValueError if it is not a plain id inside the root."""
    token = text.split()[0]
    if token.startswith("/JPEGImages/"):      # DeepLab's lists: paths relative to the root
        token = token[1:]
    relative = relative_inside(token)
    if "/" in relative or relative.lower().endswith((".jpg", ".png")):
        relative = posixpath.splitext(posixpath.basename(relative))[0]
    return relative


def xml_labels(path: Path) -> tuple[int, ...]:
    try:
        tree = ElementTree.parse(path)
    except ElementTree.ParseError as error:
        raise InputError(path, f"not valid XML ({error})") from None
    except OSError as error:
        raise InputError(path, f"cannot read ({error.strerror or error.__class__.__name__})") from None
    labels = set()
    for node in tree.getroot().iter("object"):
        name = (node.findtext("name") or "").strip()
        if name not in CLASS_NAMES[1:]:
            raise InputError(path, f"object name '{name}' is not a VOC class")
        labels.add(CLASS_NAMES.index(name))
    return tuple(sorted(labels))


class VOC12Dataset(SegmentationDataset):
    def load_mask(self, sample: Sample) -> np.ndarray | None:
        return load_checked_mask(self, sample)


def build_voc12(root: str | os.PathLike, split: str) -> VOC12Dataset:
    root = resolve_root(root)
    list_path = split_list(root, split)
    dataset = VOC12Dataset(name="voc12", root=root, split=split, class_names=list(CLASS_NAMES))
    seen: set[str] = set()
    for where, sample_id in listed_ids(list_path, _parse_line, dataset.skipped, seen):
        image_path = root / "JPEGImages" / f"{sample_id}.jpg"
        if not image_path.is_file():
            dataset.skipped.append(str(InputError(image_path, f"image file not found ({where})")))
            continue
        mask_path = next((path for path in (root / "SegmentationClass" / f"{sample_id}.png",
                                            root / "SegmentationClassAug" / f"{sample_id}.png")
                          if path.is_file()), None)
        xml_path = root / "Annotations" / f"{sample_id}.xml"
        try:
            if xml_path.is_file():
                labels = xml_labels(xml_path)
            elif mask_path is not None:
                mask = load_label_png(mask_path)
                present = np.unique(mask)
                labels = tuple(int(c) for c in present if c not in (0, IGNORE_INDEX))
                if any(c >= len(CLASS_NAMES) for c in labels):
                    raise InputError(mask_path, f"mask value {max(labels)} out of range "
                                                f"(0..{len(CLASS_NAMES) - 1} or 255)")
            else:
                raise InputError(xml_path, f"no annotation XML and no mask, so no image-level labels ({where})")
        except InputError as error:
            dataset.skipped.append(str(error))
            continue
        objects = root / "SegmentationObject" / f"{sample_id}.png"
        dataset.samples.append(Sample(sample_id, image_path, labels, mask_path,
                                      objects if objects.is_file() and mask_path is not None else None))
    return dataset


@register_dataset("voc12", description="PASCAL VOC 2012 + SBD train_aug, the paper's dataset (20 classes + background)",
                  keys={})
def from_config(section, split: str, progress: bool = True) -> VOC12Dataset:
    return build_voc12(section["root"], split)
