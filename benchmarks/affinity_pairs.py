"""Cost of AffinityNet's pair machinery per image, against one CAM-network forward pass.

On a 56x56 feature grid (a 448x448 crop at output stride 8), for batch 1 and 8, times:

- ``labels``:  :func:`pair_labels` on a feature-grid label map (Eq. 4-6),
- ``loss fwd``: :func:`feature_distances` on a 896-channel f_aff + :func:`affinity_loss_from_distances`,
- ``loss f+b``: the same with the backward pass to f_aff,
- ``plain f+b`` (with ``--compare-plain``): the same loss through a plain autograd expression
  (one |f_p - f_q| kept per offset, ~3 GB at batch 8) instead of the package's hand-written
  backward, for comparison,

and one forward pass (no grad) of a CAM network: the ``mobilenetv2`` backbone at output stride 8
with the Section 4.2 head (3x3 conv to 512, GAP, FC) on 448x448 input when the backbone registry
provides it, else a plain conv stack of similar size. Prints milliseconds per image and the ratio
to the CAM forward.

    python -m benchmarks.affinity_pairs [--repeats 3] [--device cpu] [--threads 0] [--compare-plain]
"""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from affinitynet.models.affinity import affinity_loss_from_distances, feature_distances, pair_labels
from affinitynet.ops.random_walk import neighbour_offsets

from .common import ANY_DEVICE, Benchmark

GRID = 56
RADIUS = 5
CHANNELS = 896


class _ConvStack(nn.Module):
    """Stand-in backbone with the registry's interface: a list of maps, last at stride 8."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for c_out, stride in [(32, 2), (64, 2), (128, 2), (256, 1), (256, 1), (512, 1)]:
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.ReLU(inplace=True)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.out_channels = (c_in,)

    def forward(self, x):
        return [self.body(x)]


class _CamNet(nn.Module):
    """Section 4.2's CAM network: backbone, 3x3 conv to 512, GAP, FC (20 VOC classes)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Conv2d(backbone.out_channels[-1], 512, 3, padding=1, bias=False)
        self.fc = nn.Linear(512, 20, bias=False)

    def forward(self, x):
        feats = torch.relu(self.head(self.backbone(x)[-1]))
        return self.fc(feats.mean(dim=(2, 3)))


def cam_network(device: torch.device) -> tuple[nn.Module, str]:
    try:
        from affinitynet.models.backbones import create_backbone

        backbone = create_backbone("mobilenetv2", output_stride=8, pretrained=False)
        name = "mobilenetv2 (OS 8) + CAM head"
    except Exception as error:  # noqa: BLE001 - any failure falls back to the stand-in
        print(f"(mobilenetv2 unavailable: {error}; using a conv stack)")
        backbone, name = _ConvStack(), "conv stack (OS 8) + CAM head"
    return _CamNet(backbone).to(device).eval(), name


def blocky_labels(batch: int, device: torch.device) -> torch.Tensor:
    """Label maps with regions of a few classes, background and neutral bands, like real ones."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 4, (batch, 7, 7), generator=g)
    coarse[coarse == 3] = 255
    return coarse.repeat_interleave(8, 1).repeat_interleave(8, 2).to(torch.uint8).to(device)


def plain_distances(features: torch.Tensor) -> torch.Tensor:
    h, w = features.shape[-2:]
    planes = []
    for dy, dx in neighbour_offsets(RADIUS):
        x0, x1 = max(0, -dx), min(w, w - dx)
        d = (features[:, :, : h - dy, x0:x1] - features[:, :, dy:, x0 + dx: x1 + dx]).abs().mean(1)
        planes.append(torch.nn.functional.pad(d, (x0, w - x1, 0, dy), value=float("inf")))
    return torch.stack(planes, 1)


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernels, caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    bench = Benchmark(__file__, __doc__, devices=ANY_DEVICE)
    parser = bench.parser
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compare-plain", action="store_true",
                        help="also time the loss through plain autograd (slow, memory-hungry)")
    args = bench.parse(argv)
    device = torch.device(args.device)
    model, name = cam_network(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, grid {GRID}x{GRID}, "
          f"radius {RADIUS} ({len(neighbour_offsets(RADIUS))} offsets), f_aff {CHANNELS} channels")
    print(f"CAM network: {name}, input 448x448")
    header = f"{'batch':>5} {'what':<10} {'ms/image':>10} {'x CAM fwd':>10}"
    print(header)
    print("-" * len(header))
    table = []
    for batch in args.batches:
        images = torch.randn(batch, 3, 448, 448, device=device)
        with torch.no_grad():
            cam_ms = timed(lambda: model(images), args.repeats, device) * 1000 / batch
        labels = blocky_labels(batch, device)
        masks = pair_labels(labels, RADIUS)
        feats = torch.randn(batch, CHANNELS, GRID, GRID, device=device, requires_grad=True)

        def loss_forward():
            with torch.no_grad():
                affinity_loss_from_distances(feature_distances(feats, RADIUS), **masks)

        def loss_backward(distances=lambda f: feature_distances(f, RADIUS)):
            feats.grad = None
            loss, _ = affinity_loss_from_distances(distances(feats), **masks)
            loss.backward()

        rows = [("CAM fwd", cam_ms)]
        rows.append(("labels", timed(lambda: pair_labels(labels, RADIUS), args.repeats, device)))
        rows.append(("loss fwd", timed(loss_forward, args.repeats, device)))
        rows.append(("loss f+b", timed(loss_backward, args.repeats, device)))
        if args.compare_plain:
            rows.append(("plain f+b", timed(lambda: loss_backward(plain_distances), args.repeats,
                                            device)))
        for what, seconds in rows:
            ms = seconds if what == "CAM fwd" else seconds * 1000 / batch
            print(f"{batch:>5} {what:<10} {ms:>10.2f} {ms / cam_ms:>10.3f}")
            table.append({"batch": batch, "what": what, "ms_per_image": ms, "x_cam_forward": ms / cam_ms})
    largest = max(args.batches)
    bench.write({"cam_network": name, "grid": GRID, "radius": RADIUS, "channels": CHANNELS, "rows": table,
                 "summary": {f"{row['what']}, batch {largest} (x CAM fwd)": row["x_cam_forward"]
                             for row in table if row["batch"] == largest and row["what"] != "CAM fwd"}})


if __name__ == "__main__":
    main()
