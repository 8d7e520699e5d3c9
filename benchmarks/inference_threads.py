"""Inference speed of ``infer-cam`` and ``predict`` (images/s) at 1, 2 and 4 threads, with the
image and its mirror in one forward pass (as the pipeline runs them) or in two, and in NCHW or
channels-last (NHWC) memory layout, and in float32 or under autocast (``--amp bf16``: on a CPU
with native bf16), side by side in one run.

    python -m benchmarks.inference_threads [--config msrc21] [--rounds 3] [--images 2] [--thread-counts 1 2 4]
                                           [--amp off bf16] [key=value ...]
    # key=value: e.g. backbone.name=efficientnet_lite2

Each case does what the stage does per image after loading it: ``infer-cam``'s multi-scale +
flip CAMs of two classes (``cam.infer_cams`` with the config's ``cam.scales``), and ``predict``'s
multi-scale + flip class scores and labels (``segmentation.predict_labels`` with
``segmentation.scales``), at MSRC-21's image size (320x213). Random weights: speed does not
depend on their values. Rounds interleave the cases so that a swing in the machine's speed hits
all of them; each rate is the best round's. The ratio is to the pipeline's settings on this
machine's cores (all threads, mirror batched, NHWC). ``--threads N`` stands for "all cores" (the
pipeline's setting, default torch's); ``--thread-counts`` are the counts timed beside it.
"""
from __future__ import annotations

import copy
import time

import affinitynet  # noqa: F401  (before torch: the pipeline's OpenMP spin count)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from affinitynet.models.cam import infer_cams  # noqa: E402
from affinitynet.config import load_config  # noqa: E402
from affinitynet.models.networks import build_network  # noqa: E402
from affinitynet.engine.precision import AMP_CHOICES, for_inference  # noqa: E402
from affinitynet.models.segmentation import predict_labels  # noqa: E402

from .common import Benchmark  # noqa: E402

NUM_CLASSES = 15          # MSRC-21's object protocol: 14 classes + background
HEIGHT, WIDTH = 213, 320  # MSRC-21's images


class OneAtATime(nn.Module):
    """The network run on each image of a batch separately: the image and its mirror as two
    forward passes, as before they were batched."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.backbone = model.backbone

    def forward(self, batch):
        return torch.cat([self.model(image[None]) for image in batch])

    def cams(self, batch):
        return torch.cat([self.model.cams(image[None]) for image in batch])


def cases(config: dict, cores: int, thread_counts: list[int], amps: list[str]) -> dict[str, tuple[int, object]]:
    """name -> (threads, one image's work). Every ``amps`` setting but ``off`` is timed on all
    cores, mirror batched, in both layouts."""
    torch.manual_seed(0)
    cam_net = build_network("cam", config, NUM_CLASSES, pretrained=False).eval()
    seg_net = build_network("segmentation", config, NUM_CLASSES, pretrained=False).eval()
    cpu = torch.device("cpu")
    image = torch.randint(0, 256, (HEIGHT, WIDTH, 3), dtype=torch.uint8).numpy()
    tensor = torch.randn(3, HEIGHT, WIDTH)
    cam_scales, seg_scales = config["cam"]["scales"], config["segmentation"]["scales"]
    mean, std = seg_net.backbone.mean, seg_net.backbone.std

    def cam_work(model):
        return lambda: infer_cams(model, tensor, [1, 2], cam_scales, True)

    def seg_work(model):
        return lambda: predict_labels(model, image, mean, std, seg_scales, True)

    layouts = {"NHWC": "on", "NCHW": "off"}
    out = {}
    for stage, net, work, methods in (("infer-cam", cam_net, cam_work, ("cams",)),
                                      ("predict", seg_net, seg_work, ())):
        for layout, setting in layouts.items():
            # A copy per layout: converting a module to channels-last is in place, and a
            # convolution with channels-last weights runs NHWC whatever its input's layout.
            model = for_inference(copy.deepcopy(net), cpu, "off", setting, methods=methods)
            for threads in sorted({*thread_counts, cores}):
                out[f"{stage:9s} {threads} threads, mirror batched, {layout}"] = (threads, work(model))
            out[f"{stage:9s} {cores} threads, mirror apart,   {layout}"] = (cores, work(OneAtATime(model)))
            for amp in amps:
                if amp != "off":
                    model = for_inference(copy.deepcopy(net), cpu, amp, setting, methods=methods)
                    out[f"{stage:9s} {cores} threads, mirror batched, {layout}, amp={amp}"] = (cores, work(model))
    return out


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("--config", default="msrc21")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=2, help="images timed per case and round")
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2, 4],
                        help="thread counts timed besides all cores (--threads)")
    parser.add_argument("--amp", nargs="+", default=["off"], choices=AMP_CHOICES,
                        help="autocast settings timed besides float32 (off), e.g. --amp off bf16 on a CPU "
                             "with native bf16 (AMX or AVX512-BF16)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. backbone.name=efficientnet_lite2")
    args = bench.parse(argv)
    cores = torch.get_num_threads()
    config = load_config(args.config, args.overrides, check=False)
    table = cases(config, cores, args.thread_counts, args.amp)
    best = dict.fromkeys(table, float("inf"))
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, (threads, work) in table.items():
                torch.set_num_threads(threads)
                work()   # warm-up at this thread count
                started = time.perf_counter()
                for _ in range(args.images):
                    work()
                best[name] = min(best[name], (time.perf_counter() - started) / args.images)
    torch.set_num_threads(cores)
    print(f"torch {torch.__version__}, {cores} cores, config {args.config}, {config['backbone']['name']}: "
          f"cam.scales {config['cam']['scales']}, segmentation.scales {config['segmentation']['scales']}, "
          f"each with its mirror, {WIDTH}x{HEIGHT} images")
    for stage in ("infer-cam", "predict"):
        reference = best[f"{stage:9s} {cores} threads, mirror batched, NHWC"]
        for name, seconds in best.items():
            if name.startswith(stage):
                print(f"  {name}  {1 / seconds:6.2f} images/s  x{reference / seconds:5.2f}")
    print(f"x: the rate over the pipeline's settings ({cores} threads, mirror batched, NHWC, float32) "
          "in the same rounds")
    rates = {}
    for stage in ("infer-cam", "predict"):
        reference = best[f"{stage:9s} {cores} threads, mirror batched, NHWC"]
        rates.update({" ".join(name.split()): {"images_per_second": 1 / seconds, "x_pipeline": reference / seconds}
                      for name, seconds in best.items() if name.startswith(stage)})
    summary = {f"{stage} images/s ({cores} threads, NHWC)":
               1 / best[f"{stage:9s} {cores} threads, mirror batched, NHWC"] for stage in ("infer-cam", "predict")}
    bench.write({"config": args.config, "backbone": config["backbone"]["name"], "cores": cores,
                 "cam_scales": config["cam"]["scales"], "segmentation_scales": config["segmentation"]["scales"],
                 "image": [WIDTH, HEIGHT], "cases": rates, "summary": summary})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
