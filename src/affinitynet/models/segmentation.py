"""The segmentation network trained on the synthesized labels (paper 3.4, 4.2, Fig. 7d) and its
multi-scale + flip inference (Appendix A.2). ``affinitynet predict`` is ``predict.py``.

Heads (``head=``):

- ``"resnet38"`` ("Ours-ResNet38", 4.2 and A.1, following Wu et al. [38]): two 3x3 atrous
  convolutions with dilation 12 on top of the backbone, 512 channels then one channel per class,
  a ReLU between them, and bilinear upsampling of the logits to the input size.
- ``"deeplab_largefov"`` ("Ours-DeepLab" of Table 2): DeepLab-LargeFOV's fc6 (3x3, dilation 12,
  1024 channels) and fc7 (1x1, 1024 channels) belong to the ``vgg16`` backbone, so only its fc8
  is left for the head: a 1x1 classifier, followed by the same bilinear upsampling. It runs on any
  backbone but is meant for ``vgg16``.

Score averaging (A.2 "score maps ... aggregated by pixel-wise average-pooling"): we average the
*softmax probabilities* of the 10 versions (5 scales x flip), not the logits. Probabilities are
bounded, so one scale with unusually large logits (objects near the training scale give sharper
outputs) cannot outvote the others, and the averaged map is already the input the dense CRF takes.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import normalize
from ..ops.crf import dense_crf_with
from ..ops.multiscale import multiscale_maps
from ..registry import Registry

# Segmentation heads (config key ``segmentation.head``): a builder ``(in_channels, num_classes,
# head_channels, dilation, dropout) -> nn.Sequential`` whose last layer is the classifier.
HEADS = Registry("segmentation head")
register_head = HEADS.register
CHECKPOINT_KIND = "segmentation"
# What a segmentation model.pt's meta must hold so that inference needs no config.
META_KEYS = ("class_names", "mean", "std", "backbone", "output_stride", "head", "num_classes")
SEGMENTATION_DILATION = 12   # the head's dilation at output stride 8 (Section 4.2)


def _dropout(rate: float) -> nn.Module:
    return nn.Dropout2d(rate) if rate else nn.Identity()


@register_head("resnet38", description="two 3x3 atrous convolutions, dilation 12 (Section 4.2)")
def resnet38_head(in_channels: int, num_classes: int, head_channels: int, dilation: int,
                  dropout: float) -> nn.Sequential:
    head = nn.Sequential(
        _dropout(dropout),
        nn.Conv2d(in_channels, head_channels, 3, padding=dilation, dilation=dilation),
        nn.ReLU(inplace=True),
        _dropout(dropout),
        nn.Conv2d(head_channels, num_classes, 3, padding=dilation, dilation=dilation),
    )
    nn.init.kaiming_normal_(head[1].weight, nonlinearity="relu")
    nn.init.zeros_(head[1].bias)
    return head


@register_head("deeplab_largefov", description="DeepLab-LargeFOV's fc8: a 1x1 classifier (fc6, fc7 are vgg16's)")
def deeplab_largefov_head(in_channels: int, num_classes: int, head_channels: int, dilation: int,
                          dropout: float) -> nn.Sequential:
    return nn.Sequential(_dropout(dropout), nn.Conv2d(in_channels, num_classes, 1))


class SegmentationNet(nn.Module):
    """Backbone + segmentation head; ``forward`` returns logits (N, C, H, W) at the input size.

    ``head_channels`` and ``dilation`` are the 512 and 12 of 4.2 (``resnet38`` head only).
    ``dropout`` (default off; the paper mentions none) is applied to the features entering each
    conv of the head during training.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "resnet38",
                 head_channels: int = 512, dilation: int = SEGMENTATION_DILATION, dropout: float = 0.0):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown segmentation head '{head}' (choose from {', '.join(HEADS.names())})")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + objects), got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head_name = head
        self.head = HEADS.build(head, backbone.out_channels[-1], num_classes, head_channels, dilation, dropout)
        # A small classifier init keeps the first softmax near uniform, so early Adam steps
        # are not spent undoing a random preference for some class.
        classifier = self.head[-1]
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the backbone's output stride (N, C, h, w)."""
        return self.head(self.backbone(images)[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits bilinearly upsampled to the input size (A.1, Fig. 7d); any size, odd included."""
        logits = self.scores(images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())


# What inference runs: the network, or anything called as it is, a batch (N, 3, h, w) to logits
# (N, C, h, w): the exported network in onnxruntime (onnx_model.OnnxSegmentationNet). Scales,
# flips, resizing and averaging below are the same for both.
Forward = Callable[[torch.Tensor], torch.Tensor]


def input_device(model: Forward) -> torch.device:
    """Where ``model`` takes its inputs: a callable's ``device`` attribute (the ONNX network's),
    else the device of the module's parameters."""
    device = getattr(model, "device", None)
    return device if device is not None else next(model.parameters()).device


@torch.no_grad()
def predict_scores(model: Forward, image: torch.Tensor, scales: Sequence[float] = (1.0,),
                   flip: bool = False) -> torch.Tensor:
    """Class probabilities (C, H, W) of one normalised image (3, H, W): the mean over scales x
    flips of the softmax of the network's output, each resized to the image (A.2). ``model``:
    the network or another :data:`Forward`."""
    maps = multiscale_maps(lambda batch: torch.softmax(model(batch), dim=1), image, scales, flip)
    return torch.stack(maps).mean(0)


def predict_labels(model: Forward, image: np.ndarray, mean: Sequence[float], std: Sequence[float],
                   scales: Sequence[float] = (1.0,), flip: bool = False,
                   crf: Mapping[str, Any] | None = None) -> np.ndarray:
    """Label map uint8 (H, W) of an RGB uint8 image: argmax of :func:`predict_scores`, refined by
    the dense CRF first when ``crf`` (a config ``crf`` section, ``{}`` for the defaults) is given.
    ``model``: the network or another :data:`Forward` (the ONNX one)."""
    probs = predict_scores(model, normalize(image, mean, std).to(input_device(model)), scales, flip)
    if crf is not None:
        refined = dense_crf_with(image, probs.cpu().numpy(), crf)
        return refined.argmax(0).astype(np.uint8)
    return probs.argmax(0).to(torch.uint8).cpu().numpy()
