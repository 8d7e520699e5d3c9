"""Training speed of the CPU backbones side by side: forward + backward images/s of MobileNetV2,
EfficientNet-Lite0 and EfficientNet-Lite2 at output stride 8, 224x224, batch 8, frozen BatchNorm
(the pipeline's training setting), with each one's ratio to MobileNetV2 and its forward GMACs.

    python -m benchmarks.backbone_speed [--threads 1] [--steps 2] [--size 224] [--batch 8]

A warm-up step and two timed ones per backbone: about a minute and a quarter on a quiet core,
longer when other processes share it.

Random weights (``pretrained=False``): speed does not depend on the weights' values. The loss is
the mean of the last level, so the backward pass reaches every layer as in CAM training, without
a head to add its own cost. ImageNet top-1 of the weights for reference: MobileNetV2 71.9
(torchvision), Lite0 75.1, Lite2 77.6 (TensorFlow's EfficientNet-Lite README).
"""
from __future__ import annotations

import time

import affinitynet  # noqa: F401  (before torch: the pipeline's OpenMP spin count)

import torch  # noqa: E402

from affinitynet.models.backbones import create_backbone, freeze_batchnorm  # noqa: E402

from .common import Benchmark  # noqa: E402

NAMES = ("mobilenetv2", "efficientnet_lite0", "efficientnet_lite2")


def forward_macs(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Multiply-adds of every convolution in one forward pass, from the layers' shapes."""
    total = 0

    def hook(layer, inputs, output):
        nonlocal total
        kh, kw = layer.kernel_size
        total += output.numel() * (layer.in_channels // layer.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return total


def train_step(model: torch.nn.Module, images: torch.Tensor) -> float:
    started = time.perf_counter()
    model.zero_grad(set_to_none=True)
    model(images)[-1].mean().backward()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("--steps", type=int, default=2, help="timed steps per backbone")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    args = bench.parse(argv)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size)

    models = {}
    for name in NAMES:
        model = create_backbone(name, output_stride=8, pretrained=False)
        model.train()
        freeze_batchnorm(model)
        models[name] = model
    macs = {name: forward_macs(model, images[:1]) for name, model in models.items()}
    for model in models.values():
        train_step(model, images)  # warm-up: allocator, kernels prepared for these shapes
    # Round robin, so that a slow minute of this shared machine falls on every backbone alike;
    # the fastest step per backbone is the one least disturbed by other processes.
    times: dict[str, list[float]] = {name: [] for name in NAMES}
    for _ in range(args.steps):
        for name, model in models.items():
            times[name].append(train_step(model, images))

    speed = {name: args.batch / min(times[name]) for name in NAMES}
    print(f"forward + backward, {args.size}x{args.size}, batch {args.batch}, output stride 8, "
          f"{threads} thread(s), best of {args.steps} steps")
    print(f"{'backbone':<20} {'GMACs/img':>9} {'images/s':>9} {'vs mobilenetv2':>15}")
    for name in NAMES:
        print(f"{name:<20} {macs[name] / 1e9:>9.2f} {speed[name]:>9.2f} "
              f"{speed[name] / speed['mobilenetv2']:>14.2f}x")
    bench.write({"size": args.size, "batch": args.batch, "steps": args.steps,
                 "backbones": {name: {"forward_gmacs_per_image": macs[name] / 1e9, "images_per_second": speed[name],
                                      "x_mobilenetv2": speed[name] / speed["mobilenetv2"],
                                      "step_seconds": times[name]} for name in NAMES},
                 "summary": {f"{name} images/s (x mobilenetv2)": [speed[name], speed[name] / speed["mobilenetv2"]]
                             for name in NAMES}})


if __name__ == "__main__":
    main()
