"""``affinitynet predict``: masks and overlays of image files from a trained segmentation
``model.pt`` alone (its meta says how to build and normalise; no config, no dataset), or from
its ONNX export run by onnxruntime (``onnx_model``), through the same multi-scale code."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .engine.precision import for_inference
from .engine.training import resolve_device
from .errors import InputError
from .files import VOC_PALETTE, load_image, save_label_png, save_rgb_png
from .models.networks import model_from_checkpoint
from .models.onnx_model import is_onnx_path, load_onnx_model
from .models.segmentation import Forward, predict_labels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
OVERLAY_ALPHA = 0.5


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with every non-background pixel blended with its class's VOC colour."""

    colours = VOC_PALETTE[labels].astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + colours * alpha
    # Background stays untouched so the scene remains readable around the objects.
    out = np.where((labels == 0)[..., None], image.astype(np.float32), blended)
    return (out + 0.5).astype(np.uint8)


def legend_image(class_names: Sequence[str], row: int = 18, width: int = 220) -> np.ndarray:
    """A swatch and name per class in the VOC palette, for reading the masks and overlays."""
    canvas = Image.new("RGB", (width, row * len(class_names) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, name in enumerate(class_names):
        top = 2 + index * row
        draw.rectangle([4, top + 2, 4 + row, top + row - 2], fill=tuple(int(v) for v in VOC_PALETTE[index]),
                       outline=(0, 0, 0))
        draw.text((row + 12, top + 3), f"{index:3d} {name}", fill=(0, 0, 0))
    return np.asarray(canvas)


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Files named directly (whatever their extension) and image files under folders, recursively
    and sorted; plus one line per input that does not exist."""
    files: list[Path] = []
    missing: list[str] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")))
        elif path.exists():
            files.append(path)
        else:
            missing.append(f"{path}: file not found")
    seen: set[Path] = set()
    unique = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, missing


def _output_stems(files: Sequence[Path]) -> list[str]:
    """``<stem>`` per file; a stem already taken (a.jpg next to a.png, or one name in two
    folders) gets its extension and then a counter, so no mask overwrites another."""
    taken: set[str] = set()
    stems = []
    for path in files:
        stem = path.stem
        if stem in taken:
            stem = f"{path.stem}_{path.suffix.lstrip('.').lower()}" if path.suffix else path.stem
            counter = 2
            base = stem
            while stem in taken:
                stem = f"{base}_{counter}"
                counter += 1
        taken.add(stem)
        stems.append(stem)
    return stems


def load_model(checkpoint: str | os.PathLike, device: str = "auto") -> tuple[Forward, dict]:
    """(network, meta) of a ``train_seg/model.pt`` (PyTorch, on ``device``) or of its export by
    ``affinitynet export`` (a ``.onnx`` file, run by onnxruntime); ``predict_labels`` runs either
    alike. An unusable file raises one line naming it."""
    if is_onnx_path(checkpoint):
        return load_onnx_model(checkpoint, device)
    device = resolve_device(device)
    model, meta = model_from_checkpoint(checkpoint, device)
    return for_inference(model, device), meta


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  scales: Sequence[float] = (1.0,), flip: bool = True, crf: bool = False,
                  device: str = "auto", strict: bool = False) -> int:
    """Segment image files and folders with a trained ``train_seg/model.pt`` or its ``.onnx``
    export alone (no config, no dataset): ``<out>/<stem>.png`` (VOC-palette index mask),
    ``<out>/<stem>_overlay.png`` and ``<out>/legend.png``.

    Bad images are skipped with one line naming the file and counted; with ``strict`` the first
    one stops the run. Returns 0 if at least one image was segmented and (not ``strict`` or none
    was skipped), else 2. An unusable checkpoint raises :class:`TrainingError`, an unusable
    ``.onnx`` file :class:`InputError`, missing onnxruntime :class:`DependencyError` (one line; the
    CLI prints it and exits with 2). ``crf`` uses the default dense-CRF parameters (5.1).
    """
    model, meta = load_model(checkpoint, device)
    files, missing = find_images(inputs)
    out = Path(out_dir)
    skipped: list[str] = []
    done = 0

    def skip(line: str) -> None:
        skipped.append(line)
        print(f"skipped: {line}", file=sys.stderr)

    for line in missing:
        skip(line)
    if strict and skipped:
        print("predict: stopped at the first bad input (--strict); 0 images segmented", file=sys.stderr)
        return 2
    if not files:
        print("predict: no image files found in the inputs", file=sys.stderr)
        return 2
    save_rgb_png(out / "legend.png", legend_image(meta["class_names"]))
    for path, stem in zip(files, _output_stems(files)):
        try:
            image = load_image(path)
        except InputError as error:
            skip(str(error))
            if strict:
                print(f"predict: stopped at the first bad input (--strict); {done} images segmented",
                      file=sys.stderr)
                return 2
            continue
        labels = predict_labels(model, image, meta["mean"], meta["std"], scales, flip, {} if crf else None)
        save_label_png(out / f"{stem}.png", labels)
        save_rgb_png(out / f"{stem}_overlay.png", overlay(image, labels))
        done += 1
    print(f"predict: {done} images segmented into {out}, {len(skipped)} skipped")
    if done == 0 or (strict and skipped):
        return 2
    return 0
