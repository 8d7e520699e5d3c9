"""IRN's semantic walk at stride 4 on a 500x500 image (a 125x125 grid; radius 5, beta 10,
t = 256): this project's exact sparse walk against the dense walk of irn's released code, side by
side in one run, on the CPU.

    python -m benchmarks.irn_walk [--size 500] [--classes 21] [--threads 2]

irn (``make_sem_seg_labels.py``, ``misc/indexing.py``) builds the affinities ``1 - max B`` of
every pair within the radius into a dense N x N matrix (N = h w, the identity on its diagonal),
raises it to beta, normalises it per column, squares it log2(t) = 8 times and multiplies the
class maps by it. That formulation is written here from that description (``dense_walk``), not
copied. At 125x125 one float32 matrix is 0.98 GB and every squaring is 2 N^3 = 7.6e12 FLOP, so
the dense side takes minutes and gigabytes: it is run once, in its own process.

Printed: each side's wall time (the sparse walk best of 3) and peak memory (each case in a fresh
process: peak RSS minus that of a process making the same imports and inputs), their ratio, and
the largest difference between the two results (the sparse walk is exact). Targets: the sparse
walk <= 300 MB and >= 20x faster than the dense one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from affinitynet.ops.inter_pixel import path_max_affinities
from affinitynet.ops.random_walk import neighbour_offsets, random_walk

from .common import Benchmark, module_command, module_env
from .common import reset_peak as _reset_peak
from .common import status_mb as _status_mb

RADIUS, BETA, T = 5, 10.0, 256
warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")


def make_inputs(size: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class maps (classes, h, w) in [0, 1] and a boundary map (h, w) with thin, closed-looking
    ridges (where a smooth random field crosses zero), as a trained boundary branch gives."""
    h = w = math.ceil(size / 4)
    g = torch.Generator().manual_seed(seed)
    cams = torch.rand(classes, h, w, generator=g)
    field = F.interpolate(torch.randn(1, 1, h // 12 + 2, w // 12 + 2, generator=g), size=(h, w),
                          mode="bicubic", align_corners=True)[0, 0]
    boundary = torch.exp(-(field / 0.15) ** 2)
    return cams, boundary


def dense_walk(cams: torch.Tensor, affinities: torch.Tensor, beta: float = BETA, t: int = T) -> torch.Tensor:
    """irn's dense formulation: W (N x N) with W_ii = 1 and W_ij = W_ji = a_ij for the pairs
    within the radius, T = W^beta normalised per column, squared log2(t) times; maps @ T."""
    c, h, w = cams.shape
    n = h * w
    index = torch.arange(n).view(h, w)
    dense = torch.eye(n)
    for k, (dy, dx) in enumerate(neighbour_offsets(RADIUS)):
        y1, x0, x1 = h - dy, max(0, -dx), min(w, w - dx)
        if y1 <= 0 or x1 <= x0:
            continue
        src = index[:y1, x0:x1].reshape(-1)
        dst = index[dy:, x0 + dx:x1 + dx].reshape(-1)
        value = affinities[k, :y1, x0:x1].reshape(-1)
        dense[src, dst] = value
        dense[dst, src] = value
    dense.pow_(beta)
    dense /= dense.sum(0, keepdim=True)
    steps = int(round(math.log2(t)))
    if 1 << steps != t:
        raise ValueError("the dense walk squares the matrix: t must be a power of two")
    for _ in range(steps):
        dense = dense @ dense
    return (cams.reshape(c, n) @ dense).view(c, h, w)


def worker(case: str, size: int, classes: int, threads: int) -> None:
    torch.set_num_threads(threads)
    cams, boundary = make_inputs(size, classes)
    affinities = path_max_affinities(boundary, RADIUS)
    result = {"baseline_mb": _status_mb("VmHWM")}
    if case != "baseline":
        reset = _reset_peak()
        before = _status_mb("VmRSS")
        times, out = [], None
        for _ in range(3 if case == "sparse" else 1):
            start = time.perf_counter()
            out = (random_walk(cams, affinities=affinities, radius=RADIUS, beta=BETA, t=T) if case == "sparse"
                   else dense_walk(cams, affinities))
            times.append(time.perf_counter() - start)
        result.update(seconds=min(times), all_seconds=times,
                      during_mb=_status_mb("VmHWM") - before if reset else None)
        torch.save(out, os.environ["IRN_WALK_OUT"] + f".{case}.pt")
    result["peak_mb"] = _status_mb("VmHWM")
    print(json.dumps(result))


def in_subprocess(case: str, args, threads: int, out: str) -> dict:
    done = subprocess.run(module_command(__file__, "--worker", case, "--size", str(args.size),
                                         "--classes", str(args.classes), "--threads", str(threads)),
                          check=True, capture_output=True, text=True, env=module_env({"IRN_WALK_OUT": out}))
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("--size", type=int, default=500, help="image side in pixels (the grid is a quarter of it)")
    parser.add_argument("--classes", type=int, default=21, help="maps walked at once (VOC: 21)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None,
                        help="prefix of the two results, compared at the end (default: in a temporary folder)")
    args = bench.parse(argv)
    threads = torch.get_num_threads()
    if args.worker:
        worker(args.worker, args.size, args.classes, threads)
        return 0
    scratch = None if args.out else tempfile.mkdtemp(prefix="affinitynet-irn-walk-")
    out = args.out or os.path.join(scratch, "walk")
    try:
        return compare(bench, args, threads, out)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def compare(bench: Benchmark, args, threads: int, out: str) -> int:
    side = math.ceil(args.size / 4)
    n = side * side
    print(f"torch {torch.__version__}, {threads} threads, {args.size}x{args.size} image -> {side}x{side} grid "
          f"(N = {n}), {args.classes} maps, radius {RADIUS}, beta {BETA:g}, t {T}, float32")
    print(f"dense: one N x N matrix {n * n * 4 / 1e9:.2f} GB, {int(math.log2(T))} squarings of "
          f"{2 * n ** 3:.1e} FLOP each")
    base = in_subprocess("baseline", args, threads, out)
    sparse = in_subprocess("sparse", args, threads, out)
    dense = in_subprocess("dense", args, threads, out)
    a = torch.load(out + ".sparse.pt", weights_only=True).double()
    b = torch.load(out + ".dense.pt", weights_only=True).double()
    difference = float((a - b).abs().max())
    sparse_mb, dense_mb = sparse["peak_mb"] - base["peak_mb"], dense["peak_mb"] - base["peak_mb"]
    ratio = dense["seconds"] / sparse["seconds"]
    print(f"sparse walk (this project): {sparse['seconds']:8.2f} s (best of 3: "
          f"{', '.join(f'{s:.2f}' for s in sparse['all_seconds'])}), peak +{sparse_mb:7.1f} MB")
    print(f"dense walk (irn's):         {dense['seconds']:8.2f} s, peak +{dense_mb:7.1f} MB")
    print(f"speed-up {ratio:.0f}x, memory {dense_mb / max(sparse_mb, 1e-9):.0f}x less; "
          f"largest difference of the results {difference:.1e} (maps in [0, 1])")
    print(f"targets: sparse <= 300 MB: {'PASS' if sparse_mb <= 300 else 'FAIL'}; "
          f">= 20x faster: {'PASS' if ratio >= 20 else 'FAIL'}")
    figures = {"sparse_seconds": sparse["seconds"], "dense_seconds": dense["seconds"], "ratio": ratio,
               "sparse_peak_mb": sparse_mb, "dense_peak_mb": dense_mb, "max_difference": difference}
    print(json.dumps(figures))
    bench.write({"size": args.size, "classes": args.classes, "grid": [side, side], **figures,
                 "sparse_all_seconds": sparse["all_seconds"],
                 "targets": {"sparse <= 300 MB": sparse_mb <= 300, ">= 20x faster": ratio >= 20},
                 "summary": {"sparse walk s": sparse["seconds"], "dense walk s": dense["seconds"],
                             "speed-up": ratio, "sparse peak MB": sparse_mb, "dense peak MB": dense_mb}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
