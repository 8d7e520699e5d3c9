"""The refinement round (``labels.refine``, issue 41): a first segmentation network trained on
the label method's pseudo labels (``draft_seg``) relabels the training images where it is
confident (``refine_labels``), and those labels train ``train_seg``. Exact values of the rule, its
invariants, the graph with and without it, and a tiny run through it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_pipeline as tiny

from affinitynet import pipeline
from affinitynet.config import load_config
from affinitynet.data.transforms import normalize
from affinitynet.files import load_label_png, read_json
from affinitynet.models.networks import model_from_checkpoint
from affinitynet.models.segmentation import predict_scores
from affinitynet.ops.pseudo_labels import network_refinement, tagged_prediction
from affinitynet.stages.common import label_images
from benchmarks import label_levers
from benchmarks.label_levers import LEVERS, confirm, decide, run_base, stops_at_seed_0
from benchmarks.seed_spread import link_finished


def test_tagged_prediction_renormalises_over_the_tags():
    # Classes 0..3 at two pixels; the image is tagged with class 2 only.
    probs = np.array([[0.2, 0.1], [0.5, 0.1], [0.2, 0.6], [0.1, 0.2]], dtype=np.float32)[:, None, :]
    labels, confidence = tagged_prediction(probs, [2])
    # Pixel 0: class 1 (0.5) is not tagged; over {0, 2}: 0.2 / 0.4 each, the first wins.
    # Pixel 1: over {0, 2}: 0.1 / 0.7 and 0.6 / 0.7.
    assert labels.tolist() == [[0, 2]] and labels.dtype == np.uint8
    np.testing.assert_allclose(confidence, [[0.5, 6 / 7]], rtol=1e-6)


def test_network_refinement_keeps_agreement_takes_confidence_ignores_the_rest():
    labels = np.array([[1, 1, 0, 0]], dtype=np.uint8)
    network = np.array([[1, 0, 2, 0]], dtype=np.uint8)
    confidence = np.array([[0.3, 0.95, 0.5, 0.1]], dtype=np.float32)
    assert network_refinement(labels, network, confidence, 0.9).tolist() == [[1, 0, 255, 0]]
    # A threshold of 0 takes the network everywhere; above 1, agreement alone.
    assert network_refinement(labels, network, confidence, 0.0).tolist() == network.tolist()
    assert network_refinement(labels, network, confidence, 1.01).tolist() == [[1, 255, 255, 0]]


@pytest.mark.parametrize("seed", range(5))
def test_refined_labels_name_only_tagged_classes(seed):
    rng = np.random.default_rng(seed)
    classes = sorted(rng.choice(np.arange(1, 8), size=int(rng.integers(1, 4)), replace=False).tolist())
    probs = rng.dirichlet(np.ones(8), size=(6, 9)).transpose(2, 0, 1)
    labels = rng.choice([0, *classes], size=(6, 9)).astype(np.uint8)
    network, confidence = tagged_prediction(probs, classes)
    refined = network_refinement(labels, network, confidence, 0.6)
    assert set(np.unique(network)) <= {0, *classes}
    assert set(np.unique(refined)) <= {0, *classes, 255}
    agree = network == labels
    assert np.array_equal(refined[agree], labels[agree])
    assert (confidence[refined == 255] < 0.6).all()
    taken = (~agree) & (refined != 255)
    assert np.array_equal(refined[taken], network[taken]) and (confidence[taken] >= 0.6).all()


# The msrc21 config's stage hashes before the round existed (commit 199447b, when it trained on the
# band's labels and the CAM network at stride 16), at fixed paths: runs made then stay current.
MSRC21_HASHES = {"train_cam": "1c88d728a98a5741", "infer_cam": "a9bd8eab03022395",
                 "confident_regions": "c8370e377dbdade9", "train_affinity": "8b69347cdd1288b0",
                 "random_walk": "0241abda7b4a9724", "train_seg": "6f79b1d508fc1b80",
                 "infer_seg": "36ec4c5a8b414ecf", "evaluate_run": "f1f01fe106fe73b9"}


def test_the_graph_without_the_round_is_unchanged(tmp_path, reference):
    fixed = load_config("msrc21", ["dataset.root=/nonexistent/data", "run_dir=/nonexistent/run",
                                   "random_walk.crf=band", "cam.train_output_stride=16"], check=False)
    assert {spec.name: pipeline.stage_hash(fixed, spec.name) for spec in pipeline.stages(fixed)} == MSRC21_HASHES
    ref_dir, data_root = reference
    config = tiny.config(ref_dir, data_root)
    assert [spec.name for spec in pipeline.stages(config)] == list(tiny.STAGE_NAMES)
    refined = tiny.config(ref_dir, data_root, "labels.refine=true")
    order = [spec.name for spec in pipeline.stages(refined)]
    assert order.index("random_walk") < order.index("draft_seg") < order.index("refine_labels") < order.index("train_seg")
    assert pipeline.upstream_stages(refined, "train_seg") == ("refine_labels",)
    assert pipeline.upstream_stages(refined, "refine_labels") == ("draft_seg", "random_walk")
    # Any label method's labels go through it: IRN's.
    irn = tiny.config(ref_dir, data_root, "labels.refine=true", "labels.method=irn")
    assert pipeline.upstream_stages(irn, "refine_labels") == ("draft_seg", "irn_walk")
    assert pipeline.upstream_stages(irn, "draft_seg") == ("irn_walk",)
    # The bound trains on the ground truth: no round.
    bound = tiny.config(ref_dir, data_root, "labels.refine=true", "segmentation.supervision=gt")
    assert "draft_seg" not in [spec.name for spec in pipeline.stages(bound)]
    assert not pipeline.hash_matches(tiny.stage_state(ref_dir, "train_seg")["hash"], refined, "train_seg")


@pytest.mark.slow
def test_a_run_with_the_round(tmp_path, reference):
    ref_dir, data_root = reference
    run_dir = tiny.copy_stages(ref_dir, tmp_path / "run", ("train_cam", "infer_cam", "confident_regions",
                                                           "train_affinity", "random_walk"))
    code, out, err = tiny.cli(tiny.argv("run", run_dir, data_root, "labels.refine=true", "labels.refine_confidence=0.6"))
    assert code == 0, err
    # The first network is train_seg's of the run without the round: the same labels and seed.
    draft = torch.load(run_dir / "draft_seg" / "model.pt", weights_only=True)["model"]
    reference_model = torch.load(ref_dir / "train_seg" / "model.pt", weights_only=True)["model"]
    for name, tensor in reference_model.items():
        torch.testing.assert_close(draft[name], tensor, msg=name)
    # Each refined label map is the rule applied to the first network's tagged prediction.
    config = tiny.config(run_dir, data_root, "labels.refine=true", "labels.refine_confidence=0.6")
    data = label_images(config)
    model, meta = model_from_checkpoint(run_dir / "draft_seg" / "model.pt", torch.device("cpu"))
    stage_dir = run_dir / "refine_labels"
    ignored = 0
    for sample in data.samples[:4]:
        image = data.load_image(sample)
        with torch.no_grad():
            probs = predict_scores(model, normalize(image, meta["mean"], meta["std"]), [1.0], True)
        network, confidence = tagged_prediction(probs.numpy(), sample.labels)
        method = load_label_png(run_dir / "random_walk" / "pseudo_labels" / f"{sample.id}.png")
        assert np.array_equal(load_label_png(stage_dir / "network_labels" / f"{sample.id}.png"), network)
        refined = load_label_png(stage_dir / "pseudo_labels" / f"{sample.id}.png")
        assert np.array_equal(refined, network_refinement(method, network, confidence, 0.6))
        ignored += int((refined == 255).sum())
    assert ignored > 0   # the rule's third case happens on these images
    results = read_json(run_dir / "results.json")
    assert results["training_labels"] == "Refined"
    assert list(results["rows"]) == ["CAM", "CAM+RW", "CAM+RW+dCRF", "First network", "Refined", "Network"]
    assert list(read_json(stage_dir / "_stage.json")["table1"]) == ["CAM+RW+dCRF", "First network", "Refined"]
    # train_seg trained on the refined labels: not the reference's network.
    final = torch.load(run_dir / "train_seg" / "model.pt", weights_only=True)["model"]
    assert any(not torch.equal(final[name], tensor) for name, tensor in reference_model.items())


def test_the_lever_benchmark_reuses_the_work_a_lever_leaves_unchanged(tmp_path, reference):
    ref_dir, data_root = reference
    config = tiny.config(tmp_path / "lever", data_root, "labels.refine=true")
    linked = link_finished(config, [ref_dir])
    # Everything before the round, and its first network: the reference's train_seg.
    assert linked == ["train_cam", "infer_cam", "confident_regions", "train_affinity", "random_walk", "draft_seg"]
    for name in linked:
        assert pipeline.is_complete(config, name), name
    assert read_json(tmp_path / "lever" / "draft_seg" / "_stage.json")["stage"] == "draft_seg"
    assert (tmp_path / "lever" / "draft_seg" / "model.pt").samefile(ref_dir / "train_seg" / "model.pt")
    assert not (tmp_path / "lever" / "draft_seg" / "checkpoint.pt").exists()


def _seed(network, baseline, labels=80.0):
    return {"training_labels": "Refined", "table1": {"CAM+RW": 78.0, "Refined": labels},
            "network_val_miou": network, "baseline_network_val_miou": baseline}


def test_the_levers_decision_rule():
    assert decide([_seed(66.0, 67.0)], "gain").startswith("not kept: seed 0's network is below")
    assert decide([_seed(66.0, 67.0)], "no loss") == "undecided: 1 of 3 seeds"
    assert decide([_seed(68.0, 67.0)], "gain") == "undecided: 1 of 3 seeds"
    # The benchmark runs no further seeds exactly where the rule decided on seed 0 alone.
    assert stops_at_seed_0(_seed(66.0, 67.0), "gain")
    assert not stops_at_seed_0(_seed(66.0, 67.0), "no loss") and not stops_at_seed_0(_seed(68.0, 67.0), "gain")
    # Gains of 3 against spreads of 1: kept; the same with labels under CAM+RW: not.
    assert decide([_seed(70.0, 67.0), _seed(71.0, 68.0), _seed(72.0, 69.0)], "gain") == "kept (network +3.0, spread 1.0)"
    assert "below CAM+RW" in decide([_seed(70.0, 67.0, 77.0), _seed(71.0, 68.0), _seed(72.0, 69.0)], "gain")
    # A change of +1 within a spread of 2: no gain, and no loss.
    within = [_seed(68.0, 67.0), _seed(72.0, 71.0), _seed(66.0, 65.0)]
    assert "within the seed spread" in decide(within, "gain")
    assert decide(within, "no loss").startswith("kept")
    # A loss of 3 beyond a spread of 1: not kept for either aim.
    loss = [_seed(64.0, 67.0), _seed(65.0, 68.0), _seed(66.0, 69.0)]
    assert decide(loss, "no loss") == "not kept: the network's change of -3.0 is beyond the seed spread 1.0"


def test_a_lever_measured_against_another_differs_from_it_by_its_own_overrides():
    # Otherwise its A/B would measure two changes, and a chain of baselines would hide one.
    against = {name: lever for name, lever in LEVERS.items() if lever.baseline}
    assert against, "no lever is measured against another's runs"
    for name, lever in against.items():
        base = LEVERS[lever.baseline]
        assert base.baseline is None, name
        assert set(base.overrides) < set(lever.overrides), name
        assert run_base(name) != run_base(lever.baseline)


def test_the_rule_compares_irns_labels_with_irns_walk():
    def irn(network, labels):
        return {"training_labels": "CAM+IRN+dCRF in band", "walk_row": "CAM+IRN",
                "table1": {"CAM+IRN": 75.3, "CAM+IRN+dCRF in band": labels},
                "network_val_miou": network, "baseline_network_val_miou": network}
    assert decide([irn(67.0, 75.5), irn(67.0, 75.5), irn(68.0, 75.5)], "no loss").startswith("kept")
    assert decide([irn(67.0, 75.0), irn(67.0, 75.0), irn(68.0, 75.0)], "no loss") == \
        "not kept: its training labels are below CAM+IRN"


@pytest.mark.parametrize("flags, seed_1, making", [
    ((), "runs/msrc21_pipeline1", "python -m benchmarks.msrc21 --seeds"),
    (("--no-whole-pipeline",), "runs/msrc21_seed1", "python -m benchmarks.msrc21 --no-whole-pipeline --seeds")])
def test_a_lever_without_its_baseline_says_what_to_run_before_writing(tmp_path, monkeypatch, capsys, flags, seed_1,
                                                                       making):
    monkeypatch.chdir(tmp_path)   # no data/ unpacked and no results file written here
    argv = ["walk_labels", "--seeds", "2", "--baseline", "runs/msrc21", *flags]
    with pytest.raises(SystemExit) as exit:
        label_levers.main(argv)
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"runs/msrc21/results.json: no finished baseline run of seed 0 ({making} 1)"), error
    assert list(tmp_path.iterdir()) == []
    # Seed 0 finished, with its bound: seed 1 is looked for where the baseline's seeding put it.
    (tmp_path / "runs/msrc21").mkdir(parents=True)
    (tmp_path / "runs/msrc21/results.json").write_text("{}")
    (tmp_path / "runs/msrc21_gt/infer_seg").mkdir(parents=True)
    (tmp_path / "runs/msrc21_gt/infer_seg/_stage.json").write_text("{}")
    with pytest.raises(SystemExit):
        label_levers.main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith(f"{seed_1}/results.json: no finished baseline run of seed 1 ({making} 2)"), error
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["msrc21", "msrc21_gt"]


def test_the_confirmation_rule_is_a_one_sided_paired_t_test():
    # Differences +1.0, +1.0, +2.8: mean 1.6, standard error 0.6; 1.6 < 2.92 * 0.6 = 1.75.
    seeds = [_seed(70.4, 69.4), _seed(74.5, 73.5), _seed(74.6, 71.8)]
    assert confirm(seeds) == "not confirmed: the mean difference +1.6 is under 2.92 standard errors (0.6)"
    # +1.0, +1.2, +1.4: mean 1.2, standard error 0.12: confirmed, although within a spread of 2.
    steady = [_seed(70.0, 69.0), _seed(74.2, 73.0), _seed(73.4, 72.0)]
    assert confirm(steady) == "confirmed (network +1.2, standard error 0.1)"
    assert confirm([_seed(69.0, 70.0), _seed(72.0, 73.0), _seed(71.0, 72.0)]).startswith("not confirmed")
    assert "below CAM+RW" in confirm([_seed(70.0, 69.0, 77.0), *steady[1:]])
    assert confirm(steady[:2]) == "undecided: 2 of 3 seeds"


def test_a_confirmation_needs_whole_pipeline_seeds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        label_levers.main(["regions_alpha32", "--first-seed", "3", "--no-whole-pipeline"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--first-seed: a seed of 0 or more, and above 0 only with whole-pipeline seeds")
    with pytest.raises(SystemExit):
        label_levers.main(["regions_alpha32", "--first-seed", "3"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.endswith("runs/msrc21_pipeline3/results.json: no finished baseline run of seed 3 "
                          "(python -m benchmarks.msrc21 --seeds 4)"), error
    assert list(tmp_path.iterdir()) == []
