"""Fully connected CRF ("dCRF", Krähenbühl & Koltun 2011) used twice in the paper: to refine the
low/high-alpha CAM score stacks before reading off confident regions (Section 3.2.1), and to refine
the upsampled, random-walk-revised CAMs into segmentation labels (Section 3.4).

The default parameters are those of the authors' released code (the paper does not list them):
Gaussian kernel sxy 3, compat 3; bilateral kernel sxy 80, srgb 13, compat 10; 10 mean-field
iterations. They live in the ``crf`` section of the configuration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

import numpy as np

# Scores are clipped before -log so that a zero score (an absent class, a fully confident CAM)
# gives a large but finite unary energy; 1e-5 keeps the energy (~11.5) in the same range as the
# pairwise terms instead of letting one pixel's zero dominate every message it receives.
_MIN_PROB = 1e-5


@dataclass(frozen=True)
class CRFParams:
    """Dense CRF kernel parameters; field names are the keys of the config's ``crf`` section."""

    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 10

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "CRFParams":
        """Build from a config ``crf`` section; missing keys keep their defaults, unknown keys
        raise ``KeyError`` naming them (a typo must not silently fall back to a default)."""
        if section is None:
            return cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise KeyError(f"unknown crf parameter(s): {', '.join(unknown)} "
                           f"(allowed: {', '.join(sorted(known))})")
        values = dict(section)
        if "iterations" in values:
            values["iterations"] = int(values["iterations"])
        return cls(**values)

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


def dense_crf(image_rgb_uint8: np.ndarray, probs: np.ndarray, *, gaussian_sxy: float = 3.0,
              gaussian_compat: float = 3.0, bilateral_sxy: float = 80.0,
              bilateral_srgb: float = 13.0, bilateral_compat: float = 10.0,
              iterations: int = 10) -> np.ndarray:
    """Refine per-class scores ``probs`` (C, H, W) on an RGB image (H, W, 3) uint8 with a dense CRF.

    The unary energy is ``-log(probs)`` (clipped at 1e-5). ``probs`` need not sum to one per pixel:
    the CAM stacks of Eq. 2 do not, and mean-field inference is invariant to adding a per-pixel
    constant to every label's unary, which is all a per-pixel normalisation would change.

    Returns the approximate marginals Q as float32 (C, H, W); each pixel's column sums to one.
    With ``iterations == 0`` this is the softmax of the unaries, i.e. the normalised input.
    """
    image = np.asarray(image_rgb_uint8)
    scores = np.asarray(probs)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {image.shape}")
    if scores.ndim != 3 or scores.shape[1:] != image.shape[:2]:
        raise ValueError(f"probs must be (C, H, W) with (H, W) = {image.shape[:2]}, got {scores.shape}")
    if image.dtype != np.uint8:
        # The bilateral kernel's srgb is in 0..255 units; silently casting floats in 0..1 would
        # make every pixel the same colour.
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}")
    num_labels, height, width = scores.shape
    if num_labels == 1:
        # A single label has nothing to compete with: its marginal is 1 everywhere.
        return np.ones_like(scores, dtype=np.float32)

    # Imported here so that the rest of the package stays importable where the compiled
    # extension is missing (the CRF is optional for some stages).
    from pydensecrf import densecrf

    crf = densecrf.DenseCRF2D(width, height, num_labels)
    unary = -np.log(np.clip(scores.astype(np.float32, copy=False), _MIN_PROB, None))
    # The C++ side reads raw memory: the arrays must be C-contiguous and of the exact dtype.
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(num_labels, -1), dtype=np.float32))
    crf.addPairwiseGaussian(sxy=float(gaussian_sxy), compat=float(gaussian_compat))
    crf.addPairwiseBilateral(sxy=float(bilateral_sxy), srgb=float(bilateral_srgb),
                             rgbim=np.ascontiguousarray(image), compat=float(bilateral_compat))
    q = crf.inference(int(iterations))
    return np.asarray(q, dtype=np.float32).reshape(num_labels, height, width)


def dense_crf_with(image_rgb_uint8: np.ndarray, probs: np.ndarray,
                   params: CRFParams | Mapping[str, Any] | None = None) -> np.ndarray:
    """:func:`dense_crf` with parameters from a :class:`CRFParams` or a config ``crf`` section."""
    if not isinstance(params, CRFParams):
        params = CRFParams.from_config(params)
    return dense_crf(image_rgb_uint8, probs, **params.as_kwargs())
