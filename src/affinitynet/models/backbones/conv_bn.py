"""A convolution and the frozen BatchNorm after it, run as one convolution, and a depthwise
convolution whose CPU backward pass costs what its forward pass does.

The same function is computed as with ``bn(conv(x))``; only the rounding of float32 differs
(``tests/test_conv_bn.py`` checks values and gradients against the separate modules, and the
backward pass against finite differences). Both are for speed on the CPU, where
``benchmarks/stage_throughput.py`` found the time of the MobileNetV2 networks going to (the
figures: docs/performance.md, "Kept: frozen BatchNorm folded" and "Kept: the depthwise
convolutions' backward pass"):

- the BatchNorms: in eval mode (the paper's frozen BatchNorm, ``freeze_batchnorm``) each is the
  affine map ``x * scale + shift``, which folds into the convolution before it
  (``W' = W * scale``, ``b' = shift``), and the separate normalisation and its backward pass go;
- the depthwise convolutions' backward pass: oneDNN's took many times their forward pass at
  output stride 8 (dilated maps). For stride 1 the input gradient is the same depthwise
  convolution with the kernel flipped (one fast forward call), and the weight gradient is, per
  kernel tap, a sum of products of the output gradient and the shifted input.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

_FUSED = [True]


@contextlib.contextmanager
def separate_modules():
    """Within the block, :func:`conv_bn` runs ``bn(conv(x))`` with torch's kernels: the
    computation before this module, which ``benchmarks/stage_throughput.py`` times beside it."""
    _FUSED.append(False)
    try:
        yield
    finally:
        _FUSED.pop()


def folded(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of ``conv`` followed by ``bn`` in eval mode: ``bn(conv(x))`` is the
    convolution of ``x`` with them. Differentiable in ``conv``'s and ``bn``'s parameters."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv.weight * scale.view(-1, 1, 1, 1), shift


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``bn(conv(x))``: one convolution when ``bn`` is in eval mode (its running statistics).
    ``x`` is what ``conv``'s convolution reads (already padded, where a convolution pads itself
    before convolving)."""
    if not _FUSED[-1]:
        return bn(conv._conv_forward(x, conv.weight, conv.bias))
    if bn.training:
        return bn(convolve(conv, x, conv.weight, conv.bias))
    weight, bias = folded(conv, bn)
    return convolve(conv, x, weight, bias)


def convolve(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv``'s convolution (stride, padding, dilation, groups) of ``x`` with ``weight`` and
    ``bias``; a stride-1 depthwise one that needs gradients on the CPU goes through
    :class:`DepthwiseConvolution`."""
    if _depthwise_on_cpu(conv, x) and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return DepthwiseConvolution.apply(x, weight, bias, conv.padding, conv.dilation)
    return conv._conv_forward(x, weight, bias)


def _depthwise_on_cpu(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    # float32 only: under CPU autocast (amp=bf16) oneDNN's bfloat16 depthwise backward pass was
    # the faster one on a CPU with AMX (docs/performance.md, "Kept: the depthwise convolutions'
    # backward pass").
    kernel, padding, dilation = conv.kernel_size, conv.padding, conv.dilation
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4
            and conv.groups == conv.in_channels == conv.out_channels and conv.stride == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(padding, str)
            # "same" padding: the flipped kernel then needs the same padding for the input gradient
            and all(k % 2 == 1 and p == d * (k - 1) // 2 for k, p, d in zip(kernel, padding, dilation)))


class DepthwiseConvolution(torch.autograd.Function):
    """Stride-1, "same"-padded depthwise convolution (CPU, float32) with a backward pass made of
    one depthwise convolution (the input gradient) and one product-and-sum per kernel tap (the
    weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = tuple(padding), tuple(dilation), bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        (pad_y, pad_x), (dil_y, dil_x) = ctx.padding, ctx.dilation
        channels, _, kernel_y, kernel_x = weight.shape
        grad = grad.contiguous()
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Each input pixel reached the outputs at minus the taps' offsets: the correlation
            # with the point-reflected kernel, "same"-padded again.
            grad_x = F.conv2d(grad, weight.flip(2, 3), None, 1, ctx.padding, ctx.dilation, channels)
        if ctx.needs_input_grad[1]:
            height, width = x.shape[2:]
            padded = F.pad(x, (pad_x, pad_x, pad_y, pad_y))
            taps = [(grad * padded[:, :, i * dil_y:i * dil_y + height, j * dil_x:j * dil_x + width]).sum((0, 2, 3))
                    for i in range(kernel_y) for j in range(kernel_x)]
            grad_weight = torch.stack(taps, 1).view_as(weight)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None
