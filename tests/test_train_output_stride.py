"""Training at a coarser output stride than inference (``cam.train_output_stride``,
``segmentation.train_output_stride``): the network built for inference at stride 8 from the
weights trained at 16 computes, on every other cell of its grid, exactly what the trained network
computes (atrous convolution, 4.1), and its model.pt says which stride it was trained at."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from affinitynet.config import load_config
from affinitynet.errors import TrainingError
from affinitynet.networks import build_network, check_meta, layout, meta_config, network_meta

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
    # The networks the walk reads train on its grid.
    affinity = build_network("affinity", coarse, 6, pretrained=False, training=True)
    assert affinity.backbone.output_stride == 8


def test_model_pt_records_the_training_stride_and_refuses_another(coarse, tmp_path):
    model = build_network("segmentation", coarse, len(CLASSES), pretrained=False, training=True)
    meta = network_meta("segmentation", coarse, CLASSES, model.backbone)
    assert meta["train_output_stride"] == 16 and meta["output_stride"] == 8
    # predict rebuilds it from the file alone, at stride 8 with the head dilated back.
    rebuilt = build_network("segmentation", meta_config(meta), len(CLASSES), pretrained=False)
    assert rebuilt.backbone.output_stride == 8 and _head_dilations(rebuilt) == [12, 12]
    # null resolves to backbone.output_stride, in the meta and in the check.
    default = _config("null")
    assert network_meta("cam", default, CLASSES, model.backbone)["train_output_stride"] == 8
    check_meta(tmp_path / "model.pt", dict(meta), layout=layout("segmentation", coarse))
    with pytest.raises(TrainingError, match=r"made with segmentation.train_output_stride=16 but the config has "
                                            r"segmentation.train_output_stride=8"):
        check_meta(tmp_path / "model.pt", dict(meta), layout=layout("segmentation", default))
    # A model.pt from before the option was trained at backbone.output_stride; it loads as before.
    del meta["train_output_stride"]
    check_meta(tmp_path / "model.pt", meta, layout=layout("segmentation", default))
