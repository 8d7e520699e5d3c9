"""COCO-format instance annotations: COCO itself (2014, 2017) and the COCO JSON that labelling
tools export (CVAT, Label Studio, Roboflow, labelme2coco, ...).

Per split (``dataset.*`` keys; ``{split}`` is replaced by the split's name)::

    <root>/<annotations_file>   default annotations/instances_{split}.json  (COCO: instances_train2014.json)
    <root>/<images_dir>/<file_name of each image>   default {split}          (COCO: train2014/)

A path that is absolute is used as it is. A file without ``{split}`` serves every split (a single
export: the network is then evaluated on its training images, as a folder without split lists).

What is read (``pycocotools`` decodes polygons and RLE, compressed or not):

- **Classes**: background is 0, then the file's ``categories`` sorted by id, named as the file
  names them (COCO's 80 ids 1..90 with gaps become 1..80). ``dataset.category_subset`` keeps the
  categories it names (a list of names, whatever their case); the others are left out as if never
  annotated: they are no tag, and their pixels are background.
- **Tags** (image-level labels): the categories of an image's annotations, crowd ones included,
  and of its optional ``category_ids`` list (this project's key for image-level tags without
  annotations; ``"category_ids": []`` says an image holds none of the categories).
- **Ground truth**, where the file has masks at all and every annotation of the image has one:
  the class mask paints each object's class, pixels that objects of two classes both claim are
  void (255), and crowd regions (``iscrowd: 1``) are void where no other object lies. Instances
  (IRN's Table 3) are the non-crowd annotations, in file order, overlaps kept. An annotation
  without ``segmentation`` (or with an empty one) is a tag only, so its image has no ground truth.
- **Images without annotations** (and without ``category_ids``) are not read as background: they
  are left out and listed in ``dataset.untagged`` (COCO 2014: 702 of train2014, 367 of val2014),
  as the folder dataset lists untagged photos.

Bad input. A file that is not COCO (not JSON; no ``images`` or ``categories`` list; an entry
without an integer ``id``, ``image_id`` or ``category_id`` or a string ``file_name``; a duplicate
id) stops with one line naming the file and the entry. A problem of one image's annotations (an
unknown category id, a polygon outside the image or with an odd number of coordinates, an RLE of
another size, a segmentation that is neither) leaves that image out with one line in
``dataset.skipped``, as the other datasets do with a bad entry; an annotation naming no image of
the file is a warning. Ids are ``file_name`` without its extension (``/`` as ``__``).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from pycocotools import mask as coco_mask

from ...config import DEFAULTS
from ...errors import InputError
from ...files import read_json_object
from ...metrics import Instance
from .base import IGNORE_INDEX, Sample, SegmentationDataset, register_dataset
from .folder import (
    BACKGROUND,
    _id_of,
    closest_class,
    image_size,
    read_text,
    relative_inside,
)

SPLIT = "{split}"
KEYS = ("annotations_file", "images_dir", "category_subset")
IMAGE_TAGS = "category_ids"
_NUMBERS = frozenset({int, float})
# Parsed files kept per process: every stage reads its splits again, and a file of COCO 2014
# train's size takes a minute to parse and check (docs/coco.md). Two splits and one spare.
_CACHE_SIZE = 3
_CACHE: dict[tuple[str, int, int], _Document] = {}


@dataclass(frozen=True)
class _Object:
    """One annotation as the masks need it."""
    category_id: int
    crowd: bool
    segmentation: Any                # polygons, RLE, or None for a tag only


@dataclass
class _Image:
    id: int
    file_name: str
    height: int | None
    width: int | None
    tags: tuple[int, ...] | None     # its category_ids list; None without one
    objects: list[_Object] = field(default_factory=list)
    problem: str | None = None       # the first problem of its annotations, if any


@dataclass
class _Document:
    path: Path
    categories: list[tuple[int, str]]          # (id, name), sorted by id
    images: list[_Image]                        # in file order
    has_masks: bool                             # some annotation has a segmentation
    warnings: list[str]
    # The splits read from it, by (image folder, split, category subset): the image files are
    # looked for once per process, not once per stage.
    built: dict[tuple, CocoDataset] = field(default_factory=dict)


@dataclass
class CocoSample(Sample):
    """A sample with what its masks are drawn from (so that any dataset holding it can draw them)."""
    size: tuple[int, int] = (0, 0)              # (height, width) the file gives
    objects: tuple[tuple[int, bool, Any], ...] = ()   # (class index, crowd, segmentation)


class CocoDataset(SegmentationDataset):
    def load_mask(self, sample: Sample) -> np.ndarray | None:
        """uint8 class mask (255 void) drawn from the sample's annotations; None without ground truth."""
        if sample.mask_path is None:
            return None
        masks = _decoded(sample)
        mask = np.zeros(sample.size, dtype=np.uint8)
        claimed = np.zeros(sample.size, dtype=bool)
        for (label, crowd, _), pixels in zip(sample.objects, masks):
            if crowd:
                continue
            # Pixels that objects of two classes claim have no single right answer.
            conflict = pixels & claimed & (mask != label)
            mask[pixels & ~claimed] = label
            mask[conflict] = IGNORE_INDEX
            claimed |= pixels
        for (_, crowd, _), pixels in zip(sample.objects, masks):
            if crowd:
                mask[pixels & ~claimed] = IGNORE_INDEX
        return mask

    def load_instances(self, sample: Sample) -> list[Instance] | None:
        """The non-crowd annotations as ``metrics.Instance`` in file order (overlaps kept, empty
        masks left out); None without ground truth."""
        if sample.instance_path is None:
            return None
        return [Instance(label, pixels) for (label, crowd, _), pixels in zip(sample.objects, _decoded(sample))
                if not crowd and pixels.any()]


