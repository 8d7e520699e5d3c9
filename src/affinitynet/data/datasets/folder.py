"""A folder of images with image-level tags from a CSV or JSON file: bring your own data.

Layout (``dataset.root``)::

    <root>/<image files, any sub-folders>   jpg, jpeg, png, bmp, gif, tif, tiff, webp
    <root>/masks/<id>.png                   optional ground truth (index PNG, 0 = background,
                                            i = i-th class of the class list, 255 = ignore);
                                            ``dataset.masks_dir`` names another folder
    <root>/<split>.txt                      optional split lists (or <root>/ImageSets/<split>.txt)

Tags (``dataset.labels_file``, a path, or a name inside the root):

- CSV, ``filename_or_id,tags`` with several tags in one cell separated by ``;`` or ``|``, or one tag
  per column (``a.jpg,cat,chair``). An optional header row (first cell ``id``, ``image``,
  ``filename``, ...) may name a ``tags`` column and a ``split`` column; a header of class names with
  0/1 values (one-hot) works too. UTF-8 with or without a BOM, LF or CRLF.
- JSON, ``{"a.jpg": ["cat", "chair"], "b.jpg": []}`` (a ``"cat;chair"`` string also works).

Classes (``dataset.classes_file``): object class names, one per line (a first line ``background``
is dropped, since index 0 is always background). Without it, the sorted set of all tags. Tags match
class names whatever their case and surrounding spaces (``Flower``, `` flower`` and ``FLOWER`` are
one class, spelt as most images spell it).

Decisions: an entry whose tag is not in the class list is skipped and reported (with "did you mean"
when the tag is close to a class name), not trimmed, since a wrong tag is a labelling error that
would silently teach the wrong class. Without a class list, a class that looks like a misspelling of
a more common one is a warning (``dataset.warnings``). Image files under the root that the tags file
does not name are listed in ``dataset.untagged`` (the masks folder, hidden folders and run
directories inside the root are not searched). Duplicate ids keep the
first entry. Empty tag lists are images with no object (background only). Absolute paths and
paths leaving the root are refused. A ``background`` tag is ignored. Ids are the path relative to
the root without its extension, ``/`` replaced by ``__`` (ids name output files).

Splits: with a ``split`` column, rows whose split matches (``trainval`` = train + val; ``all`` =
every row); else with a list file ``<split>.txt``, the ids it names; else every image, whatever the
split is called (so a folder without splits trains and evaluates on the same images).

This module also holds the small helpers the other datasets share (list files, root-relative
paths, mask checks).
"""
from __future__ import annotations

import csv
import difflib
import io
import os
import posixpath
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from ...errors import InputError
from ...files import CONFIG_FILE, DATASET_FILE, STAGE_MARKER, load_label_png, plural, read_json_object
from .base import Sample, SegmentationDataset, register_dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
BACKGROUND = "background"
_HEADER_ID_NAMES = {"id", "image", "image_id", "filename", "file", "file_name", "name", "path", "image_name"}
_HEADER_TAG_NAMES = {"tags", "tag", "labels", "label", "classes", "class"}


# ----------------------------------------------------------------------------------------------
# Helpers shared by the datasets
# ----------------------------------------------------------------------------------------------

def read_text(path: Path) -> str:
    """A UTF-8 text file (BOM stripped); InputError naming it when missing or not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except IsADirectoryError:
        raise InputError(path, "is a directory, not a file") from None
    except OSError as error:
        raise InputError(path, f"cannot read ({error.strerror or error.__class__.__name__})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(path, f"not UTF-8 text (byte {error.start})") from None


def read_list_file(path: Path) -> list[tuple[int, str]]:
    """Non-blank, non-comment lines of a list file as ``(line_number, stripped_text)``."""
    lines = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            lines.append((number, text))
    return lines


def listed_ids(list_path: Path, parse: Callable[[str], str], skipped: list[str],
               seen: set[str]) -> Iterator[tuple[str, str]]:
    """The sample ids of a split list, each once (``seen`` holds those met before): ``(where, id)``
    with ``where`` naming the line, for the messages about its files. A line that ``parse`` refuses
    (ValueError) is one line in ``skipped``."""
    for number, text in read_list_file(list_path):
        try:
            sample_id = parse(text)
        except ValueError as error:
            skipped.append(str(InputError(list_path, f"line {number}: {error}")))
            continue
        if sample_id not in seen:
            seen.add(sample_id)
            yield f"listed at {list_path.name} line {number}", sample_id


def relative_inside(name: str) -> str:
    """``name`` as a normalised relative POSIX path; ValueError if absolute or leaving the root.

    Checked on the text, not on resolved paths, so a root that links its image folder elsewhere
    (a common way to share data) is still accepted.
    """
    text = name.replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":") or os.path.isabs(name):
        raise ValueError(f"absolute path '{name}' refused (paths must be relative to the dataset root)")
    normal = posixpath.normpath(text)
    if normal == ".." or normal.startswith("../"):
        raise ValueError(f"path '{name}' escapes the dataset root")
    if normal in ("", "."):
        raise ValueError(f"empty path '{name}'")
    return normal


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) from the image header without decoding the pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Exception:
        raise InputError(path, "not a readable image") from None
    return height, width


def load_checked_mask(dataset: SegmentationDataset, sample: Sample) -> np.ndarray | None:
    """The sample's index-PNG mask, refused (InputError) if its size or values are wrong."""
    if sample.mask_path is None:
        return None
    mask = load_label_png(sample.mask_path)
    return dataset.check_mask(sample, mask, image_size(sample.image_path))


