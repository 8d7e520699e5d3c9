"""Instance pseudo labels of IRN (Ahn, Cho & Kwak, CVPR 2019, 3.4), and the files other tools
read them from.

From an image's CAMs, its IRNet boundary map and displacement field, and its semantic pseudo
labels:

1. **Instances from the centroid map**: every cell's walk along the displacement field ends in a
   centroid region (``inter_pixel.instance_map``); the cells that end in one region are one
   instance's seed area.
2. **A walk per instance**: each class's CAM restricted to each instance's seed area
   (:func:`instance_seeds`) is propagated by the walk of Eq. 11-12 on the boundary affinities,
   like the semantic labels, so an instance grows to its boundaries and not only where its cells
   pointed.
3. **One mask per instance** (:func:`split_instances`): every pixel of a class in the semantic
   labels goes to the instance of that class whose walked seed is largest there, and each
   connected part of an instance is one mask, with its class and a score: the largest walked
   value in it over the image's largest (IRN's). A part smaller than 1% of the image scores 0
   (IRN's rule for fragments), so it ranks last.

The instance masks therefore partition the semantic labels' objects exactly: the two outputs never
disagree about which pixels are which class.

Files (:func:`save_instances`, :func:`coco_document`): a VOC ``SegmentationObject``-style palette
PNG per image (0 background, 1..N the instances by descending score, 255 where the semantic labels
are void), a JSON per image with each index's class and score, and one COCO-style
``instances.json`` whose masks are COCO run-length encoded (``pycocotools``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from ..files import IGNORE_INDEX, load_label_png, read_json, save_label_png, write_json
from ..metrics import Instance

# IRN's rule: a connected part smaller than this share of the image is a fragment (score 0).
FRAGMENT_SHARE = 0.01


def instance_seeds(cams: np.ndarray, classes: Sequence[int], instance_ids: np.ndarray
                   ) -> tuple[np.ndarray, list[int]]:
    """The walk's seeds: for each class (``cams[k]`` is class ``classes[k]``'s map on the grid)
    and each instance (``instance_ids`` (h, w), 1..N, 0 for no instance), the map restricted to
    the instance's cells, kept when it is not all zero. A class that no instance's cells see is
    one seed of its own, its whole map. Returns (seeds (S, h, w), the class of each seed)."""
    h, w = instance_ids.shape
    count = int(instance_ids.max()) if instance_ids.size else 0
    cells = instance_ids[None] == np.arange(1, count + 1).reshape(-1, 1, 1)    # (N, h, w)
    seeds, owners = [], []
    for cam, label in zip(np.asarray(cams, dtype=np.float32), classes):
        restricted = np.where(cells, cam, np.float32(0))
        kept = restricted[restricted.reshape(count, h * w).max(axis=1, initial=0) > 0]
        seeds.extend(kept if len(kept) else [cam])
        owners.extend([int(label)] * max(len(kept), 1))
    return (np.stack(seeds) if seeds else np.zeros((0, h, w), np.float32)), owners


def split_instances(semantic: np.ndarray, walked: np.ndarray, owners: Sequence[int],
                    fragment_share: float = FRAGMENT_SHARE) -> list[Instance]:
    """One mask per connected part of each instance (module docstring, step 3), highest score
    first. ``semantic`` (H, W) class labels (255 void), ``walked`` (S, H, W) the walked seeds at
    the image's resolution, ``owners`` the class of each seed."""
    from scipy import ndimage

    height, width = semantic.shape
    walked = np.asarray(walked, dtype=np.float64)
    top = walked.max() if walked.size else 0.0
    owners = np.asarray(owners, dtype=np.int64)
    found: list[Instance] = []
    for label in np.unique(semantic):
        if label in (0, IGNORE_INDEX):
            continue
        region = semantic == label
        rows = np.flatnonzero(owners == label)
        if rows.size == 0:
            # Labelled without a seed (an input not made from these CAMs): one instance per part.
            parts, count = ndimage.label(region)
            found += [Instance(int(label), parts == k, 0.0) for k in range(1, count + 1)]
            continue
        pick = np.argmax(walked[rows][:, region], axis=0)
        for position, row in enumerate(rows):
            member = np.zeros_like(region)
            member[region] = pick == position
            parts, count = ndimage.label(member)
            for k in range(1, count + 1):
                mask = parts == k
                small = mask.sum() < fragment_share * height * width
                score = 0.0 if small or top <= 0 else float(walked[row][mask].max() / top)
                found.append(Instance(int(label), mask, score))
    # Stable: equal scores keep the order of the classes and seeds.
    return sorted(found, key=lambda inst: -inst.score)


