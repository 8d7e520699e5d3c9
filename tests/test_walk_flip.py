"""The walk's affinities from AffinityNet's features averaged over the image and its mirror image
(``random_walk.flip``, issue 41): the features' flip invariance, the key hashed only when set, and
a tiny run's stored affinities against those computed here."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_pipeline as tiny

from affinitynet import pipeline
from affinitynet.data.transforms import normalize
from affinitynet.files import load_npz
from affinitynet.ops.random_walk import pair_affinities
from affinitynet.stages.common import affinity_features, label_images, load_network
from benchmarks.seed_spread import link_finished


def _model(reference):
    ref_dir, data_root = reference
    config = tiny.config(ref_dir, data_root)
    data = label_images(config)
    return config, data, load_network("affinity", config, torch.device("cpu"), data.num_classes, data.class_names)


def test_flipped_features_are_the_mean_of_the_two_views_and_mirror_with_the_image(reference):
    _, data, model = _model(reference)
    image = data.load_image(data.samples[0])
    # A width the stride divides: the mirror image's grid is the image's grid mirrored.
    image = np.ascontiguousarray(image[:, : image.shape[1] // model.output_stride * model.output_stride])
    with torch.no_grad():
        plain = affinity_features(model, image, torch.device("cpu"))
        mirrored = affinity_features(model, image[:, ::-1].copy(), torch.device("cpu"))
        both = affinity_features(model, image, torch.device("cpu"), flip=True)
        both_of_mirror = affinity_features(model, image[:, ::-1].copy(), torch.device("cpu"), flip=True)
        direct = model.features(normalize(image, model.backbone.mean, model.backbone.std)[None])[0]
    torch.testing.assert_close(plain, direct)
    torch.testing.assert_close(both, (plain + mirrored.flip(-1)) / 2, atol=1e-5, rtol=1e-5)
    # The averaged features do not depend on which of the two views came in.
    torch.testing.assert_close(both_of_mirror.flip(-1), both, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both, plain, atol=1e-3), "the mirror image changed nothing: the test shows nothing"


def test_flip_is_hashed_only_when_set(reference, tmp_path):
    ref_dir, data_root = reference
    plain = tiny.config(ref_dir, data_root)
    assert plain["random_walk"]["flip"] is False
    # Unset, it is not hashed, though its section is: the runs made before it stay current
    # (test_refine_round's MSRC21_HASHES pins those hashes).
    assert "random_walk.flip" not in pipeline.stage_inputs(plain, "random_walk")["inputs"]["keys"]
    flipped = tiny.config(tmp_path / "flipped", data_root, "random_walk.flip=true")
    assert pipeline.stage_inputs(flipped, "random_walk")["inputs"]["keys"]["random_walk.flip"] is True
    changed = [spec.name for spec in pipeline.stages(plain)
               if pipeline.stage_hash(plain, spec.name) != pipeline.stage_hash(flipped, spec.name)]
    assert changed == ["random_walk", "train_seg", "infer_seg", "evaluate_run"]


@pytest.mark.slow
def test_a_run_walks_the_flipped_features(reference, tmp_path):
    ref_dir, data_root = reference
    run_dir = tmp_path / "flipped"
    config = tiny.config(run_dir, data_root, "random_walk.flip=true")
    assert link_finished(config, [ref_dir]) == ["train_cam", "infer_cam", "confident_regions", "train_affinity"]
    code, _, err = tiny.cli(tiny.argv("random-walk", run_dir, data_root, "random_walk.flip=true"))
    assert code == 0, err
    _, data, model = _model(reference)
    section = config["random_walk"]
    for sample in data.samples[:3]:
        image = data.load_image(sample)
        with torch.no_grad():
            # The two views through the network one at a time, not through affinity_features.
            views = [model.features(normalize(view, model.backbone.mean, model.backbone.std)[None])[0]
                     for view in (image, image[:, ::-1].copy())]
            expected = pair_affinities((views[0] + views[1].flip(-1)) / 2, section["radius"],
                                       config["affinity"]["distance"])
            unflipped = load_npz(ref_dir / "random_walk" / "affinities" / f"{sample.id}.npz")["affinities"]
        stored = load_npz(run_dir / "random_walk" / "affinities" / f"{sample.id}.npz")["affinities"]
        np.testing.assert_allclose(stored.astype(np.float32), expected.half().float().numpy(), atol=1e-3)
        assert not np.array_equal(stored, unflipped)
