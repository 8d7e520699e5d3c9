import numpy as np
import pytest

from affinitynet.config import DEFAULTS
from affinitynet.ops.crf import CRFParams, dense_crf, dense_crf_with


def _two_halves(height=48, width=64, flip_rate=0.3, seed=0):
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:, : width // 2] = (30, 110, 210)
    image[:, width // 2:] = (210, 60, 40)
    image = np.clip(image.astype(int) + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((height, width), np.int64)
    truth[:, width // 2:] = 1
    noisy = np.where(rng.random(truth.shape) < flip_rate, 1 - truth, truth)
    probs = np.stack([np.where(noisy == 0, 0.7, 0.3), np.where(noisy == 1, 0.7, 0.3)])
    return image, probs.astype(np.float32), truth


def test_crf_cleans_noisy_two_region_labels():
    image, probs, truth = _two_halves()
    before = (probs.argmax(0) == truth).mean()
    refined = dense_crf(image, probs)
    after = (refined.argmax(0) == truth).mean()
    assert 0.6 < before < 0.8
    assert after > 0.95
    assert after - before > 0.2


def test_crf_output_is_normalised_float32():
    image, probs, _ = _two_halves(20, 30)
    refined = dense_crf(image, probs, iterations=3)
    assert refined.shape == probs.shape and refined.dtype == np.float32
    np.testing.assert_allclose(refined.sum(0), 1.0, atol=1e-5)
    # Zero iterations: the softmax of -(-log p), i.e. the per-pixel normalised input.
    np.testing.assert_allclose(dense_crf(image, probs, iterations=0),
                               probs / probs.sum(0, keepdims=True), atol=1e-5)


def test_crf_accepts_zero_scores_and_non_contiguous_inputs():
    image, probs, truth = _two_halves(20, 30)
    probs = probs.copy()
    probs[0, truth == 1] = 0.0  # an absent label must not produce inf/NaN
    refined = dense_crf(image[:, ::-1][:, ::-1], np.asfortranarray(probs))
    assert np.isfinite(refined).all()
    assert (refined.argmax(0)[truth == 1] == 1).all()


def test_crf_single_label_and_bad_inputs():
    image, probs, _ = _two_halves(10, 12)
    assert (dense_crf(image, probs[:1]) == 1).all()
    with pytest.raises(ValueError):
        dense_crf(image.astype(np.float32), probs)
    with pytest.raises(ValueError):
        dense_crf(image, probs[:, :5])


def test_params_from_config():
    params = CRFParams.from_config(DEFAULTS["crf"])
    assert params == CRFParams()
    assert CRFParams.from_config({"iterations": 3.0}).iterations == 3
    assert CRFParams.from_config(None) == CRFParams()
    with pytest.raises(KeyError, match="bilateral_rgb"):
        CRFParams.from_config({"bilateral_rgb": 13})
    image, probs, _ = _two_halves(16, 16)
    np.testing.assert_array_equal(dense_crf_with(image, probs, {"iterations": 2}),
                                  dense_crf(image, probs, iterations=2))