def find_image(root: Path, name: str, folders: Iterable[str] = ("", "images", "JPEGImages")) -> Path | None:
    """``name`` (with or without an extension) under the root or one of its image folders."""
    has_extension = Path(name).suffix.lower() in IMAGE_EXTENSIONS
    for folder in folders:
        base = root / folder if folder else root
        if has_extension:
            if (base / name).is_file():
                return base / name
        else:
            for extension in IMAGE_EXTENSIONS:
                for candidate in (base / f"{name}{extension}", base / f"{name}{extension.upper()}"):
                    if candidate.is_file():
                        return candidate
    return None


def split_tags(cell: str) -> list[str]:
    """Tags of one cell, separated by ``;`` or ``|``."""
    return [tag.strip() for tag in cell.replace("|", ";").split(";") if tag.strip()]


# ----------------------------------------------------------------------------------------------
# Tag files
# ----------------------------------------------------------------------------------------------

class _Entry:
    __slots__ = ("where", "name", "tags", "split")

    def __init__(self, where: str, name: str, tags: list[str], split: str | None):
        self.where, self.name, self.tags, self.split = where, name, tags, split


def _read_csv(path: Path) -> tuple[list[_Entry], bool]:
    text = read_text(path)
    try:
        rows = [(number, row) for number, row in enumerate(csv.reader(io.StringIO(text)), start=1)]
    except csv.Error as error:
        raise InputError(path, f"not a valid CSV file ({error})") from None
    rows = [(n, [cell.strip() for cell in row]) for n, row in rows if any(cell.strip() for cell in row)]
    rows = [(n, row) for n, row in rows if not row[0].startswith("#")]
    if not rows:
        raise InputError(path, "no entries")
    entries: list[_Entry] = []
    has_split = False
    header = rows[0][1]
    if header[0].lower() in _HEADER_ID_NAMES:
        rows = rows[1:]
        lowered = [cell.lower() for cell in header]
        split_col = lowered.index("split") if "split" in lowered else None
        has_split = split_col is not None
        tag_cols = [i for i, cell in enumerate(lowered) if cell in _HEADER_TAG_NAMES]
        other_cols = [i for i in range(1, len(header)) if i != split_col and i not in tag_cols]
        one_hot = (not tag_cols and other_cols and rows and
                   all(row[i] in ("0", "1", "") for _, row in rows for i in other_cols if i < len(row)))
        for number, row in rows:
            cells = row + [""] * (len(header) - len(row))
            if one_hot:
                tags = [header[i] for i in other_cols if cells[i] == "1"]
            else:
                tags = [tag for i in (tag_cols or other_cols) for tag in split_tags(cells[i])]
            split = cells[split_col] if split_col is not None else None
            entries.append(_Entry(f"line {number}", cells[0], tags, split))
    else:
        for number, row in rows:
            tags = [tag for cell in row[1:] for tag in split_tags(cell)]
            entries.append(_Entry(f"line {number}", row[0], tags, None))
    return entries, has_split


def _read_json(path: Path) -> list[_Entry]:
    tree = read_json_object(path, read_text(path), 'must be a JSON object {"image.jpg": ["tag", ...], ...}')
    entries = []
    for name, value in tree.items():
        if isinstance(value, str):
            tags = split_tags(value)
        elif isinstance(value, list) and all(isinstance(tag, str) for tag in value):
            tags = [tag.strip() for tag in value if tag.strip()]
        else:
            tags = None  # reported when the entries are checked
        entries.append(_Entry(f"entry '{name}'", str(name).strip(), tags, None))
    return entries


def read_tag_file(path: Path) -> tuple[list[_Entry], bool]:
    """Entries of a CSV or JSON tag file and whether it had a split column."""
    if path.suffix.lower() == ".json":
        return _read_json(path), False
    return _read_csv(path)


