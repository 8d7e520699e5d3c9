"""Training at a coarser output stride than inference (``cam.train_output_stride``,
``segmentation.train_output_stride``): the network built for inference at stride 8 from the
weights trained at 16 computes, on every other cell of its grid, exactly what the trained network
computes (atrous convolution, 4.1), and its model.pt says which stride it was trained at. And
AffinityNet's backbone at a coarser stride than the walk's grid (``affinity.backbone_stride``):
f_aff on the walk's grid in training and walk alike."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from affinitynet.config import load_config
from affinitynet.errors import TrainingError
from affinitynet.models.networks import build_network, check_meta, layout, meta_config, network_meta

CLASSES = [f"c{i}" for i in range(6)]


def _config(stride):
    return load_config("msrc21", [f"cam.train_output_stride={stride}", f"segmentation.train_output_stride={stride}"],
                       check=False)


def _head_dilations(model):
    return [m.dilation[0] for m in model.head.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1]


@pytest.fixture(scope="module")
def coarse():
    return _config(16)


@pytest.mark.parametrize("kind,outputs", [("cam", lambda m, x: m.cams(x)), ("segmentation", lambda m, x: m.scores(x))])
def test_the_network_at_stride_8_is_the_trained_one_on_a_finer_grid(coarse, kind, outputs):
    torch.manual_seed(0)
    trained = build_network(kind, coarse, len(CLASSES), pretrained=True, training=True).eval()
    run = build_network(kind, coarse, len(CLASSES), pretrained=False).eval()
    run.load_state_dict(trained.state_dict())
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        coarse_map, fine_map = outputs(trained, images), outputs(run, images)
    assert coarse_map.shape[-2:] == (6, 8) and fine_map.shape[-2:] == (12, 16)
    assert coarse_map.abs().max() > 0.1
    torch.testing.assert_close(fine_map[..., ::2, ::2], coarse_map, atol=1e-5, rtol=1e-4)
    # The odd cells are new positions, not copies of their neighbours.
    assert not torch.allclose(fine_map[..., 1::2, 1::2], coarse_map, atol=1e-3)


def test_heads_keep_their_span_in_pixels(coarse):
    default = _config("null")
    # Section 4.2's 3x3 CAM head and the segmentation head's dilation 12 at stride 8.
    assert _head_dilations(build_network("cam", default, 6, pretrained=False)) == [1]
    assert _head_dilations(build_network("cam", default, 6, pretrained=False, training=True)) == [1]
    assert _head_dilations(build_network("segmentation", default, 6, pretrained=False)) == [12, 12]
    # Trained at 16: the CAM head's 3x3 spans 16 px cells, the segmentation head 6 cells of 16 px.
    assert _head_dilations(build_network("cam", coarse, 6, pretrained=False, training=True)) == [1]
    assert _head_dilations(build_network("cam", coarse, 6, pretrained=False)) == [2]
    assert _head_dilations(build_network("segmentation", coarse, 6, pretrained=False, training=True)) == [6, 6]
    assert _head_dilations(build_network("segmentation", coarse, 6, pretrained=False)) == [12, 12]
    # The networks the walk reads train on its grid (AffinityNet's backbone may run coarser).
    affinity = build_network("affinity", coarse, 6, pretrained=False, training=True)
    assert affinity.output_stride == 8


def test_predict_rebuilds_the_segmentation_network_at_stride_8_from_its_meta(coarse):
    model = build_network("segmentation", coarse, len(CLASSES), pretrained=False, training=True)
    meta = network_meta("segmentation", coarse, CLASSES, model.backbone)
    # predict rebuilds it from the file alone, at stride 8 with the head dilated back.
    rebuilt = build_network("segmentation", meta_config(meta), len(CLASSES), pretrained=False)
    assert rebuilt.backbone.output_stride == 8 and _head_dilations(rebuilt) == [12, 12]


def _affinity_config(stride):
    return load_config("msrc21", [f"affinity.backbone_stride={stride}"], check=False)


@pytest.mark.parametrize("kind,key,make", [("cam", "train_output_stride", _config),
                                           ("segmentation", "train_output_stride", _config),
                                           ("affinity", "backbone_stride", _affinity_config)])
def test_model_pt_records_its_stride_and_refuses_another(kind, key, make, tmp_path):
    coarse, default = make(16), make("null")
    model = build_network(kind, coarse, len(CLASSES), pretrained=False, training=True)
    meta = network_meta(kind, coarse, CLASSES, model.backbone)
    assert meta[key] == 16 and meta["output_stride"] == 8
    # null resolves to backbone.output_stride, in the meta and in the check.
    assert network_meta(kind, default, CLASSES, model.backbone)[key] == 8
    check_meta(tmp_path / "model.pt", dict(meta), layout=layout(kind, coarse))
    with pytest.raises(TrainingError, match=rf"made with {kind}.{key}=16 but the config has {kind}.{key}=8"):
        check_meta(tmp_path / "model.pt", dict(meta), layout=layout(kind, default))
    # A model.pt from before the option ran at backbone.output_stride; it loads as before.
    del meta[key]
    check_meta(tmp_path / "model.pt", meta, layout=layout(kind, default))


# --- AffinityNet's backbone at a coarser stride (affinity.backbone_stride) ------------------------

def test_affinitynet_with_a_coarser_backbone_gives_f_aff_on_the_walks_grid():
    """f_aff at stride 16 is, by definition (affinity.AffinityNet), each of the last three levels
    reduced, activated and bilinearly resized to the walk's grid (ceil(H / 8), ceil(W / 8)), then
    concatenated and adapted: the same function in training and in the walk."""
    torch.manual_seed(0)
    model = build_network("affinity", _affinity_config(16), 6, pretrained=True, training=True).eval()
    assert model.backbone.output_stride == 16 and model.output_stride == 8
    walked = build_network("affinity", _affinity_config(16), 6, pretrained=False)
    assert walked.backbone.output_stride == 16 and walked.output_stride == 8
    images = torch.randn(2, 3, 99, 130)       # odd sizes: the grid rounds up, as the CAMs' does
    with torch.no_grad():
        features = model.features(images)
        levels = model.backbone(images)[-3:]
        assert [tuple(level.shape[-2:]) for level in levels] == [(13, 17), (7, 9), (7, 9)]
        reduced = [torch.nn.functional.interpolate(model.act(conv(level)), size=(13, 17), mode="bilinear",
                                                   align_corners=False)
                   for conv, level in zip(model.reducers, levels)]
        reference = model.act(model.adapt(torch.cat(reduced, dim=1)))
    assert features.shape == (2, 896, 13, 17)
    torch.testing.assert_close(features, reference)
    # The default keeps the backbone on the walk's grid, with nothing resized.
    default = build_network("affinity", _affinity_config("null"), 6, pretrained=False, training=True)
    assert default.backbone.output_stride == 8 and default.output_stride == 8


def test_train_affinity_and_the_walk_with_the_backbone_at_16(tmp_path_factory, tmp_path, capsys):
    import tiny_pipeline as tiny

    from affinitynet.engine.checkpoints import load_checkpoint
    from affinitynet.files import load_npz

    reference, data_root = tiny.reference_run(tmp_path_factory)
    run = tiny.copy_stages(reference, tmp_path / "run", ["train_cam", "infer_cam", "confident_regions"])
    coarse = "affinity.backbone_stride=16"
    for command in ("train-affinity", "random-walk"):
        code, _, err = tiny.cli(tiny.argv(command, run, data_root, coarse), capsys)
        assert code == 0, err
    assert load_checkpoint(run / "train_affinity" / "model.pt")["meta"]["backbone_stride"] == 16
    # The affinities are on the walk's grid: 64 px images at stride 8, radius 5.
    paths = sorted((run / "random_walk" / "affinities").glob("*.npz"))
    assert len(paths) == 12            # the label split: the 12 training images
    for path in paths:
        stored = load_npz(path)
        assert stored["affinities"].shape == (34, 8, 8) and int(stored["stride"]) == 8
    # The walk under the default config does not take this AffinityNet for its own.
    code, _, err = tiny.cli(tiny.argv("random-walk", run, data_root), capsys)
    assert code == 2 and "needs the outputs of 'train_affinity', which are missing or were made with other " \
                         "settings" in err, err


# --- the last epochs at stride 8 (fine_tune_epochs) ------------------------------------------------

def _fine_tuned(epochs, kind="segmentation", stride=16):
    return load_config("msrc21", [f"{kind}.train_output_stride={stride}", f"{kind}.fine_tune_epochs={epochs}"],
                       check=False)


@pytest.mark.parametrize("kind,outputs,coarse_heads,fine_heads", [
    ("cam", lambda m, x: m.cams(x), [1], [2]),
    ("segmentation", lambda m, x: m(x), [6, 6], [12, 12])])
def test_fine_tune_epochs_put_the_last_epochs_at_the_stride_it_runs_at(kind, outputs, coarse_heads, fine_heads,
                                                                        capsys):
    from affinitynet.models.networks import fine_tune_epochs
    from affinitynet.stages.common import _fine_tuning

    config = _fine_tuned(2, kind)
    assert config[kind]["epochs"] == 8
    torch.manual_seed(0)
    model = build_network(kind, config, len(CLASSES), pretrained=True, training=True).eval()
    run = build_network(kind, config, len(CLASSES), pretrained=False).eval()
    run.load_state_dict(model.state_dict())
    at_epoch = _fine_tuning(kind, config, len(CLASSES), model)
    at_epoch(5)                        # the sixth of 8 epochs: still at 16
    assert model.backbone.output_stride == 16 and _head_dilations(model) == coarse_heads
    assert capsys.readouterr().out == ""
    at_epoch(6)
    assert model.backbone.output_stride == 8 and _head_dilations(model) == fine_heads
    assert capsys.readouterr().out == f"{kind}: epochs 7-8 at output stride 8 (fine_tune_epochs)\n"
    images = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(outputs(model, images), outputs(run, images))
    # A run resumed after epoch 7 starts at index 7, at 8 from its first epoch.
    resumed = build_network(kind, config, len(CLASSES), pretrained=False, training=True)
    _fine_tuning(kind, config, len(CLASSES), resumed)(7)
    assert resumed.backbone.output_stride == 8 and _head_dilations(resumed) == fine_heads
    # Nothing to do at one stride; at most every epoch; never for the networks on the walk's grid.
    assert _fine_tuning(kind, _fine_tuned(0, kind), len(CLASSES), model) is None
    assert fine_tune_epochs(kind, _fine_tuned(2, kind, "null")) == 0
    assert fine_tune_epochs(kind, _fine_tuned(20, kind)) == 8
    assert fine_tune_epochs("affinity", config) == 0


def test_train_seg_fine_tuned_at_8_resumes_a_killed_run_exactly(tmp_path_factory, tmp_path, capsys):
    import tiny_pipeline as tiny

    from affinitynet.engine.checkpoints import load_checkpoint

    reference, data_root = tiny.reference_run(tmp_path_factory)
    upstream = ["train_cam", "infer_cam", "confident_regions", "train_affinity", "random_walk"]
    options = ("segmentation.train_output_stride=16", "segmentation.fine_tune_epochs=1")
    whole = tiny.copy_stages(reference, tmp_path / "whole", upstream)
    code, out, err = tiny.cli(tiny.argv("train-seg", whole, data_root, *options), capsys)
    assert code == 0, err
    assert "segmentation: epochs 2-2 at output stride 8 (fine_tune_epochs)" in out
    # Killed in epoch 2 (at 8): the resumed run goes on at 8 from the epoch-1 checkpoint.
    killed = tiny.copy_stages(reference, tmp_path / "killed", upstream)
    args = tiny.argv("train-seg", killed, data_root, *options)
    tiny.kill_at(args, {"kind": "optimizer_step", "count": tiny.STEPS_PER_EPOCH + 1}, tmp_path / "children")
    code, out, err = tiny.cli(args, capsys)
    assert code == 0, err
    assert "segmentation: resuming at epoch 2/2" in out and "epochs 2-2 at output stride 8" in out
    assert tiny.compare_runs(whole, killed, ["train_seg"])["differences"] == []
    # Epoch 2 at 16 learns other weights: the stride did change for it.
    plain = tiny.copy_stages(reference, tmp_path / "plain", upstream)
    code, _, err = tiny.cli(tiny.argv("train-seg", plain, data_root, options[0]), capsys)
    assert code == 0, err
    trained = [load_checkpoint(run / "train_seg" / "model.pt")["model"] for run in (whole, plain)]
    assert trained[0].keys() == trained[1].keys()
    assert not all(torch.equal(trained[0][key], trained[1][key]) for key in trained[0])
