"""MSRC-21 (MSRC object class recognition database v2) in its native layout.

``dataset.root`` is the ``MSRC_ObjCategImageDatabase_v2`` directory (or a directory holding it)::

    Images/<id>.bmp          photos
    GroundTruth/<id>_GT.bmp  pixel labels as an RGB colour code (24 exact colours)

Split lists (``train``, ``val``, ``test``; ``trainval`` = train + val unless a trainval list
exists), first found of: ``<root>/<split>.txt``, ``<root>/../msrc21-<split>.txt``, and the lists
shipped in ``affinitynet/data/``.

Protocols:

- ``object`` (default, the project's benchmark): PASCAL-VOC-like. Background (0) is the stuff
  classes building, grass, tree, sky, water, road, mountain; 14 object classes follow; ``person``
  joins face and body; void and horse (3 images) are ignored (255). AffinityNet needs a background
  class (Eq. 2 of the paper), which MSRC lacks; its stuff is what VOC calls background.
- ``standard21`` (Shotton et al.): 21 classes in the usual order, void, horse and mountain ignored,
  and **no background class**. Index 0 is ``building``, an ordinary class, so such a dataset has
  ``has_background = False``, its image-level labels range over 0..20 and ``multi_hot`` has 21
  entries. It serves evaluation (scoring 21-class predictions); the AffinityNet stages need a
  background class and must refuse a dataset without one.

Image-level labels are the classes present in the ground truth (any pixel). A ground-truth colour
outside the code is an error for that image (InputError naming the file).
"""
from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

from ...errors import InputError
from ...files import load_rgb_raw
from .base import IGNORE_INDEX, Sample, SegmentationDataset, register_dataset
from .folder import image_size, listed_ids, relative_inside

DIRECTORY = "MSRC_ObjCategImageDatabase_v2"
TARBALL = "msrc21-trainval.tar.xz"

# The colour code of the ground truth (ClickMe.html of the dataset).
COLOUR_CODE: dict[tuple[int, int, int], str] = {
    (0, 0, 0): "void", (128, 0, 0): "building", (0, 128, 0): "grass", (128, 128, 0): "tree",
    (0, 0, 128): "cow", (128, 0, 128): "horse", (0, 128, 128): "sheep", (128, 128, 128): "sky",
    (64, 0, 0): "mountain", (192, 0, 0): "aeroplane", (64, 128, 0): "water", (192, 128, 0): "face",
    (64, 0, 128): "car", (192, 0, 128): "bicycle", (64, 128, 128): "flower", (192, 128, 128): "sign",
    (0, 64, 0): "bird", (128, 64, 0): "book", (0, 192, 0): "chair", (128, 64, 128): "road",
    (0, 192, 128): "cat", (128, 192, 128): "dog", (64, 64, 0): "body", (192, 64, 0): "boat",
}

OBJECT_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "book", "car", "cat", "chair",
                  "cow", "dog", "flower", "person", "sheep", "sign")
OBJECT_BACKGROUND = ("building", "grass", "tree", "sky", "water", "road", "mountain")
OBJECT_IGNORED = ("void", "horse")
STANDARD21_CLASSES = ("building", "grass", "tree", "cow", "sheep", "sky", "aeroplane", "water", "face", "car",
                      "bicycle", "flower", "sign", "bird", "book", "chair", "road", "cat", "dog", "body", "boat")
STANDARD21_IGNORED = ("void", "horse", "mountain")
SPLITS = ("train", "val", "test", "trainval")


def _class_of_colour(protocol: str) -> dict[str, int]:
    mapping: dict[str, int] = {}
    if protocol == "object":
        mapping.update({name: 0 for name in OBJECT_BACKGROUND})
        mapping.update({name: IGNORE_INDEX for name in OBJECT_IGNORED})
        mapping.update({name: OBJECT_CLASSES.index(name) for name in OBJECT_CLASSES[1:] if name != "person"})
        mapping["face"] = mapping["body"] = OBJECT_CLASSES.index("person")
    elif protocol == "standard21":
        mapping.update({name: IGNORE_INDEX for name in STANDARD21_IGNORED})
        mapping.update({name: index for index, name in enumerate(STANDARD21_CLASSES)})
    else:
        raise ValueError(f"unknown MSRC-21 protocol '{protocol}' (object or standard21)")
    return mapping