def read_class_file(path: Path) -> list[str]:
    names = [text for _, text in read_list_file(path)]
    if names and _key(names[0]) == BACKGROUND:
        names = names[1:]
    seen: set[str] = set()
    for name in names:
        if _key(name) in seen:
            raise InputError(path, f"class '{name}' listed twice (names match whatever their case)")
        if _key(name) == BACKGROUND:
            raise InputError(path, "'background' may only be the first line (it is always class 0)")
        seen.add(_key(name))
    if not names:
        raise InputError(path, "no class names")
    return names


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------

def _locate(root: Path, name: str | None) -> Path | None:
    """A config path: absolute as given; relative, inside the root first (so a same-named file in
    the working directory cannot shadow the dataset's own), else relative to the working directory.
    A file found in neither place is named as the user wrote it, so the error does not show the
    root twice (``my_photos/my_photos/tags.csv``)."""
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_absolute():
        return path
    if (root / path).exists():
        return root / path
    return path


def _split_ids(root: Path, split: str) -> tuple[Path, list[tuple[int, str]]] | None:
    for candidate in (root / f"{split}.txt", root / "ImageSets" / f"{split}.txt"):
        if candidate.is_file():
            return candidate, read_list_file(candidate)
    return None


class FolderDataset(SegmentationDataset):
    def load_mask(self, sample: Sample) -> np.ndarray | None:
        return load_checked_mask(self, sample)


def build_folder(root: str | os.PathLike, split: str, labels_file: str, classes_file: str | None = None,
                 masks_dir: str | None = None) -> FolderDataset:
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "dataset root is not a directory")
    labels_path = _locate(root, labels_file)
    if labels_path is None:
        raise InputError(root, "the folder dataset needs a labels_file (CSV or JSON of tags)")
    if not labels_path.exists():
        raise InputError(labels_path, f"labels file not found (looked in the working directory and in "
                                      f"dataset.root {root})")
    entries, has_split_column = read_tag_file(labels_path)
    classes_path = _locate(root, classes_file)
    if classes_path is not None and not classes_path.exists():
        raise InputError(classes_path, f"classes file not found (looked in the working directory and in "
                                       f"dataset.root {root})")
    tags_seen = [tag for entry in entries for tag in (entry.tags or []) if _key(tag) != BACKGROUND]
    if classes_path is not None:
        object_classes = read_class_file(classes_path)
    else:
        object_classes = class_names_from_tags(tags_seen)
    # Tags match class names whatever their case and surrounding spaces: 'Flower ' is 'flower'.
    class_index = {_key(name): index for index, name in enumerate(object_classes, start=1)}
    masks_path = _locate(root, masks_dir) if masks_dir else next(
        (root / name for name in ("masks", "SegmentationClass") if (root / name).is_dir()), None)

    dataset = FolderDataset(name="folder", root=root, split=split, class_names=[BACKGROUND, *object_classes])
    wanted: dict[str, tuple[Path, int]] | None = None
    split_list = None if has_split_column else _split_ids(root, split)
    if split_list is not None:
        list_path, lines = split_list
        wanted = {}
        for number, text in lines:
            try:
                key = _id_of(relative_inside(text))
            except ValueError as error:
                dataset.skipped.append(str(InputError(list_path, f"line {number}: {error}")))
                continue
            wanted.setdefault(key, (list_path, number))

    first_seen: dict[str, str] = {}
    for entry in entries:
        def refuse(problem: str) -> None:
            dataset.skipped.append(str(InputError(labels_path, f"{entry.where}: {problem}")))

        if has_split_column and not _split_matches(entry.split, split):
            continue
        if not entry.name:
            refuse("empty image name")
            continue
        try:
            relative = relative_inside(entry.name)
        except ValueError as error:
            refuse(str(error))
            continue
        sample_id = _id_of(relative)
        if wanted is not None and sample_id not in wanted:
            continue
        if sample_id in first_seen:
            refuse(f"duplicate id '{sample_id}' (first at {first_seen[sample_id]}); skipped")
            continue
        first_seen[sample_id] = entry.where
        if entry.tags is None:
            refuse(f"tags of '{entry.name}' must be a list of strings")
            continue
        unknown = [tag for tag in entry.tags if _key(tag) not in class_index and _key(tag) != BACKGROUND]
        if unknown:
            closest = closest_class(unknown[0], object_classes)
            hint = f" (did you mean '{closest}'?)" if closest else ""
            refuse(f"tag '{unknown[0]}' of '{entry.name}' is not in the class list{hint}; image skipped")
            continue
        image_path = find_image(root, relative)
        if image_path is None:
            dataset.skipped.append(str(InputError(root / relative, f"image file not found (named at "
                                                                    f"{labels_path.name} {entry.where})")))
            continue
        labels = tuple(sorted({class_index[_key(tag)] for tag in entry.tags if _key(tag) in class_index}))
        mask_path = None
        if masks_path is not None and (masks_path / f"{sample_id}.png").is_file():
            mask_path = masks_path / f"{sample_id}.png"
        dataset.samples.append(Sample(sample_id, image_path, labels, mask_path))

    if classes_path is None:
        dataset.warnings.extend(likely_typos(tags_seen, object_classes))
    named = {_id_of(relative_inside(entry.name)) for entry in entries if entry.name and _inside(entry.name)}
    dataset.untagged.extend(str(path) for path in _image_files(root, exclude=masks_path)
                            if _id_of(path.relative_to(root).as_posix()) not in named)
    if wanted is not None:
        for sample_id, (list_path, number) in wanted.items():
            if sample_id not in first_seen:
                dataset.skipped.append(str(InputError(list_path, f"line {number}: id '{sample_id}' is not in "
                                                                 f"{labels_path.name}")))
    return dataset


