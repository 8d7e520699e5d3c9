"""What every part of the report shares: formatting, resizing, figures, the stages and their logs."""
from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from ..files import IGNORE_INDEX, VOC_PALETTE, read_json
from ..pipeline import stages

# Longest side of a gallery picture in pixels: enough for a sharp 160 px cell on a dense screen,
# small enough that a VOC-sized gallery stays a few MB.
THUMB_SIZE = 256
NEUTRAL_RGB = (255, 255, 255)   # neutral / ignore pixels are drawn white, as in Fig. 4a
# Log columns that are not curves worth a panel: the x axis, wall time, and pair counts.
_NOT_CURVES = ("epoch", "seconds")



# ----------------------------------------------------------------------------------------------
# Small helpers

def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    """A finite float, or None for missing / NaN / non-numbers (drawn as '-')."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt1(value: Any) -> str:
    number = _number(value)
    return "-" if number is None else f"{number:.1f}"


def _fmt_seconds(value: Any) -> str:
    seconds = _number(value)
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _fmt_scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _read_json_or_none(path: Path, notes: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as error:
        notes.append(f"{path}: unreadable ({error.__class__.__name__}); left out")
        return None


def _colour_labels(label: np.ndarray) -> np.ndarray:
    rgb = VOC_PALETTE[label]
    rgb[label == IGNORE_INDEX] = NEUTRAL_RGB
    return rgb


def _thumb_size(height: int, width: int) -> tuple[int, int]:
    """(width, height) of the gallery picture of an (height, width) map."""
    scale = min(1.0, THUMB_SIZE / max(height, width, 1))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int], nearest: bool) -> np.ndarray:
    if (rgb.shape[1], rgb.shape[0]) == size:
        return rgb
    resample = Image.NEAREST if nearest else Image.BILINEAR
    return np.asarray(Image.fromarray(rgb).resize(size, resample))


def _resize_float(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (values.shape[1], values.shape[0]) == size:
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _new_figure(width: float, height: float):
    # The Figure API (not pyplot) draws with Agg and leaves the process-wide backend alone.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _stage_order() -> list[str]:
    return [spec.name for spec in stages()]


def _training_stages() -> list[str]:
    """The stages that train a network: those with a training log."""

    return [spec.name for spec in stages() if "log" in spec.outputs]


def read_log_csv(path: Path) -> dict[str, list[float]]:
    """The numeric columns of a training ``log.csv`` as lists (NaN for empty or non-numeric cells);
    a column with no number at all is left out."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, list[float]] = {}
    for name in (rows[0].keys() if rows else ()):
        if name is None:
            continue
        values = []
        for row in rows:
            number = _number(row.get(name))
            values.append(float("nan") if number is None else number)
        if any(math.isfinite(v) for v in values):
            columns[name] = values
    return columns


def _curve_names(columns: Mapping[str, list[float]]) -> list[str]:
    """Panels in reading order: the loss, its parts, then lr and other metrics; counts are dropped."""
    names = [n for n in columns if n not in _NOT_CURVES and not n.startswith("num_")]
    first = [n for n in ("loss",) if n in names]
    last = [n for n in ("lr",) if n in names]
    return first + [n for n in names if n not in first and n not in last] + last
