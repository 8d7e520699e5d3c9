"""Scores and labels from CAMs: the background of Eq. 2, and labels as the argmax over the
background and an image's present classes (Section 3.2.1, 3.4)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def background_map(cams, alpha: float):
    """M_bg = (1 - max_c M_c)^alpha (Eq. 2) for normalised CAMs (K, H, W), numpy or torch.

    ``max_c M_c`` is clipped to [0, 1] first (a max-normalised CAM can exceed 1 by a rounding
    error, and a negative base with a fractional alpha is NaN); with no object class present
    (K == 0) the background is 1 everywhere.
    """
    if cams.ndim != 3:
        raise ValueError(f"cams must be (K, H, W), got shape {tuple(cams.shape)}")
    if isinstance(cams, torch.Tensor):
        if cams.shape[0] == 0:
            return torch.ones(cams.shape[1:], dtype=cams.dtype if cams.is_floating_point() else torch.float32,
                              device=cams.device)
        return (1.0 - cams.amax(dim=0).clamp(0.0, 1.0)).pow(alpha)
    cams = np.asarray(cams)
    if cams.shape[0] == 0:
        return np.ones(cams.shape[1:], dtype=np.float32)
    return np.power(1.0 - np.clip(cams.max(axis=0), 0.0, 1.0), alpha).astype(np.float32)


def with_background(cams: np.ndarray, alpha: float | None = None, threshold: float | None = None) -> np.ndarray:
    """Stack a background score on the object CAMs: (1 - max)^alpha, or a constant threshold
    (the released code scores CAMs alone with a constant 0.2)."""
    if threshold is not None:
        background = np.full((1,) + cams.shape[1:], threshold, dtype=np.float32)
    else:
        background = background_map(cams, alpha)[None]
    return np.concatenate([background, cams.astype(np.float32)], axis=0)


def labels_from_scores(scores: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """Argmax over [background, present classes] mapped back to dataset class indices."""
    lookup = np.asarray([0] + list(classes), dtype=np.uint8)
    return lookup[np.argmax(scores, axis=0)]