def _decoded(sample: CocoSample) -> list[np.ndarray]:
    """Each object's boolean mask; InputError naming the image when it is not the size the file says."""
    height, width = image_size(sample.image_path)
    if (height, width) != tuple(sample.size):
        raise InputError(sample.image_path, f"is {width}x{height} but {sample.mask_path.name} gives "
                                            f"{sample.size[1]}x{sample.size[0]}")
    return [decode(segmentation, height, width) for _, _, segmentation in sample.objects]


def decode(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A boolean (H, W) mask from COCO polygons (a list of coordinate lists) or RLE (compressed
    ``counts`` string or uncompressed list)."""
    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = {"size": [height, width], "counts": segmentation["counts"].encode("ascii")}
    return coco_mask.decode(rle).astype(bool)


# ----------------------------------------------------------------------------------------------
# Reading a file
# ----------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(kind: str, index: int, entry: Any) -> str:
    """How an entry is named in a message: ``annotation 17`` by its id, else ``annotations[3]``."""
    if isinstance(entry, dict) and _is_int(entry.get("id")):
        return f"{kind} {entry['id']}"
    return f"{kind}s[{index}]"


def _list_of(tree: dict[str, Any], key: str, path: Path, required: bool = True) -> list:
    value = tree.get(key, None if required else [])
    if not isinstance(value, list):
        raise InputError(path, f"'{key}' must be a list ({'missing' if value is None else type(value).__name__}); "
                               f"not a COCO instances file")
    return value


def _segmentation_problem(segmentation: Any, height: int | None, width: int | None) -> str | None:
    """Why a non-empty segmentation cannot be drawn on its image, or None."""
    if height is None or width is None:
        return "the image has no 'height' and 'width', which its segmentation needs"
    if isinstance(segmentation, list):
        for polygon in segmentation:
            # Checks in C over each polygon, not a Python call per coordinate: COCO 2014's train
            # file has millions. A NaN or an infinity makes the sum one.
            if type(polygon) is not list or not _NUMBERS.issuperset(map(type, polygon)) or \
                    not math.isfinite(sum(polygon)):
                return "polygon is not a list of numbers"
            if len(polygon) < 6 or len(polygon) % 2:
                return f"polygon has {len(polygon)} coordinates (x, y pairs, at least 3 points)"
            xs, ys = polygon[0::2], polygon[1::2]
            if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= width or min(ys) >= height:
                return (f"polygon lies outside the {width}x{height} image (x {min(xs):g}..{max(xs):g}, "
                        f"y {min(ys):g}..{max(ys):g})")
        return None
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size, counts = segmentation.get("size"), segmentation["counts"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
            return "RLE without a [height, width] 'size'"
        if list(size) != [height, width]:
            return f"RLE size {size[1]}x{size[0]} differs from the image's {width}x{height}"
        if isinstance(counts, list):
            runs = np.asarray(counts) if all(_is_int(v) for v in counts) else None
            if runs is None or (runs < 0).any():
                return "RLE 'counts' is not a list of run lengths"
            total = int(runs.sum())
            return None if total == height * width else f"RLE counts cover {total} pixels, not the image's {height * width}"
        if isinstance(counts, str) and counts.isascii():
            return None
        return "RLE 'counts' is neither a list of run lengths nor a string"
    return "segmentation is neither polygons nor RLE"


def _parse(path: Path) -> _Document:
    tree = read_json_object(path, read_text(path),
                            "not a COCO instances file (a JSON object with 'images' and 'categories')")

    categories: dict[int, str] = {}
    names: dict[str, int] = {}
    for index, entry in enumerate(_list_of(tree, "categories", path)):
        where = _entry("category", index, entry)
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            raise InputError(path, f"{where}: a category needs an integer 'id'")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(path, f"{where}: a category needs a 'name'")
        if entry["id"] in categories:
            raise InputError(path, f"{where}: id {entry['id']} is used twice")
        if name.strip().casefold() in names:
            raise InputError(path, f"{where}: name '{name}' is used twice (by category {names[name.strip().casefold()]})")
        categories[entry["id"]] = name.strip()
        names[name.strip().casefold()] = entry["id"]

    images: dict[int, _Image] = {}
    for index, entry in enumerate(_list_of(tree, "images", path)):
        where = _entry("image", index, entry)
        if not isinstance(entry, dict) or not _is_int(entry.get("id")):
            raise InputError(path, f"{where}: an image needs an integer 'id'")
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"].strip():
            raise InputError(path, f"{where}: an image needs a 'file_name'")
        if entry["id"] in images:
            raise InputError(path, f"{where}: id {entry['id']} is used twice")
        size = [entry.get("height"), entry.get("width")]
        if any(v is not None and not (_is_int(v) and v > 0) for v in size):
            raise InputError(path, f"{where}: 'height' and 'width' must be positive integers, got {size}")
        tags = entry.get(IMAGE_TAGS)
        if tags is not None and not (isinstance(tags, list) and all(_is_int(v) for v in tags)):
            raise InputError(path, f"{where}: '{IMAGE_TAGS}' must be a list of category ids")
        image = _Image(entry["id"], entry["file_name"].strip(), size[0], size[1],
                       tuple(tags) if tags is not None else None)
        unknown = [v for v in image.tags or () if v not in categories]
        if unknown:
            image.problem = f"{IMAGE_TAGS} names category id {unknown[0]}, which is not in the file's categories"
        images[image.id] = image

    warnings: list[str] = []
    has_masks = False
    for index, entry in enumerate(_list_of(tree, "annotations", path, required=False)):
        # ``type(...) is int`` (bool is no id), and the entry named only when needed: this loop
        # runs once per object (860,000 in COCO 2014).
        if type(entry) is not dict or type(entry.get("image_id")) is not int or \
                type(entry.get("category_id")) is not int:
            raise InputError(path, f"{_entry('annotation', index, entry)}: an annotation needs an integer 'image_id' "
                                   f"and 'category_id'")
        image = images.get(entry["image_id"])
        if image is None:
            warnings.append(str(InputError(path, f"{_entry('annotation', index, entry)}: image id {entry['image_id']} "
                                                 f"is not in the file's images; annotation left out")))
            continue
        crowd = entry.get("iscrowd", 0)
        if crowd not in (0, 1):
            raise InputError(path, f"{_entry('annotation', index, entry)}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        segmentation = entry.get("segmentation") or None
        if image.problem is None:
            if entry["category_id"] not in categories:
                image.problem = (f"{_entry('annotation', index, entry)}: category id {entry['category_id']} is not "
                                 f"in the file's categories")
            elif segmentation is not None:
                problem = _segmentation_problem(segmentation, image.height, image.width)
                if problem:
                    image.problem = f"{_entry('annotation', index, entry)}: {problem}"
        has_masks = has_masks or segmentation is not None
        image.objects.append(_Object(entry["category_id"], bool(crowd), segmentation))
    return _Document(path, sorted(categories.items()), list(images.values()), has_masks, warnings)


def read_document(path: Path) -> _Document:
    """The checked content of a COCO instances file, parsed once per process while the file is
    unchanged. Raises InputError (one line naming the file and the entry) when it is not COCO."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        document = _parse(path)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = document
    return _CACHE[key]


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

def _split_path(root: Path, template: str, split: str) -> Path:
    path = Path(template.replace(SPLIT, split)).expanduser()
    return path if path.is_absolute() else root / path


def _kept_categories(document: _Document, subset: Sequence[str] | None) -> list[tuple[int, str]]:
    """The categories the classes are made of: all, or those ``subset`` names (in id order)."""
    if subset is None:
        kept = list(document.categories)
    else:
        by_key = {name.casefold(): (category_id, name) for category_id, name in document.categories}
        for name in subset:
            if str(name).strip().casefold() not in by_key:
                closest = closest_class(str(name), [n for _, n in document.categories])
                hint = f" (did you mean '{closest}'?)" if closest else ""
                raise InputError(document.path, f"dataset.category_subset names '{name}', which is not a category "
                                                f"of this file{hint}")
        wanted = {str(name).strip().casefold() for name in subset}
        kept = [(category_id, name) for category_id, name in document.categories if name.casefold() in wanted]
    for category_id, name in kept:
        if name.casefold() == BACKGROUND:
            raise InputError(document.path, f"category {category_id} is named '{name}', which is always class 0: "
                                            f"rename it, or leave it out with dataset.category_subset")
    return kept


def build_coco(root: str | os.PathLike, split: str, annotations_file: str = DEFAULTS["dataset"]["annotations_file"],
               images_dir: str = DEFAULTS["dataset"]["images_dir"],
               category_subset: Iterable[str] | None = None) -> CocoDataset:
    """The ``split`` of a COCO-format dataset (module docstring). Raises InputError (one line)
    when the file or folder is missing or the file is not COCO."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise InputError(root, "dataset root is not a directory")
    path = _split_path(root, annotations_file, split)
    if not path.is_file():
        raise InputError(path, f"annotations of split '{split}' not found (dataset.annotations_file is "
                               f"'{annotations_file}')")
    folder = _split_path(root, images_dir, split)
    if not folder.is_dir():
        raise InputError(folder, f"images of split '{split}' not found (dataset.images_dir is '{images_dir}')")
    document = read_document(path)
    subset = None if category_subset is None else list(category_subset)
    key = (str(folder), split, None if subset is None else tuple(subset))
    if key not in document.built:
        document.built[key] = _build(document, root, split, folder, subset)
    built = document.built[key]
    return CocoDataset(built.name, root, split, list(built.class_names), list(built.samples), list(built.skipped),
                       list(built.untagged), list(built.warnings))


def _build(document: _Document, root: Path, split: str, folder: Path, subset: list[str] | None) -> CocoDataset:
    path = document.path
    kept = _kept_categories(document, subset)
    index = {category_id: position for position, (category_id, _) in enumerate(kept, start=1)}
    dataset = CocoDataset(name="coco", root=root, split=split, class_names=[BACKGROUND, *(n for _, n in kept)])
    dataset.warnings.extend(document.warnings)

    first_seen: dict[str, int] = {}
    for image in document.images:
        where = f"image {image.id} '{image.file_name}'"

        def refuse(problem: str) -> None:
            dataset.skipped.append(str(InputError(path, f"{problem}; image skipped")))

        if image.problem:
            refuse(f"{where}: {image.problem}")
            continue
        try:
            relative = relative_inside(image.file_name)
        except ValueError as error:
            refuse(f"{where}: {error}")
            continue
        sample_id = _id_of(relative)
        if sample_id in first_seen:
            refuse(f"{where}: same file as image {first_seen[sample_id]}")
            continue
        first_seen[sample_id] = image.id
        if not image.objects and image.tags is None:
            dataset.untagged.append(f"{folder / relative} (image {image.id} of {path.name}: no annotations)")
            continue
        image_path = folder / relative
        if not image_path.is_file():
            dataset.skipped.append(str(InputError(image_path, f"image file not found (image {image.id} of {path.name})")))
            continue
        objects = [o for o in image.objects if o.category_id in index]
        labels = tuple(sorted({index[o.category_id] for o in objects}
                              | {index[c] for c in image.tags or () if c in index}))
        drawn = {index[o.category_id] for o in objects if o.segmentation is not None}
        # Ground truth only where every object of the image is drawn: a tag without a mask would
        # score its object's pixels as background.
        has_truth = document.has_masks and set(labels) <= drawn and all(o.segmentation is not None for o in objects)
        dataset.samples.append(CocoSample(
            sample_id, image_path, labels, path if has_truth else None, path if has_truth else None,
            size=(image.height or 0, image.width or 0),
            objects=tuple((index[o.category_id], o.crowd, o.segmentation) for o in objects) if has_truth else ()))
    return dataset


@register_dataset("coco", description="COCO-format instances JSON (COCO 2014, labelling tools' exports): tags, masks, "
                                      "instances",
                  keys={key: DEFAULTS["dataset"][key] for key in KEYS}, optional_keys=KEYS)
def from_config(section, split: str, progress: bool = True) -> CocoDataset:
    return build_coco(section["root"], split, section["annotations_file"], section["images_dir"],
                      section["category_subset"])


# --- writing: COCO files of instances (IRN's instance labels, the demo's ground truth) --------------

def rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's compressed run-length encoding of a boolean mask (``{"size": [h, w], "counts"}``)."""
    encoded = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in encoded["size"]], "counts": encoded["counts"].decode("ascii")}


