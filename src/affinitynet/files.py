"""File input and output shared by every stage.

Every file a stage writes goes through :func:`atomic_write` so that a killed run never leaves a
half-written file that a later stage would read; every image a stage reads goes through
:func:`load_image` so that bad input fails with one line naming the file and the problem.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from .errors import InputError

# The one label value that no loss and no score counts, in every label map: ground truth marks
# object borders with it, the confident regions of 3.2.1 their neutral region, random crops their
# padding. Label PNGs draw it white (Fig. 4a).
IGNORE_INDEX = 255

# The files a run directory holds beside its stages' outputs (the pipeline writes them; a dataset
# scan skips a folder that holds one): the resolved config, the dataset record, and each stage
# directory's record of its hash, inputs and completion.
CONFIG_FILE = "config.yaml"
DATASET_FILE = "_dataset.json"
STAGE_MARKER = "_stage.json"

# Largest image accepted, in pixels. Pillow's own bomb guard warns at 89 Mpx and raises at twice
# that; a WSSS dataset never needs more than this, and refusing earlier keeps memory bounded.
MAX_IMAGE_PIXELS = 64_000_000


def plural(count: int, noun: str) -> str:
    """``1 problem``, ``2 problems``, ``0 images``, ``3 classes``."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {noun}es" if noun.endswith(("s", "x", "ch", "sh")) else f"{count} {noun}s"


def voc_palette(num_entries: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), shape (num_entries, 3), uint8."""
    palette = np.zeros((num_entries, 3), dtype=np.uint8)
    for index in range(num_entries):
        value, red, green, blue = index, 0, 0, 0
        for shift in range(7, -1, -1):
            red |= ((value >> 0) & 1) << shift
            green |= ((value >> 1) & 1) << shift
            blue |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[index] = (red, green, blue)
    return palette


VOC_PALETTE = voc_palette()
# Index 255 ("ignore"/neutral) is drawn white, as Fig. 4a of the paper draws neutral regions.
_PNG_PALETTE = VOC_PALETTE.copy()
_PNG_PALETTE[255] = (255, 255, 255)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process's umask (reading it means setting it; the lock keeps threads from seeing 0)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file next to ``path``; rename it over ``path`` only after a clean close.

    A crash, a kill or a full disk leaves either the old file or no file, never a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600 whatever the umask; the output is meant to be read by others
        # (masks served, reports shared), so it gets the mode open() would have given it.
        os.chmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        if isinstance(error, OSError) and error.filename is None:
            error.filename = str(path)   # a full disk raises from write() with no file named
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_json_object(path: Path, text: str, expected: str) -> dict[str, Any]:
    """A user's JSON file (its ``text``) that must hold one object: one line naming the file when
    it is not JSON (where) or not an object (``expected`` says what it should be)."""
    try:
        tree = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(path, f"not valid JSON (line {error.lineno} column {error.colno}: {error.msg})") from None
    if not isinstance(tree, dict):
        raise InputError(path, expected)
    return tree


def save_label_png(path: str | os.PathLike, label: np.ndarray) -> None:
    """Write an index map (uint8, 255 = ignore/neutral) as a VOC-palette PNG, atomically."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"{path}: label map must be 2-D, got shape {label.shape}")
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(_PNG_PALETTE.flatten().tolist())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def save_rgb_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    write_bytes(path, buffer.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise InputError(path, "file not found") from None
    except Exception as error:  # zipfile/ValueError/OSError: all mean a damaged file
        raise InputError(path, f"not a readable .npz array file ({error.__class__.__name__})") from None


def _open_checked(path: Path) -> Image.Image:
    if not path.exists():
        raise InputError(path, "file not found")
    if path.is_dir():
        raise InputError(path, "is a directory, not an image")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise InputError(path, f"image too large ({error})") from None
    except Exception:
        raise InputError(path, "not a readable image") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(path, f"image too large ({width}x{height} > {MAX_IMAGE_PIXELS} pixels)")
    return image


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image as RGB uint8 (H, W, 3).

    Grayscale, palette, CMYK, RGBA (alpha dropped), and 16-bit images are converted to 8-bit RGB;
    anything unreadable raises :class:`InputError` with one line naming the file.
    """
    path = Path(path)
    image = _open_checked(path)
    try:
        image.load()
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: rescale to 8 bits instead of clipping, so the picture is not white.
            array = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if array.max() > 255 else 255.0
            array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
            return np.repeat(array[:, :, None], 3, axis=2)
        if image.mode == "RGB":
            rgb = image
        elif image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgb = image.convert("RGBA").convert("RGB")
        else:
            rgb = image.convert("RGB")
        array = np.array(rgb, dtype=np.uint8)  # a writable copy: pydensecrf refuses read-only buffers
    except InputError:
        raise
    except Exception as error:
        message = str(error).splitlines()[0] if str(error) else error.__class__.__name__
        raise InputError(path, f"truncated or damaged image ({message})") from None
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise InputError(path, f"unexpected image shape {array.shape}")
    return np.ascontiguousarray(array)


def load_label_png(path: str | os.PathLike) -> np.ndarray:
    """Read an index (palette or grey) PNG as uint8 (H, W) without colour conversion."""
    path = Path(path)
    image = _open_checked(path)
    try:
        image.load()
        if image.mode not in ("P", "L"):
            raise InputError(path, f"label image must be a palette or 8-bit grey PNG, got mode {image.mode}")
        return np.asarray(image, dtype=np.uint8).copy()
    except InputError:
        raise
    except Exception:
        raise InputError(path, "truncated or damaged label image") from None


def load_rgb_raw(path: str | os.PathLike) -> np.ndarray:
    """Read a colour-coded label image (e.g. MSRC ``_GT.bmp``) as uint8 (H, W, 3) exactly."""
    path = Path(path)
    image = _open_checked(path)
    try:
        image.load()
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except Exception:
        raise InputError(path, "truncated or damaged image") from None
