"""``affinitynet predict`` with the exported network in onnxruntime against ``model.pt`` in PyTorch:
images/s of each on MSRC-21's val images, and their ratio, at each thread count (issue 39).

    python -m benchmarks.onnx_predict RUN_DIR/train_seg/model.pt [--thread-counts 1 2] [--rounds 3]
        [--scales 1.0] [--no-flip] [--device cpu] [--data /tmp/affinitynet-msrc21] [--json PATH]

The model is exported to a temporary .onnx first (``affinitynet export``'s code). Each engine does
what ``predict`` does per image after loading it (``segmentation.predict_labels``: normalisation,
the network on every scale and its mirror, resizing, softmax averaging, argmax), at predict's
default scales (1.0, with the flip) unless told otherwise. The scaffolding around the network is
the same code for both, run by PyTorch on the same threads; only the network differs.

Rounds alternate the engines (PyTorch first in even rounds, onnxruntime first in odd ones) so
that a swing in the machine's speed hits both; each round gives a rate per engine over all the
images and their ratio, and the figures are the medians over the rounds. The labels of the two
are compared too (the fraction of equal pixels). MSRC-21 is unpacked outside the repository
(``--data``; its licence forbids committing it).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import affinitynet  # noqa: F401  (before torch: the pipeline's OpenMP spin count)

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402

from affinitynet.data.datasets.msrc21 import build_msrc21, ensure_msrc21  # noqa: E402
from affinitynet.files import load_image  # noqa: E402
from affinitynet.models.onnx_model import export_onnx, load_onnx_model  # noqa: E402
from affinitynet.predict import load_model  # noqa: E402
from affinitynet.models.segmentation import predict_labels  # noqa: E402

from .common import ANY_DEVICE, Benchmark  # noqa: E402

ENGINES = ("pytorch", "onnxruntime")


def timed(run, images, device: torch.device) -> tuple[float, list[np.ndarray]]:
    """(images/s over ``images``, their labels)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    labels = [run(image) for image in images]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(images) / (time.perf_counter() - started), labels


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__, devices=ANY_DEVICE)
    parser = bench.parser
    parser.add_argument("model", help="a train_seg/model.pt")
    parser.add_argument("--thread-counts", type=int, nargs="+", default=[1, 2],
                        help="thread counts, each for both engines (they replace --threads in each measurement)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per thread count, engines alternating")
    parser.add_argument("--images", type=int, default=0, help="val images per round (0: all 59)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="predict's --scales")
    parser.add_argument("--no-flip", action="store_true", help="predict's --no-flip")
    parser.add_argument("--data", default="/tmp/affinitynet-msrc21",
                        help="where MSRC-21 is, or is unpacked from ../shared/datasets (outside the repository)")
    args = bench.parse(argv)
    flip = not args.no_flip

    samples = build_msrc21(ensure_msrc21(args.data), "val").samples
    images = [load_image(sample.image_path) for sample in samples[:args.images or None]]
    with tempfile.TemporaryDirectory() as scratch:
        onnx_file = Path(scratch) / "model.onnx"
        export_onnx(args.model, onnx_file)
        torch_model, meta = load_model(args.model, args.device)
        device = torch.device(args.device)
        mean, std = meta["mean"], meta["std"]
        print(f"predict on {len(images)} MSRC-21 val images, scales {args.scales}, flip {flip}, {args.device}: "
              f"{meta['backbone']}, {len(meta['class_names'])} classes; {args.model}")
        print(f"{'threads':>7s} {'pytorch':>12s} {'onnxruntime':>14s} {'ratio':>7s}  per round (ort/pt)")
        results = []
        for threads in args.thread_counts:
            torch.set_num_threads(threads)
            onnx_model, _ = load_onnx_model(onnx_file, args.device, threads=threads)
            runs = {"pytorch": lambda image: predict_labels(torch_model, image, mean, std, args.scales, flip),
                    "onnxruntime": lambda image: predict_labels(onnx_model, image, mean, std, args.scales, flip)}
            for run in runs.values():
                run(images[0])                  # warm-up: allocator, kernels, onnxruntime's first run
            rounds = []
            for index in range(args.rounds):
                order = ENGINES if index % 2 == 0 else ENGINES[::-1]
                rates, labels = {}, {}
                for engine in order:
                    rates[engine], labels[engine] = timed(runs[engine], images, device)
                equal = sum(int((a == b).sum()) for a, b in zip(labels["pytorch"], labels["onnxruntime"]))
                rounds.append({**rates, "ratio": rates["onnxruntime"] / rates["pytorch"],
                               "equal_labels": equal / sum(a.size for a in labels["pytorch"])})
            row = {"threads": threads, **{f"{engine}_images_per_s": statistics.median(r[engine] for r in rounds)
                                          for engine in ENGINES},
                   "ratio": statistics.median(r["ratio"] for r in rounds),
                   "equal_labels": min(r["equal_labels"] for r in rounds), "rounds": rounds}
            results.append(row)
            per_round = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
            print(f"{threads:7d} {row['pytorch_images_per_s']:8.2f} im/s {row['onnxruntime_images_per_s']:10.2f} im/s "
                  f"{row['ratio']:6.2f}x  {per_round}  (equal labels {row['equal_labels']:.4%})")
    bench.write({"model": str(args.model), "backbone": meta["backbone"], "classes": len(meta["class_names"]),
                 "images": len(images), "scales": args.scales, "flip": flip, "rounds": args.rounds,
                 "onnxruntime": onnxruntime.__version__, "thread_counts": results,
                 "summary": {f"ratio_{row['threads']}_threads": row["ratio"] for row in results}})
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