def _code_table(protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """A 64-entry lookup from (r >> 6, g >> 6, b >> 6) to class index, and which entries are codes.

    Every channel of every code colour is a multiple of 64, so 2 bits per channel identify it; a
    pixel with other low bits is not a code colour. This is far faster than matching 24-bit keys.
    """
    mapping = _class_of_colour(protocol)
    table = np.zeros(64, dtype=np.uint8)
    known = np.zeros(64, dtype=bool)
    for (r, g, b), name in COLOUR_CODE.items():
        key = (r >> 6) * 16 + (g >> 6) * 4 + (b >> 6)
        table[key], known[key] = mapping[name], True
    return table, known


_TABLES = {protocol: _code_table(protocol) for protocol in ("object", "standard21")}


def decode_ground_truth(path: str | os.PathLike, protocol: str = "object") -> np.ndarray:
    """A ``_GT.bmp`` colour image as a uint8 index mask (255 = ignore) under ``protocol``."""
    if protocol not in _TABLES:
        raise ValueError(f"unknown MSRC-21 protocol '{protocol}' (object or standard21)")
    rgb = load_rgb_raw(path)
    table, known = _TABLES[protocol]
    quarter = rgb >> 6
    key = quarter[..., 0] * np.uint8(16) + quarter[..., 1] * np.uint8(4) + quarter[..., 2]
    unknown = ~np.take(known, key)
    if (rgb & 63).any():        # a whole-array test first: the per-pixel one is far slower
        unknown |= (rgb & 63).any(axis=2)
    if unknown.any():
        r, g, b = (int(v) for v in rgb[unknown][0])
        raise InputError(path, f"colour ({r},{g},{b}) at {int(unknown.sum())} pixels is not in the "
                               f"MSRC-21 colour code")
    return np.take(table, key)


def resolve_root(root: str | os.PathLike) -> Path:
    """The ``MSRC_ObjCategImageDatabase_v2`` directory: ``root`` itself or the one inside it."""
    root = Path(root).expanduser()
    if (root / "Images").is_dir():
        return root
    if (root / DIRECTORY / "Images").is_dir():
        return root / DIRECTORY
    raise InputError(root, f"not an MSRC-21 directory (no Images/ in it or in {DIRECTORY}/)")


def split_list(root: Path, split: str) -> Path | None:
    shipped = Path(str(resources.files("affinitynet") / "data" / f"msrc21-{split}.txt"))
    for candidate in (root / f"{split}.txt", root.parent / f"msrc21-{split}.txt", shipped):
        if candidate.is_file():
            return candidate
    return None


class MSRC21Dataset(SegmentationDataset):
    protocol: str = "object"
    has_background: bool = True

    @property
    def num_object_classes(self) -> int:
        return self.num_classes - 1 if self.has_background else self.num_classes

    def multi_hot(self, sample: Sample) -> np.ndarray:
        if self.has_background:
            return super().multi_hot(sample)
        target = np.zeros(self.num_classes, dtype=np.float32)
        target[list(sample.labels)] = 1.0
        return target

    def load_mask(self, sample: Sample) -> np.ndarray | None:
        if sample.mask_path is None:
            return None
        mask = decode_ground_truth(sample.mask_path, self.protocol)
        return self.check_mask(sample, mask, image_size(sample.image_path))


def _image_id(text: str) -> str:
    """The image id on a list line; ValueError if it is a path rather than a plain id."""
    sample_id = relative_inside(text)
    if "/" in sample_id:
        raise ValueError(f"'{text}' is not an image id")
    return sample_id


def build_msrc21(root: str | os.PathLike, split: str, protocol: str = "object") -> MSRC21Dataset:
    root = resolve_root(root)
    if protocol not in ("object", "standard21"):
        raise InputError(root, f"unknown MSRC-21 protocol '{protocol}' (object or standard21)")
    names = list(OBJECT_CLASSES if protocol == "object" else STANDARD21_CLASSES)
    dataset = MSRC21Dataset(name="msrc21", root=root, split=split, class_names=names)
    dataset.protocol = protocol
    dataset.has_background = protocol == "object"

    lists = [split_list(root, split)]
    if lists[0] is None and split == "trainval":
        lists = [split_list(root, "train"), split_list(root, "val")]
    if any(path is None for path in lists):
        raise InputError(root / f"{split}.txt", f"no MSRC-21 list for split '{split}' (known: {', '.join(SPLITS)})")

    seen: set[str] = set()
    for list_path in lists:
        for where, sample_id in listed_ids(list_path, _image_id, dataset.skipped, seen):
            image_path = root / "Images" / f"{sample_id}.bmp"
            gt_path = root / "GroundTruth" / f"{sample_id}_GT.bmp"
            if not image_path.is_file():
                dataset.skipped.append(str(InputError(image_path, f"image file not found ({where})")))
                continue
            if not gt_path.is_file():
                dataset.skipped.append(str(InputError(gt_path, f"ground truth not found ({where}); "
                                                               f"image-level labels come from it")))
                continue
            try:
                mask = decode_ground_truth(gt_path, protocol)
            except InputError as error:
                dataset.skipped.append(str(error))
                continue
            present = np.unique(mask)
            present = present[present != IGNORE_INDEX]
            if dataset.has_background:
                present = present[present != 0]
            dataset.samples.append(Sample(sample_id, image_path, tuple(int(c) for c in present), gt_path))
    return dataset


# ----------------------------------------------------------------------------------------------
# The shared copy of the data, for tests and benchmarks
# ----------------------------------------------------------------------------------------------

def _tarball_candidates() -> list[Path]:
    candidates = []
    if os.environ.get("AFFINITYNET_MSRC21_TAR"):
        candidates.append(Path(os.environ["AFFINITYNET_MSRC21_TAR"]).expanduser())
    # An editable install: src/affinitynet/datasets/msrc21.py -> the checkout is parents[3].
    repo_root = Path(__file__).resolve().parents[3]
    candidates.append(repo_root.parent / "shared" / "datasets" / TARBALL)
    candidates.append(Path.cwd().parent / "shared" / "datasets" / TARBALL)
    return candidates


def find_msrc21_tarball() -> Path | None:
    """The shared ``msrc21-trainval.tar.xz``: ``$AFFINITYNET_MSRC21_TAR``, else
    ``../shared/datasets/`` next to the checkout (or next to the working directory)."""
    return next((path for path in _tarball_candidates() if path.is_file()), None)


def default_data_dir() -> Path:
    return Path(os.environ.get("AFFINITYNET_DATA") or Path.home() / ".cache" / "affinitynet")


def ensure_msrc21(dest_dir: str | os.PathLike | None = None) -> Path:
    """The ``MSRC_ObjCategImageDatabase_v2`` directory under ``dest_dir``, unpacking the shared
    tarball there first if needed. Raises FileNotFoundError when neither data nor tarball exist.

    The tarball is unpacked into a temporary directory beside the target and renamed into place,
    so the target exists only complete (a killed unpack, or two at once, cannot leave half a copy).
    Never unpack it inside the repository: the licence forbids committing the data.
    """
    dest = Path(dest_dir).expanduser() if dest_dir else default_data_dir()
    target = dest / DIRECTORY
    if (target / "Images").is_dir() and (target / "GroundTruth").is_dir():
        return target
    tarball = find_msrc21_tarball()
    if tarball is None:
        places = ", ".join(str(path) for path in _tarball_candidates())
        raise FileNotFoundError(f"MSRC-21 not in {dest} and no {TARBALL} found (looked at: {places}; "
                                f"set AFFINITYNET_MSRC21_TAR)")
    dest.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".msrc21-unpack-", dir=dest))
    try:
        with tarfile.open(tarball, "r:*") as archive:
            archive.extractall(scratch, filter="data")
        unpacked = scratch / DIRECTORY
        if not (unpacked / "Images").is_dir():
            raise InputError(tarball, f"does not contain {DIRECTORY}/Images")
        try:
            os.rename(unpacked, target)
        except OSError:
            if not (target / "Images").is_dir():   # not a concurrent unpack that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@register_dataset("msrc21", description="MSRC-21 v2, native layout; object protocol (14 + background) or standard21 "
                                        "(eval only)", keys={"protocol": "object"})
def from_config(section, split: str, progress: bool = True) -> MSRC21Dataset:
    return build_msrc21(section["root"], split, protocol=section["protocol"])
