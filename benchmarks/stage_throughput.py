"""Where the time goes: each network of the pipeline at its training stage's crop and batch on the
MSRC-21 config, images/s forward and forward + backward + optimizer step, the FLOP/s achieved
(FLOPs counted by ``torch.utils.flop_counter``) and its fraction of this machine's float32 matmul
peak, measured in the same run, for the current settings and for each candidate, side by side.

    python -m benchmarks.stage_throughput [--networks cam affinity segmentation irn]
        [--candidates before current stride8 channels_last bf16 bf16_channels_last threads1 compile]
        [--rounds 3] [--steps 2]

Candidates, each as a ratio to the first one named (``before`` by default): ``before`` (each
BatchNorm and each convolution as its own torch module and kernel, every network trained at
``backbone.output_stride``: the code before ``models/backbones/conv_bn.py`` and before
``train_output_stride`` and ``affinity.backbone_stride``), ``current`` (the pipeline's settings:
each network at the output stride its config trains it at, float32 whatever the config's
``amp`` (the ``bf16`` candidates time that), contiguous tensors, the process's threads, frozen
BatchNorm folded into the convolutions, the depthwise backward pass of ``conv_bn.py``), and each
change on top of ``current``: ``stride8`` (every backbone at
``backbone.output_stride`` again: the CAM and segmentation networks' ``train_output_stride`` and
AffinityNet's ``backbone_stride`` null), ``channels_last`` (the memory layout), ``bf16`` (CPU
autocast to bfloat16, as ``amp=bf16``; where the CPU has native bf16), ``bf16_channels_last``
(both), ``threads1`` (one thread, as each of the benchmark's two processes runs), ``compile``
(``torch.compile``; its compile time is printed apart and not counted in the rate).
``--threads 1`` runs them all on one thread. Rounds interleave the candidates so that a
swing in the machine's speed hits all of them; each rate is the best round's. Random weights
(speed does not depend on their values) and random images of the config's crop size.
"""
from __future__ import annotations

import contextlib
import math
import time

import affinitynet  # noqa: F401  (before torch: the pipeline's OpenMP spin count)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from affinitynet.models.affinity import affinity_loss_from_distances, feature_distances, pair_labels  # noqa: E402
from affinitynet.models.backbones import freeze_batchnorm  # noqa: E402
from affinitynet.models.backbones.conv_bn import separate_modules  # noqa: E402
from affinitynet.config import load_config  # noqa: E402
from affinitynet.models.networks import TRAINED_COARSER, build_network, train_output_stride  # noqa: E402

from .common import Benchmark, matmul_peak  # noqa: E402

NETWORKS = ("cam", "affinity", "segmentation", "irn")
CANDIDATES = ("before", "current", "stride8", "channels_last", "bf16", "bf16_channels_last", "threads1", "compile")
SECTION = {"cam": "cam", "affinity": "affinity", "segmentation": "segmentation", "irn": "irn"}
NUM_CLASSES = 15       # MSRC-21's object protocol: 14 classes + background


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, _transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """FLOPs of a convolution's backward pass: each gradient asked for (input, weight) costs what
    the forward pass does, 2 * N * output positions * the weight's size. torch's own formula
    leaves the groups out of the backward pass and counts a depthwise convolution's gradients
    as a dense one's (33x its forward pass for 32 channels, checked here)."""
    forward = 2 * grad_out_shape[0] * math.prod(grad_out_shape[2:]) * math.prod(w_shape)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


COUNTED = {torch.ops.aten.convolution_backward: conv_backward_flops}


def scalar(output) -> torch.Tensor:
    """A loss that reaches every output of the network (its outputs summed, each averaged)."""
    parts = output if isinstance(output, (tuple, list)) else [output]
    return sum(part.float().mean() for part in parts)


