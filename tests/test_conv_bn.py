"""Convolution + frozen BatchNorm as one convolution, and the depthwise convolution's own backward
pass (``backbones/conv_bn.py``): the same values and gradients as the separate modules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from affinitynet.models.backbones import freeze_batchnorm
from affinitynet.models.backbones.conv_bn import DepthwiseConvolution, conv_bn, convolve
from affinitynet.models.backbones.efficientnet_lite import MBConv
from affinitynet.models.backbones.mobilenetv2 import ConvBNReLU6, InvertedResidual


def random_statistics(module: nn.Module, seed: int = 0) -> None:
    """BatchNorms with statistics and affine parameters far from the identity."""
    g = torch.Generator().manual_seed(seed)
    for layer in module.modules():
        if isinstance(layer, nn.BatchNorm2d):
            n = layer.num_features
            layer.running_mean.copy_(torch.randn(n, generator=g))
            layer.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.1)
            layer.weight.data.copy_(torch.randn(n, generator=g))
            layer.bias.data.copy_(torch.randn(n, generator=g))


def gradients(output: torch.Tensor, inputs) -> list[torch.Tensor]:
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(output, inputs, upstream)


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("trainable", [False, True])
def test_folded_conv_bn_matches_separate_modules(groups, trainable):
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=groups, bias=False), nn.BatchNorm2d(8)
    random_statistics(bn)
    bn.eval()
    bn.requires_grad_(trainable)
    x = torch.randn(2, 8, 9, 7, requires_grad=True)
    params = [x, conv.weight] + ([bn.weight, bn.bias] if trainable else [])
    reference = bn(conv(x))
    fused = conv_bn(x, conv, bn)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)
    for a, b in zip(gradients(fused, params), gradients(reference, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_batchnorm_in_training_mode_is_not_folded():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    out = conv_bn(x, conv, bn)
    # Batch statistics: every channel has mean 0 over the batch, which running statistics would not give.
    torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(4), atol=1e-6, rtol=0)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("kernel,dilation", [(3, 1), (3, 2), (3, 4), (5, 1), (5, 2)])
def test_depthwise_backward_against_finite_differences(kernel, dilation):
    """gradcheck: the analytic backward pass against central differences, in float64."""
    torch.manual_seed(0)
    padding = dilation * (kernel - 1) // 2
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 1, kernel, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, w, b: DepthwiseConvolution.apply(a, w, b, (padding, padding), (dilation, dilation)),
        (x, weight, bias))


@pytest.mark.parametrize("dilation", [1, 4])
def test_depthwise_matches_native_convolution(dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=dilation, dilation=dilation, groups=16, bias=False)
    x = torch.randn(2, 16, 12, 10, requires_grad=True)
    out = convolve(conv, x, conv.weight, None)
    assert type(out.grad_fn).__name__ == "DepthwiseConvolutionBackward"
    reference = F.conv2d(x, conv.weight, None, 1, dilation, dilation, 16)
    torch.testing.assert_close(out, reference)
    for a, b in zip(gradients(out, [x, conv.weight]), gradients(reference, [x, conv.weight])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_other_convolutions_keep_torch_kernels():
    strided = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False)
    dense = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    x = torch.randn(1, 8, 8, 8, requires_grad=True)
    for conv in (strided, dense):
        assert type(convolve(conv, x, conv.weight, None).grad_fn).__name__ == "ConvolutionBackward0"
    with torch.no_grad():   # inference: the forward pass is torch's in any case
        assert convolve(dense, x, dense.weight, None).grad_fn is None


def unfused_mobilenet_block(block: InvertedResidual, x: torch.Tensor) -> torch.Tensor:
    out = x
    for layer in block.conv:
        out = nn.Sequential.forward(layer, out) if isinstance(layer, ConvBNReLU6) else layer(out)
    return x + out if block.use_residual else out


def unfused_lite_block(block: MBConv, x: torch.Tensor) -> torch.Tensor:
    out = x
    if block.has_expansion:
        out = F.relu6(block._bn0(block._expand_conv(out)))
    depthwise = block._depthwise_conv
    out = F.relu6(block._bn1(F.conv2d(depthwise.same_pad(out), depthwise.weight, None, depthwise.stride,
                                      depthwise.padding, depthwise.dilation, depthwise.groups)))
    out = block._bn2(block._project_conv(out))
    return x + out if block.use_residual else out


@pytest.mark.parametrize("make,reference", [
    (lambda: InvertedResidual(16, 16, 1, 2, 6), unfused_mobilenet_block),
    (lambda: InvertedResidual(16, 24, 2, 1, 6), unfused_mobilenet_block),
    (lambda: MBConv(16, 16, 5, 1, 2, 6), unfused_lite_block),
    (lambda: MBConv(16, 24, 3, 2, 1, 6), unfused_lite_block),
])
def test_backbone_blocks_compute_what_their_modules_do(make, reference):
    """The blocks with folded, frozen BatchNorm: the values and gradients of the layer-by-layer
    computation (train mode with frozen BatchNorm, as every training stage runs them)."""
    torch.manual_seed(0)
    block = make()
    random_statistics(block)
    block.train()
    freeze_batchnorm(block)
    x = torch.randn(2, 16, 13, 11, requires_grad=True)
    params = [x] + [p for p in block.parameters() if p.requires_grad]
    out, expected = block(x), reference(block, x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(gradients(out, params), gradients(expected, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
