"""Training throughput of the CPU default backbone's CAM network at the MSRC-21 config's crop
size, and the FLOP/s it achieves as a fraction of this machine's float32 matmul peak, both
measured in the same run (this machine's speed swings from minute to minute).

    python -m benchmarks.cam_training [--threads N] [--steps 5]
"""
from __future__ import annotations

import time

import affinitynet  # noqa: F401  (before torch: the pipeline's OpenMP spin count)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from affinitynet.models.backbones import create_backbone, freeze_batchnorm  # noqa: E402
from affinitynet.models.cam import CAMNet  # noqa: E402
from affinitynet.config import load_config  # noqa: E402

from .common import Benchmark, matmul_peak  # noqa: E402


def forward_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    """Multiply-adds x 2 of every convolution in one forward pass, counted from the layers'
    shapes (groups and dilation included). A training step is taken as 3 forward passes
    (forward, gradient of the input, gradient of the weights), the usual estimate."""
    total = 0

    def hook(layer, inputs, output):
        nonlocal total
        kh, kw = layer.kernel_size
        total += 2 * output.numel() * (layer.in_channels // layer.groups) * kh * kw

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    return total


def main(argv: list[str] | None = None) -> None:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--channels-last", action="store_true")
    args = bench.parse(argv)
    threads = torch.get_num_threads()
    config = load_config("msrc21", check=False)
    section, crop, batch = config["cam"], config["cam"]["crop_size"], config["cam"]["batch_size"]
    model = CAMNet(create_backbone("mobilenetv2", 8, pretrained=True), 14, section["head_channels"])
    model.train()
    freeze_batchnorm(model)
    images, targets = torch.randn(batch, 3, crop, crop), (torch.rand(batch, 14) > 0.8).float()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        loss = F.multilabel_soft_margin_loss(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    flops = 3 * forward_flops(model, images)
    peak_before = matmul_peak()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak_after = matmul_peak()
    peak = max(peak_before, peak_after)
    best = min(times)
    achieved = flops / best
    print(f"threads {threads}, channels_last {args.channels_last}, crop {crop}, batch {batch}")
    print(f"training step: {flops / 1e9:.1f} GFLOP, best {best:.2f} s, median {sorted(times)[len(times) // 2]:.2f} s")
    print(f"throughput: {batch / best:.2f} images/s (best step)")
    print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s (before {peak_before / 1e9:.1f}, after {peak_after / 1e9:.1f})")
    print(f"achieved: {achieved / 1e9:.1f} GFLOP/s = {achieved / peak:.2f} of the matmul peak (goal 0.40)")
    bench.write({"channels_last": args.channels_last, "crop": crop, "batch": batch, "step_gflop": flops / 1e9,
                 "step_seconds": times, "images_per_second": batch / best,
                 "matmul_peak_gflops": peak / 1e9, "matmul_peak_before_after_gflops": [peak_before / 1e9, peak_after / 1e9],
                 "achieved_gflops": achieved / 1e9, "fraction_of_peak": achieved / peak,
                 "summary": {"images/s": batch / best, "GFLOP/s": achieved / 1e9, "of the matmul peak": achieved / peak}})


if __name__ == "__main__":
    main()