def group_seeds(cams: np.ndarray, classes: Sequence[int], instance_ids: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """irn's seeds (``make_ins_seg_labels.py``): every class's map (``cams`` (K, h, w) on the grid)
    restricted to every group of cells of ``instance_ids`` (h, w), the cells whose walk ends in no
    centroid region (id 0) being one group more, as in irn; class-major, all K x G of them, empty
    ones included (they walk to zero). Returns (seeds (K G, h, w), the class of each seed)."""
    groups = np.unique(instance_ids)
    cells = (instance_ids[None] == groups.reshape(-1, 1, 1)).astype(np.float32)       # (G, h, w)
    cams = np.asarray(cams, dtype=np.float32)
    seeds = (cams[:, None] * cells[None]).reshape(-1, *instance_ids.shape)
    return seeds, [int(label) for label in classes for _ in groups]


def threshold_instances(walked: np.ndarray, owners: Sequence[int], threshold: float,
                        fragment_share: float = FRAGMENT_SHARE) -> list[Instance]:
    """Instances as irn makes them (``irn.background: threshold``): the walked seeds (S, H, W)
    over their largest value; each pixel goes to the seed that is largest there, or to the
    background where none beats ``threshold`` (irn's ``ins_seg_bg_thres``); each connected part
    (4-neighbourhood) of a seed's pixels is one instance of the seed's class, scored by the largest
    scaled walked value in it, 0 for a part under ``fragment_share`` of the image. Highest score
    first (stable: equal scores keep the seeds' order). The semantic labels are not used."""
    from scipy import ndimage

    walked = np.asarray(walked, dtype=np.float32)
    count, height, width = walked.shape
    top = walked.max() if walked.size else 0.0
    scaled = walked / top if top > 0 else np.zeros_like(walked)
    stack = np.concatenate([np.full((1, height, width), threshold, dtype=np.float32), scaled])
    pick = np.argmax(stack, axis=0)
    found: list[Instance] = []
    for row, label in enumerate(owners):
        member = pick == row + 1
        if not member.any():
            continue
        parts, parts_count = ndimage.label(member)
        for k in range(1, parts_count + 1):
            mask = parts == k
            small = mask.sum() < fragment_share * height * width
            found.append(Instance(int(label), mask, 0.0 if small else float((scaled[row] * mask).max())))
    return sorted(found, key=lambda inst: -inst.score)


def object_map(instances: Sequence[Instance], shape: tuple[int, int], void: np.ndarray | None = None) -> np.ndarray:
    """The SegmentationObject-style index map: instance k (in the given order) is k + 1, 0
    elsewhere, 255 on ``void``. The masks must not overlap."""
    if len(instances) >= IGNORE_INDEX:
        raise ValueError(f"{len(instances)} instances do not fit an 8-bit index map")
    objects = np.zeros(shape, dtype=np.uint8)
    for index, inst in enumerate(instances, start=1):
        if objects[inst.mask].any():
            raise ValueError("instance masks overlap")
        objects[inst.mask] = index
    if void is not None:
        objects[void] = IGNORE_INDEX
    return objects


def save_instances(png_path: Path, json_path: Path, instances: Sequence[Instance], shape: tuple[int, int],
                   void: np.ndarray | None = None) -> None:
    """Write an image's instances: the index PNG and, beside it, the class and score of each
    index (``{"instances": [{"index", "category_id", "score"}]}``). The JSON is written last, so
    that a complete pair marks the image done."""
    save_label_png(png_path, object_map(instances, shape, void))
    write_json(json_path, {"instances": [{"index": k, "category_id": inst.label, "score": inst.score}
                                         for k, inst in enumerate(instances, start=1)]})


def load_instances(png_path: Path, json_path: Path) -> tuple[list[Instance], tuple[int, int]]:
    """The instances :func:`save_instances` wrote, and the image's (H, W) (raises InputError
    naming a bad file)."""
    objects = load_label_png(png_path)
    try:
        entries = read_json(json_path)["instances"]
        found = [Instance(int(e["category_id"]), objects == int(e["index"]), float(e["score"])) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(json_path, f"not an instance list ({error.__class__.__name__}: {error})") from None
    return found, objects.shape