def affinity_loss(radius: int, distance: str, batch: int, crop: int, stride: int):
    """AffinityNet's own loss (Eq. 7-10 on the pair distances of f_aff), on random labels of the
    walk's grid: a third of its training step at backbone stride 16, so it is timed with it."""
    generator = torch.Generator().manual_seed(0)
    side = -(-crop // stride)
    masks = pair_labels(torch.randint(0, 3, (batch, side, side), generator=generator), radius)

    def loss(features: torch.Tensor) -> torch.Tensor:
        distances = feature_distances(features, radius, distance)
        return affinity_loss_from_distances(distances, masks["pos_fg"], masks["pos_bg"], masks["neg"])[0]
    return loss


class Case:
    """One network under one candidate: the model, a batch of images and the two steps: a
    training step at the stride the network trains at (AffinityNet's with its own loss, a third of
    its step; the others' on the sum of their outputs, as their losses cost little beside the
    network), a forward pass at the stride it runs at in inference (the same weights, see
    ``networks.train_output_stride``)."""

    def __init__(self, kind: str, candidate: str, config: dict, threads: int):
        section = config[SECTION[kind]]
        self.kind, self.candidate = kind, candidate
        self.threads = 1 if candidate == "threads1" else threads
        self.batch, crop = int(section["batch_size"]), int(section["crop_size"])
        if candidate in ("before", "stride8"):
            config = {**config, **{name: {**config[name], "train_output_stride": None}
                                   for name in TRAINED_COARSER},
                      "affinity": {**config["affinity"], "backbone_stride": None}}
        torch.manual_seed(0)
        self.model = build_network(kind, config, NUM_CLASSES, pretrained=False, training=True)
        self.inference = self.model
        if train_output_stride(kind, config) != config["backbone"]["output_stride"]:
            self.inference = build_network(kind, config, NUM_CLASSES, pretrained=False)
            self.inference.load_state_dict(self.model.state_dict())
        self.images = torch.randn(self.batch, 3, crop, crop)
        if candidate.endswith("channels_last"):
            self.model = self.model.to(memory_format=torch.channels_last)
            self.inference = self.inference.to(memory_format=torch.channels_last)
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.loss = scalar
        if kind == "affinity":
            self.loss = affinity_loss(section["radius"], section["distance"], self.batch, crop,
                                      config["backbone"]["output_stride"])
        self.trained = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.trained, lr=1e-6, momentum=0.9)
        self.runner, self.forward_runner = self.model, self.inference
        self.compile_seconds = None
        if candidate == "compile":
            self.runner = torch.compile(self.model)
            self.forward_runner = self.runner if self.inference is self.model else torch.compile(self.inference)
            started = time.perf_counter()
            self.train_step()
            self.forward_step()
            self.compile_seconds = time.perf_counter() - started

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.candidate.startswith("bf16"))

    def _modules(self):
        return separate_modules() if self.candidate == "before" else contextlib.nullcontext()

    def train_step(self) -> float:
        torch.set_num_threads(self.threads)
        self.model.train()
        freeze_batchnorm(self.model)
        started = time.perf_counter()
        with self._autocast(), self._modules():
            output = self.runner(self.images)
        # As training.train: the network under autocast, its loss in float32 on float32 outputs.
        loss = self.loss(output.float() if isinstance(output, torch.Tensor) else output)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - started

    def forward_step(self) -> float:
        torch.set_num_threads(self.threads)
        self.inference.eval()
        started = time.perf_counter()
        with torch.no_grad(), self._autocast(), self._modules():
            self.forward_runner(self.images)
        return time.perf_counter() - started

    def flops(self) -> tuple[int, int]:
        """FLOPs of one forward pass (in inference) and of one training forward + backward pass of
        the batch."""
        self.model.train()
        freeze_batchnorm(self.model)
        with FlopCounterMode(display=False, custom_mapping=COUNTED) as counter:
            self.loss(self.model(self.images)).backward()
        both = counter.get_total_flops()
        self.model.zero_grad(set_to_none=True)
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=COUNTED) as counter:
            self.inference.eval()(self.images)
        return counter.get_total_flops(), both


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    parser.add_argument("--candidates", nargs="+",
                        default=["before", "current", "stride8", "channels_last", "bf16", "threads1"],
                        choices=CANDIDATES, help="the first is the one the others are compared with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps of each kind per round")
    parser.add_argument("--config", default="msrc21")
    args = bench.parse(argv)
    threads = torch.get_num_threads()
    config = load_config(args.config, check=False)
    candidates = list(dict.fromkeys(args.candidates))
    base = candidates[0]
    peak_before = matmul_peak()
    print(f"torch {torch.__version__}, {threads} threads, config {args.config}, "
          f"float32 matmul peak {peak_before / 1e9:.0f} GFLOP/s")
    rows = []
    for kind in args.networks:
        cases = {c: Case(kind, c, config, threads) for c in candidates}
        # A candidate at another output stride does other work: each is counted on its own.
        flops = {c: case.flops() for c, case in cases.items()}
        best = {c: [float("inf"), float("inf")] for c in candidates}
        for _ in range(args.rounds):
            for name, case in cases.items():
                for _ in range(args.steps):
                    best[name][0] = min(best[name][0], case.forward_step())
                    best[name][1] = min(best[name][1], case.train_step())
        for name, case in cases.items():
            rows.append((kind, name, case, *flops[name], *best[name], best[base]))
    peak = max(peak_before, matmul_peak())
    print(f"float32 matmul peak (best of before and after): {peak / 1e9:.0f} GFLOP/s\n")
    header = (f"{'network':13s} {'candidate':14s} {'crop x batch':>12s} {'fwd img/s':>9s} {'x':>5s} "
              f"{'train img/s':>11s} {'x':>5s} {'train GFLOP/s':>13s} {'of peak':>7s}")
    print(header)
    print("-" * len(header))
    for kind, name, case, forward_flops, train_flops, forward, train, baseline in rows:
        crop = case.images.shape[-1]
        print(f"{kind:13s} {name:14s} {f'{crop} x {case.batch}':>12s} {case.batch / forward:9.2f} "
              f"{baseline[0] / forward:5.2f} {case.batch / train:11.2f} {baseline[1] / train:5.2f} "
              f"{train_flops / train / 1e9:13.1f} {train_flops / train / peak:7.2f}"
              + (f"   (compile {case.compile_seconds:.0f} s)" if case.compile_seconds else ""))
    print(f"\nx: the rate over {base}'s rate, measured in the same rounds. FLOPs per "
          "image: " + ", ".join(f"{kind} ({name}) {train / case.batch / 1e9:.1f} GFLOP to train, "
                               f"{fwd / case.batch / 1e9:.1f} forward"
                               for kind, name, case, fwd, train, *_ in rows if name in (base, "current")))
    table = [{"network": kind, "candidate": name, "crop": case.images.shape[-1], "batch": case.batch,
              "forward_images_per_second": case.batch / forward, "x_forward": baseline[0] / forward,
              "train_images_per_second": case.batch / train, "x_train": baseline[1] / train,
              "train_gflops": train_flops / train / 1e9, "of_peak": train_flops / train / peak,
              "forward_gflop_per_image": forward_flops / case.batch / 1e9,
              "train_gflop_per_image": train_flops / case.batch / 1e9, "compile_seconds": case.compile_seconds}
             for kind, name, case, forward_flops, train_flops, forward, train, baseline in rows]
    bench.write({"config": args.config, "baseline": base, "matmul_peak_gflops": peak / 1e9, "rows": table,
                 "summary": {f"{row['network']} train images/s (current, x {base})":
                             [row["train_images_per_second"], row["x_train"]]
                             for row in table if row["candidate"] == "current"}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