def _key(tag: str) -> str:
    return tag.strip().casefold()


def class_names_from_tags(tags: Iterable[str]) -> list[str]:
    """Object classes from the tags alone: one class per tag up to case and spaces ('Flower' and
    'flower' are one class), spelt as most images spell it, sorted."""
    spellings: dict[str, Counter] = {}
    for tag in tags:
        spellings.setdefault(_key(tag), Counter())[tag.strip()] += 1
    # Ties go to the lower-case spelling ('sign' over 'SIGN' and 'Sign').
    chosen = [min(counter.items(), key=lambda item: (-item[1], item[0] != item[0].lower(), item[0]))[0]
              for counter in spellings.values()]
    return sorted(chosen, key=lambda name: (_key(name), name))


# difflib's ratio 2 * matches / total length: 'flwer' / 'flower' 0.91, 'sign' / 'sing' 0.75,
# 'cat' / 'car' 0.67. 0.8 catches a dropped or doubled letter in a word of five or more letters
# and leaves short, different words alone.
_CLOSE = 0.8


def closest_class(tag: str, class_names: Sequence[str]) -> str | None:
    """The class name a tag is close to (a likely misspelling of it), or None."""
    keys = {_key(name): name for name in class_names}
    match = difflib.get_close_matches(_key(tag), list(keys), n=1, cutoff=_CLOSE)
    return keys[match[0]] if match else None


def likely_typos(tags: Iterable[str], class_names: Sequence[str]) -> list[str]:
    """Classes made from tags alone that look like a misspelling of a more common class."""
    counts = Counter(_key(tag) for tag in tags)
    lines = []
    for name in class_names:
        closest = closest_class(name, [other for other in class_names if counts[_key(other)] > counts[_key(name)]])
        if closest:
            lines.append(f"class '{name}' ({plural(counts[_key(name)], 'image')}) is close to '{closest}' "
                         f"({plural(counts[_key(closest)], 'image')}): did you mean '{closest}'? Fix the tag, or list "
                         f"the classes in dataset.classes_file so that unknown tags are refused")
    return lines


def _inside(name: str) -> bool:
    try:
        relative_inside(name)
    except ValueError:
        return False
    return True


def _image_files(root: Path, exclude: Path | None) -> list[Path]:
    """Image files under the root, leaving out the masks folder, hidden folders and folders that
    hold a run's outputs (a run directory inside the dataset root)."""
    found = []
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        if exclude is not None and here == exclude:
            subfolders[:] = []
            continue
        if here != root and {STAGE_MARKER, DATASET_FILE, CONFIG_FILE} & set(files):
            subfolders[:] = []
            continue
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found += [here / name for name in sorted(files)
                  if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith(".")]
    return found


def _id_of(relative: str) -> str:
    stem = relative
    suffix = posixpath.splitext(relative)[1]
    if suffix.lower() in IMAGE_EXTENSIONS:
        stem = relative[: -len(suffix)]
    return stem.replace("/", "__")


def _split_matches(value: str | None, split: str) -> bool:
    value = (value or "").strip()
    if split == "all":
        return True
    if split == "trainval":
        return value in ("train", "val", "trainval")
    return value == split


@register_dataset("folder", description="your images with tags from a CSV/JSON, an optional class list and optional masks",
                  keys={"labels_file": None, "classes_file": None, "masks_dir": None},
                  required={"labels_file": "a CSV or JSON of tags"})
def from_config(section, split: str, progress: bool = True) -> FolderDataset:
    return build_folder(section["root"], split, section["labels_file"], section["classes_file"], section["masks_dir"])
