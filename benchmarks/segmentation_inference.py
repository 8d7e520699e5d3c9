"""Segmentation inference speed (images/s): single scale versus the 5 scales x flip of Appendix A.2,
at the MSRC image size (320x213) and the VOC one (500x375).

    python -m benchmarks.segmentation_inference [--backbone mobilenetv2] [--device cpu] [--images 5]

Random weights (``pretrained=False``): speed does not depend on the weights' values. The timing
covers what ``affinitynet predict`` does per image after loading it: normalisation, the network
on every version, softmax averaging and argmax.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from affinitynet.models.networks import build_segmentation_model
from affinitynet.models.segmentation import predict_labels
from affinitynet.engine.training import resolve_device

from .common import ANY_DEVICE, Benchmark

SIZES = {"MSRC 320x213": (213, 320), "VOC 500x375": (375, 500)}
SETTINGS = {"single scale": ([1.0], False), "5 scales x flip": ([0.5, 0.75, 1.0, 1.25, 1.5], True)}


def images_per_second(model, image, mean, std, scales, flip, count: int, device) -> float:
    """1 / the median time per image: on a shared machine the median shrugs off the images that
    another process slowed down, where a mean would not."""
    predict_labels(model, image, mean, std, scales, flip)  # warm-up: allocator, kernels
    times = []
    for _ in range(count):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        predict_labels(model, image, mean, std, scales, flip)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 1.0 / float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    bench = Benchmark(__file__, __doc__, devices=ANY_DEVICE)
    parser = bench.parser
    parser.add_argument("--backbone", default="mobilenetv2")
    parser.add_argument("--head", default="resnet38", choices=["resnet38", "deeplab_largefov"])
    parser.add_argument("--classes", type=int, default=21, help="output classes (VOC: 21)")
    parser.add_argument("--images", type=int, default=5, help="timed images per setting")
    args = bench.parse(argv)
    device = resolve_device(args.device)
    model = build_segmentation_model(args.backbone, 8, args.classes, args.head, pretrained=False).to(device).eval()
    mean, std = model.backbone.mean, model.backbone.std
    rng = np.random.default_rng(0)
    print(f"segmentation inference (median over images): {args.backbone} (output stride 8), head {args.head}, {args.classes} classes, "
          f"{device}, {torch.get_num_threads()} threads, {args.images} images per setting")
    print(f"{'size':14s} {'single scale':>14s} {'5 scales x flip':>16s} {'ratio':>7s}")
    table = {}
    for name, (height, width) in SIZES.items():
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        speeds = {setting: images_per_second(model, image, mean, std, scales, flip, args.images, device)
                  for setting, (scales, flip) in SETTINGS.items()}
        single, multi = speeds["single scale"], speeds["5 scales x flip"]
        print(f"{name:14s} {single:10.2f} im/s {multi:12.2f} im/s {single / multi:6.1f}x")
        table[name] = {"single_scale_images_per_second": single, "multiscale_flip_images_per_second": multi}
    bench.write({"backbone": args.backbone, "head": args.head, "classes": args.classes, "images": args.images,
                 "sizes": table,
                 "summary": {f"{name}, images/s (1 scale / 5 x flip)": [v["single_scale_images_per_second"],
                                                                        v["multiscale_flip_images_per_second"]]
                             for name, v in table.items()}})


if __name__ == "__main__":
    main()