def coco_document(images: Sequence[tuple[str, str, tuple[int, int], Sequence[Instance]]],
                  class_names: Sequence[str], description: str = "affinitynet: IRN instance pseudo labels",
                  scores: bool = True) -> dict[str, Any]:
    """A COCO-style instance document: ``images`` (id, file name, height, width),
    ``categories`` (the object classes, ids 1..K as in the class masks) and ``annotations``, one
    per instance with its RLE mask, area, box (x, y, w, h) and, with ``scores``, its score.
    ``images`` gives (sample id, file name, (H, W), instances) per image; image ids are 1.. in
    that order."""
    document: dict[str, Any] = {
        "info": {"description": description},
        "categories": [{"id": k, "name": name} for k, name in enumerate(class_names) if k > 0],
        "images": [], "annotations": []}
    for image_id, (sample_id, file_name, (height, width), instances) in enumerate(images, start=1):
        document["images"].append({"id": image_id, "file_name": file_name, "height": int(height),
                                   "width": int(width), "sample_id": sample_id})
        for inst in instances:
            encoded = rle(inst.mask)
            compressed = {"size": encoded["size"], "counts": encoded["counts"].encode("ascii")}
            document["annotations"].append({
                "id": len(document["annotations"]) + 1, "image_id": image_id, "category_id": inst.label,
                "segmentation": encoded, "area": int(coco_mask.area(compressed)),
                "bbox": [float(v) for v in coco_mask.toBbox(compressed)], **({"score": inst.score} if scores else {}),
                "iscrowd": 0})
    return document
