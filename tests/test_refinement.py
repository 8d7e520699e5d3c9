"""The refinements of the walked labels (``random_walk.crf``: band, full, off): the boundary band
against a slow reference written from its definition, and the random-walk stage's outputs and
Table 1 rows under each refinement."""
from __future__ import annotations

import numpy as np
import pytest
import tiny_pipeline as tiny

from affinitynet.config import load_config
from affinitynet.errors import ConfigError
from affinitynet.files import load_label_png, read_json
from affinitynet import pipeline
from affinitynet.ops.pseudo_labels import band_limited, boundary_band


def reference_band(labels: np.ndarray, width: int) -> np.ndarray:
    """Pixels whose Chebyshev distance to an edge pixel (a pixel with a 4-neighbour of another
    label) is below ``width``, by brute force."""
    height, wide = labels.shape
    edges = [(y, x) for y in range(height) for x in range(wide)
             if any(0 <= y + dy < height and 0 <= x + dx < wide and labels[y + dy, x + dx] != labels[y, x]
                    for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)))]
    band = np.zeros(labels.shape, dtype=bool)
    for y in range(height):
        for x in range(wide):
            band[y, x] = any(max(abs(y - ey), abs(x - ex)) < max(width, 1) for ey, ex in edges)
    return band


@pytest.mark.parametrize("width", [1, 2, 3, 8])
def test_boundary_band_matches_its_definition(width):
    rng = np.random.default_rng(width)
    # Blocky labels, as upsampled grid labels are, plus a few isolated pixels.
    labels = np.kron(rng.integers(0, 3, (4, 5)), np.ones((6, 6), dtype=np.int64)).astype(np.uint8)
    labels[rng.integers(0, 24, 5), rng.integers(0, 30, 5)] = 7
    assert np.array_equal(boundary_band(labels, width), reference_band(labels, width))


def test_boundary_band_of_one_label_is_empty():
    assert not boundary_band(np.full((9, 7), 4, dtype=np.uint8), 8).any()


def test_band_limited_takes_the_crf_only_near_the_walks_boundaries():
    walked = np.zeros((40, 40), dtype=np.uint8)
    walked[:, 20:] = 1                                  # one vertical boundary between x 19 and 20
    refined = np.full_like(walked, 2)                   # a CRF that relabels everything
    out = band_limited(walked, refined, 8)
    # Within 8 px of the boundary (x 12..27): the CRF's label; beyond: the walk's.
    assert (out[:, 12:28] == 2).all()
    assert np.array_equal(out[:, :12], walked[:, :12]) and np.array_equal(out[:, 28:], walked[:, 28:])
    assert out.dtype == walked.dtype


def test_refinement_spellings_are_one_value_and_one_hash():
    # An unquoted off is YAML's false: on the command line, in a file, the old boolean spellings.
    spelled = {text: load_config("msrc21", [f"random_walk.crf={text}", f"irn.crf={text}", "dataset.root=/x",
                                            "run_dir=/y"], check=False)
               for text in ("off", "false", "'off'", "true", "full", "band")}
    for text, value in [("off", "off"), ("false", "off"), ("'off'", "off"), ("true", "full"), ("full", "full"),
                        ("band", "band")]:
        assert spelled[text]["random_walk"]["crf"] == spelled[text]["irn"]["crf"] == value
    hashes = {text: pipeline.stage_hash(config, "random_walk") for text, config in spelled.items()}
    assert hashes["off"] == hashes["false"] == hashes["'off'"] != hashes["true"] == hashes["full"] != hashes["band"]


def _walk(tmp_path, reference, *extra):
    ref_dir, data_root = reference
    run_dir = tiny.copy_stages(ref_dir, tmp_path / "run", ("train_cam", "infer_cam", "confident_regions",
                                                           "train_affinity"))
    code, out, err = tiny.cli(tiny.argv("random-walk", run_dir, data_root, *extra))
    assert code == 0, err
    return run_dir, data_root


def test_band_stage_writes_the_papers_dcrf_beside_the_band_labels(tmp_path, reference):
    run_dir, data_root = _walk(tmp_path, reference, "random_walk.crf=band")
    stage, ref_stage = run_dir / "random_walk", reference[0] / "random_walk"
    ids = sorted(p.stem for p in (stage / "rw_labels").glob("*.png"))
    assert len(ids) == 12
    # The demo's images are seen at scale 1 by a stride-8 network: the band is 4 px wide.
    for sample_id in ids:
        walked = load_label_png(stage / "rw_labels" / f"{sample_id}.png")
        full = load_label_png(stage / "crf_labels" / f"{sample_id}.png")
        pseudo = load_label_png(stage / "pseudo_labels" / f"{sample_id}.png")
        assert np.array_equal(pseudo, band_limited(walked, full, 4))
        # The paper's whole-image dCRF: the pseudo labels of the reference run (crf: full).
        assert np.array_equal(full, load_label_png(ref_stage / "pseudo_labels" / f"{sample_id}.png"))
    table1 = read_json(stage / "_stage.json")["table1"]
    assert list(table1) == ["CAM", "CAM+RW", "CAM+RW+dCRF", "CAM+RW+dCRF in band"]
    assert table1["CAM+RW+dCRF"] == read_json(ref_stage / "_stage.json")["table1"]["CAM+RW+dCRF"]
    # evaluate-run and the run's summary name the band labels as the training labels.
    for command in ("train-seg", "infer-seg", "evaluate-run"):
        code, out, err = tiny.cli(tiny.argv(command, run_dir, data_root, "random_walk.crf=band"))
        assert code == 0, err
    results = read_json(run_dir / "results.json")
    assert results["training_labels"] == "CAM+RW+dCRF in band"
    assert list(results["rows"]) == ["CAM", "CAM+RW", "CAM+RW+dCRF", "CAM+RW+dCRF in band", "Network"]


def test_full_stage_is_the_papers_dcrf(reference):
    """The demo config keeps the paper's dCRF (``full``): the reference run's random-walk stage."""
    ref_dir, _ = reference
    assert load_config(ref_dir / "config.yaml")["random_walk"]["crf"] == "full"
    stage = ref_dir / "random_walk"
    assert not (stage / "crf_labels").exists()
    assert list(read_json(stage / "_stage.json")["table1"]) == ["CAM", "CAM+RW", "CAM+RW+dCRF"]
    assert read_json(ref_dir / "results.json")["training_labels"] == "CAM+RW+dCRF"


def test_off_stage_trains_on_the_walks_labels(tmp_path, reference):
    run_dir, _ = _walk(tmp_path, reference, "random_walk.crf=off")
    stage = run_dir / "random_walk"
    assert not (stage / "crf_labels").exists()
    for path in sorted((stage / "rw_labels").glob("*.png")):
        assert np.array_equal(load_label_png(path), load_label_png(stage / "pseudo_labels" / path.name))
    assert list(read_json(stage / "_stage.json")["table1"]) == ["CAM", "CAM+RW"]


def test_boolean_spellings_are_accepted_and_other_values_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  name: demo\nrandom_walk:\n  crf: true\n")
    assert load_config(path)["random_walk"]["crf"] == "full"
    path.write_text("dataset:\n  name: demo\nrandom_walk:\n  crf: sometimes\n")
    with pytest.raises(ConfigError, match="random_walk.crf' must be one of 'band', 'full', 'off'"):
        load_config(path)
