"""The class-wise refinement of the CAMs by a first AffinityNet (``affinity.refine_cams``, issue
41): the walked maps' invariants, the graph with and without it (its first AffinityNet is the run
without it's own), and a tiny run through it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_pipeline as tiny

from affinitynet import pipeline
from affinitynet.data.transforms import normalize
from affinitynet.files import load_label_png, load_npz, read_json
from affinitynet.models.affinity import confident_regions
from affinitynet.ops.crf import CRFParams
from affinitynet.ops.random_walk import pair_affinities
from affinitynet.stages.common import label_images, load_network
from affinitynet.stages.walk_cams import walked_cams
from benchmarks.seed_spread import link_finished

SECTION = {"alpha": 16.0, "beta": 8.0, "t": 16, "radius": 2}


def _inputs(seed):
    rng = np.random.default_rng(seed)
    cams = rng.random((3, 24, 32)).astype(np.float32)
    # AffinityNet's affinities of random features on the 3 x 4 grid of stride 8.
    affinities = pair_affinities(torch.from_numpy(rng.random((5, 3, 4)).astype(np.float32)), SECTION["radius"])
    return cams, affinities


@pytest.mark.parametrize("seed", range(3))
def test_each_class_walks_on_its_own_and_peaks_at_one(seed):
    cams, affinities = _inputs(seed)
    walked = walked_cams(cams, affinities, SECTION, 8)
    assert walked.shape == cams.shape and (walked >= 0).all()
    np.testing.assert_allclose(walked.reshape(3, -1).max(1), 1.0, atol=1e-4)
    # The background of Eq. 2 depends on every class, but it is dropped: a class's walked map is
    # the same with or without the others.
    for c in range(3):
        np.testing.assert_allclose(walked_cams(cams[c:c + 1], affinities, SECTION, 8)[0], walked[c], atol=1e-6)
    assert walked_cams(cams[:0], affinities, SECTION, 8).shape == (0, 24, 32)


def test_the_graph_walks_the_cams_only_when_asked(tmp_path, reference):
    ref_dir, data_root = reference
    plain = tiny.config(ref_dir, data_root)
    assert pipeline.upstream_stages(plain, "confident_regions") == ("infer_cam",)
    assert not {"draft_regions", "draft_affinity", "walk_cams"} & {spec.name for spec in pipeline.stages(plain)}
    walked = tiny.config(tmp_path / "walked", data_root, "affinity.refine_cams=true")
    order = [spec.name for spec in pipeline.stages(walked)]
    assert order[:6] == ["train_cam", "infer_cam", "draft_regions", "draft_affinity", "walk_cams",
                         "confident_regions"]
    assert pipeline.upstream_stages(walked, "confident_regions") == ("walk_cams",)
    # The first AffinityNet is the plain run's: the same hashes, so its stages are linked from it.
    assert pipeline.stage_hash(walked, "draft_regions") == pipeline.stage_hash(plain, "confident_regions")
    assert pipeline.stage_hash(walked, "draft_affinity") == pipeline.stage_hash(plain, "train_affinity")
    assert pipeline.stage_hash(walked, "train_affinity") != pipeline.stage_hash(plain, "train_affinity")
    assert link_finished(walked, [ref_dir]) == ["train_cam", "infer_cam", "draft_regions", "draft_affinity"]
    assert (tmp_path / "walked" / "draft_affinity" / "model.pt").samefile(ref_dir / "train_affinity" / "model.pt")


@pytest.mark.slow
def test_a_run_with_walked_cams(tmp_path, reference):
    ref_dir, data_root = reference
    config = tiny.config(tmp_path / "run", data_root, "affinity.refine_cams=true")
    link_finished(config, [ref_dir])
    code, out, err = tiny.cli(tiny.argv("run", tmp_path / "run", data_root, "affinity.refine_cams=true"))
    assert code == 0, err
    run_dir = tmp_path / "run"
    data = label_images(config)
    model = load_network("affinity", config, torch.device("cpu"), data.num_classes, data.class_names,
                         name="draft_affinity")
    crf = CRFParams.from_config(config["crf"])
    for sample in data.samples[:3]:
        image = data.load_image(sample)
        with torch.no_grad():
            features = model.features(normalize(image, model.backbone.mean, model.backbone.std)[None])[0]
        cams = load_npz(ref_dir / "infer_cam" / "cams" / f"{sample.id}.npz")
        affinities = pair_affinities(features, config["random_walk"]["radius"], config["affinity"]["distance"])
        expected = walked_cams(cams["cams"].astype(np.float32), affinities, config["random_walk"], model.output_stride)
        saved = load_npz(run_dir / "walk_cams" / "cams" / f"{sample.id}.npz")
        assert saved["classes"].tolist() == cams["classes"].tolist()
        np.testing.assert_allclose(saved["cams"].astype(np.float32), expected, atol=1e-3)
        # The regions are cut from the walked maps.
        regions = confident_regions(image, saved["cams"].astype(np.float32), saved["classes"].tolist(),
                                    config["affinity"]["alpha_low"], config["affinity"]["alpha_high"], crf)
        assert np.array_equal(load_label_png(run_dir / "confident_regions" / "labels" / f"{sample.id}.png"), regions)
    assert read_json(run_dir / "results.json")["training_labels"]
