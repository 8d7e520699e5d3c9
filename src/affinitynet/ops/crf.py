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
    unary = -np.log(np.clip(scores.astype(np.float32, copy=False), _MIN_PROB, None))
    return _mean_field(image, unary.reshape(num_labels, -1), CRFParams(
        gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat, int(iterations)))


def _mean_field(image: np.ndarray, unary: np.ndarray, params: CRFParams) -> np.ndarray:
    """Q (C, H, W) float32 of the dense CRF with unary energies (C, H * W) on an RGB uint8 image."""
    # Imported here so that the rest of the package stays importable where the compiled
    # extension is missing (the CRF is optional for some stages).
    from pydensecrf import densecrf

    height, width = image.shape[:2]
    num_labels = unary.shape[0]
    crf = densecrf.DenseCRF2D(width, height, num_labels)
    # The C++ side reads raw memory: the arrays must be C-contiguous and of the exact dtype.
    crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    crf.addPairwiseGaussian(sxy=float(params.gaussian_sxy), compat=float(params.gaussian_compat))
    crf.addPairwiseBilateral(sxy=float(params.bilateral_sxy), srgb=float(params.bilateral_srgb),
                             rgbim=np.ascontiguousarray(image), compat=float(params.bilateral_compat))
    q = crf.inference(int(params.iterations))
    return np.asarray(q, dtype=np.float32).reshape(num_labels, height, width)


# irn's dCRF of a label map (its cam_to_ir_label.py, through misc/imutils.crf_inference_label):
# each pixel's label is right with probability 0.7, the others share the rest; Gaussian kernel
# sxy 3, compat 3; bilateral kernel sxy 50, srgb 5, compat 10; 10 iterations on the raw image.
IRN_LABEL_CRF = CRFParams(bilateral_sxy=50.0, bilateral_srgb=5.0)
IRN_GT_PROB = 0.7


def label_unary(labels: np.ndarray, num_labels: int, gt_prob: float) -> np.ndarray:
    """Unary energies (num_labels, H * W) float32 of a label map (H, W) of values 0..num_labels-1:
    -log(gt_prob) at each pixel's label, -log((1 - gt_prob) / (num_labels - 1)) at the others (no
    label means "unsure")."""
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    flat = np.asarray(labels).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_labels):
        raise ValueError(f"labels must be in 0..{num_labels - 1}")
    unary = np.full((num_labels, flat.size), -np.log((1.0 - gt_prob) / (num_labels - 1)), dtype=np.float32)
    unary[flat, np.arange(flat.size)] = -np.log(gt_prob)
    return unary


def dense_crf_labels(image_rgb_uint8: np.ndarray, labels: np.ndarray, num_labels: int,
                     gt_prob: float = IRN_GT_PROB, params: CRFParams = IRN_LABEL_CRF) -> np.ndarray:
    """A label map (H, W) of values 0..num_labels-1 refined by the dense CRF (irn's use: the
    unary of :func:`label_unary`); the argmax of Q, int64 (H, W)."""
    image = np.asarray(image_rgb_uint8)
    labels = np.asarray(labels)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
    if labels.shape != image.shape[:2]:
        raise ValueError(f"labels must be (H, W) = {image.shape[:2]}, got {labels.shape}")
    if num_labels == 1:
        return np.zeros(labels.shape, dtype=np.int64)
    q = _mean_field(image, label_unary(labels, num_labels, gt_prob), params)
    return np.argmax(q, axis=0)


def dense_crf_with(image_rgb_uint8: np.ndarray, probs: np.ndarray,
                   params: CRFParams | Mapping[str, Any] | None = None) -> np.ndarray:
    """:func:`dense_crf` with parameters from a :class:`CRFParams` or a config ``crf`` section."""
    if not isinstance(params, CRFParams):
        params = CRFParams.from_config(params)
    return dense_crf(image_rgb_uint8, probs, **params.as_kwargs())
