"""Training-time augmentation shared by the three networks (paper 5.1): random rescale, horizontal
flip, colour jitter, random crop; the same geometric transform is applied to a label map.

Randomness comes from a ``numpy.random.Generator`` passed in by the caller, seeded per
(seed, epoch, image), so that a resumed training sees exactly the samples an uninterrupted one
would have seen.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv
from PIL import Image

from ..files import IGNORE_INDEX


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    height, width = size_hw
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def resize_label(label: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    height, width = size_hw
    return np.asarray(Image.fromarray(label).resize((width, height), Image.NEAREST))


def random_resize_long(image: np.ndarray, label: np.ndarray | None, low: int, high: int,
                       rng: np.random.Generator):
    """Rescale so the long side is uniform in [low, high] (the released code's CAM augmentation)."""
    target = int(rng.integers(low, high + 1))
    height, width = image.shape[:2]
    scale = target / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return resize_image(image, size), (None if label is None else resize_label(label, size))


def random_scale(image: np.ndarray, label: np.ndarray | None, scale_range: Sequence[float],
                 rng: np.random.Generator):
    scale = float(rng.uniform(scale_range[0], scale_range[1]))
    height, width = image.shape[:2]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return resize_image(image, size), (None if label is None else resize_label(label, size))


def random_flip(image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
    if rng.random() < 0.5:
        image = image[:, ::-1]
        label = None if label is None else label[:, ::-1]
    return np.ascontiguousarray(image), (None if label is None else np.ascontiguousarray(label))


def color_jitter(image: np.ndarray, jitter: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast, saturation (factors in [1-j, 1+j]) and hue (shift in [-j, j]),
    applied in a random order, as colour jittering of Krizhevsky et al. [16] is usually done."""
    brightness, contrast, saturation, hue = jitter
    pixels = image.astype(np.float32) / 255.0
    for operation in rng.permutation(4):
        if operation == 0 and brightness > 0:
            pixels = pixels * rng.uniform(1 - brightness, 1 + brightness)
        elif operation == 1 and contrast > 0:
            grey_mean = (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean()
            pixels = (pixels - grey_mean) * rng.uniform(1 - contrast, 1 + contrast) + grey_mean
        elif operation == 2 and saturation > 0:
            grey = (pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
            pixels = (pixels - grey) * rng.uniform(1 - saturation, 1 + saturation) + grey
        elif operation == 3 and hue > 0:
            hsv = rgb_to_hsv(np.clip(pixels, 0, 1))
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue)) % 1.0
            pixels = hsv_to_rgb(hsv)
        pixels = np.clip(pixels, 0, 1)
    return (pixels * 255.0 + 0.5).astype(np.uint8)


def random_crop(image: np.ndarray, label: np.ndarray | None, crop: int, rng: np.random.Generator,
                fill: Sequence[int] = (0, 0, 0)):
    """Crop ``crop`` x ``crop``, padding smaller images with ``fill`` (the normalisation mean, so
    padding is zero after normalisation). Returns image, label (padding 255) and a validity mask."""
    height, width = image.shape[:2]
    out_image = np.empty((crop, crop, 3), dtype=image.dtype)
    out_image[:] = np.asarray(fill, dtype=image.dtype)
    out_label = None if label is None else np.full((crop, crop), IGNORE_INDEX, dtype=np.uint8)
    valid = np.zeros((crop, crop), dtype=bool)
    # Offsets of the window in the image (positive) or of the image in the window (negative).
    top = int(rng.integers(0, height - crop + 1)) if height > crop else -int(rng.integers(0, crop - height + 1))
    left = int(rng.integers(0, width - crop + 1)) if width > crop else -int(rng.integers(0, crop - width + 1))
    src_top, dst_top = max(top, 0), max(-top, 0)
    src_left, dst_left = max(left, 0), max(-left, 0)
    rows = min(crop - dst_top, height - src_top)
    cols = min(crop - dst_left, width - src_left)
    out_image[dst_top:dst_top + rows, dst_left:dst_left + cols] = image[src_top:src_top + rows, src_left:src_left + cols]
    if label is not None:
        out_label[dst_top:dst_top + rows, dst_left:dst_left + cols] = label[src_top:src_top + rows, src_left:src_left + cols]
    valid[dst_top:dst_top + rows, dst_left:dst_left + cols] = True
    return out_image, out_label, valid


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 tensor (3, H, W) normalised as the backbone's weights expect."""
    tensor = torch.from_numpy(np.require(image, requirements=['C', 'W'])).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    return tuple(int(round(m * 255)) for m in mean)
