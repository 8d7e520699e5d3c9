"""Loading a full-size ResNet-38 MXNet ``.params`` file: correctness against MXNet, time, memory.

Run: ``python -m benchmarks.mxnet_params MXNET_PYTHON`` (about three minutes; needs ~3 GB of
memory and ~1 GB in the temp dir). The argument is a Python with MXNet 1.x
(``tests/fixtures/make_mxnet_params.py`` says how to make one). Each case's process runs
``--threads`` torch threads (default: torch's; the figures in the docs were measured with
``--threads 1``, steadier on 2 noisy shared cores). In one run:

1. MXNet writes a random float32 ResNet-38 Model A1 file with every real shape (193 arrays,
   109M values; ``make_mxnet_params.py --full-a1``) into a temp dir outside the repository,
   together with the SHA-256 of every array as ``mx.nd.load`` reads it back;
2. each case below runs in a fresh subprocess, three times, the fastest kept (peak RSS from
   VmHWM; "during" is the rise of the peak over the RSS just before the measured call): the imports alone, ``read_state_dict`` of
   the file, ``create_backbone("resnet38d", pretrained=False)``, the same with
   ``pretrained=<the .params file>``, and with ``pretrained=<the same weights as a .pth>`` for
   comparison; for the last two, the time and memory of ``load_state_dict_file`` (reading the
   file and copying it into the built network) apart;
3. the ``.params`` case then checks every tensor of the loaded backbone (and the two classifier
   arrays the backbone drops) against MXNet's SHA-256: FAIL if any differs.

The file is read right after MXNet wrote it, so from the page cache: the times are those of
parsing and copying, not of a cold disk. Times swing with the machine's load (2 shared cores).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from affinitynet.models.backbones import create_backbone, resnet38d
from affinitynet.models.backbones.mxnet_params import read_params, torch_key
from affinitynet.models.backbones.weights import read_state_dict

from .common import ROOT, Benchmark, module_command, module_env
from .common import reset_peak as _reset_peak
from .common import status_mb as _status_mb

GENERATOR = ROOT / "tests" / "fixtures" / "make_mxnet_params.py"

# --- subprocess workers for peak memory -----------------------------------------------------


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().contiguous().numpy().data).hexdigest()


def verify(model: torch.nn.Module, params: Path, digests: dict) -> dict:
    """Every backbone tensor against the SHA-256 of the MXNet array it comes from, then the
    classifier arrays the backbone drops (read from the file again)."""
    by_key = {torch_key(name): name for name in digests}
    checked, wrong = 0, []
    state = model.state_dict()
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        expected = digests[by_key[key]]
        if (list(tensor.shape) != expected["shape"] or tensor.dtype != torch.float32
                or _sha256(tensor) != expected["sha256"]):
            wrong.append(key)
        checked += 1
    dropped = [name for name in digests if torch_key(name) not in state]
    arrays = read_params(params)
    for name in dropped:
        if hashlib.sha256(arrays[name].data).hexdigest() != digests[name]["sha256"]:
            wrong.append(name)
        checked += 1
    return {"checked": checked, "arrays": len(digests), "wrong": wrong}


def _timed_loader(result: dict):
    """resnet38d's load_state_dict_file, timed: the loading part of create_backbone, measured
    apart from building the network in the same call (their sum swings by seconds here)."""
    load = resnet38d.load_state_dict_file

    def timed(*args, **kwargs):
        reset = _reset_peak()
        before = _status_mb("VmRSS")
        start = time.perf_counter()
        load(*args, **kwargs)
        result["load_seconds"] = time.perf_counter() - start
        result["load_mb"] = _status_mb("VmHWM") - before if reset else None
    return timed


def worker(case: str, params: str) -> None:
    params = Path(params)   # torch's threads: --threads, set by Benchmark.parse
    result = {"seconds": 0.0, "during_mb": None}
    resnet38d.load_state_dict_file = _timed_loader(result)
    if case != "baseline":  # baseline: the same imports, nothing else
        reset = _reset_peak()
        before = _status_mb("VmRSS")
        start = time.perf_counter()
        if case == "read":
            loaded = read_state_dict(params)
        elif case == "build":
            loaded = create_backbone("resnet38d", pretrained=False)
        elif case == "params":
            loaded = create_backbone("resnet38d", pretrained=str(params))
        elif case == "pth":
            loaded = create_backbone("resnet38d", pretrained=str(params.with_suffix(".pth")))
        result["seconds"] = time.perf_counter() - start
        # The timed loader resets the peak when it starts, with the built network resident, so
        # this still covers the whole call unless building alone peaked above build + load.
        result["during_mb"] = _status_mb("VmHWM") - before if reset else None
    result["peak_mb"] = _status_mb("VmHWM")
    if case == "params":  # after the measurement: neither time nor peak include the checks
        digests = json.loads(Path(str(params) + ".sha256.json").read_text())
        result["verify"] = verify(loaded, params, digests)
        torch.save(loaded.state_dict(), params.with_suffix(".pth"))
    print(json.dumps(result))


def in_subprocess(case, params, repeat=1, threads=1):
    """The case's result in a fresh process, the fastest of ``repeat`` (times on this shared
    machine swing by 2-3x from run to run; the peaks do not)."""
    runs = []
    for _ in range(repeat):
        out = subprocess.run(
            module_command(__file__, "--worker", case, str(params), "--threads", str(threads)),
            check=True, capture_output=True, text=True, env=module_env(),
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    if "load_seconds" in best:
        best["load_seconds"] = min(r["load_seconds"] for r in runs)
    best["verify"] = next((r["verify"] for r in runs if "verify" in r), None)
    return best


# --- main -----------------------------------------------------------------------------------

def measure(bench: Benchmark, mxnet_python: str, keep: bool, repeat: int) -> int:
    threads = torch.get_num_threads()
    work = Path(tempfile.mkdtemp(prefix="affinitynet-mxnet-bench-"))
    params = work / "ilsvrc-cls_rna-a1_cls1000_random.params"
    try:
        print(f"1. MXNet ({mxnet_python}) writes a full-size random A1 file")
        start = time.perf_counter()
        out = subprocess.run([mxnet_python, str(GENERATOR), "--full-a1", str(params)],
                             check=True, capture_output=True, text=True)
        print(f"  {out.stdout.strip().splitlines()[-1]}")
        print(f"  {params.stat().st_size / 2**20:.1f} MiB, written and hashed in "
              f"{time.perf_counter() - start:.1f} s")

        print(f"\n2. each case in a fresh subprocess, fastest of {repeat} "
              f"(torch {torch.__version__}, {threads} thread(s))")
        base = in_subprocess("baseline", params, threads=threads)
        print(f"  {'import-only process':44s} peak {base['peak_mb']:7.0f} MB")
        results = {}
        for case, what in [("read", "read_state_dict(<.params>)"),
                           ("build", "create_backbone(pretrained=False)"),
                           ("params", "create_backbone(pretrained=<.params>)"),
                           ("pth", "create_backbone(pretrained=<same as .pth>)")]:
            r = results[case] = in_subprocess(case, params, repeat, threads)
            during = "" if r["during_mb"] is None else f", +{r['during_mb']:.0f} MB during"
            print(f"  {what:44s} peak {r['peak_mb']:7.0f} MB (+{r['peak_mb'] - base['peak_mb']:.0f}"
                  f" over imports{during}), {r['seconds']:6.2f} s")
        for case in ("params", "pth"):
            r = results[case]
            print(f"  of which load_state_dict_file(<.{case}>) {r['load_seconds']:.2f} s, "
                  f"+{r['load_mb']:.0f} MB over the built network")

        check = results["params"]["verify"]
        ok = not check["wrong"] and check["checked"] == check["arrays"]
        print(f"\n3. {check['checked']} of {check['arrays']} arrays equal to what MXNet wrote "
              f"(SHA-256): {'PASS' if ok else 'FAIL ' + ', '.join(check['wrong'][:8])}")
        bench.write({"repeat": repeat, "file_mib": params.stat().st_size / 2**20, "import_only_peak_mb": base["peak_mb"],
                     "cases": {case: {k: v for k, v in r.items() if k != "verify"} for case, r in results.items()},
                     "verify": {**check, "pass": ok},
                     "summary": {".params load s (build + load)": results["params"]["seconds"],
                                 ".params peak over imports MB": results["params"]["peak_mb"] - base["peak_mb"],
                                 ".pth load s": results["pth"]["seconds"],
                                 "arrays equal to MXNet's": f"{check['checked']} of {check['arrays']}"}})
        return 0 if ok else 1
    finally:
        if keep:
            print(f"\nkept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("mxnet_python", nargs="?", help="a Python with MXNet 1.x installed")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir and its files")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each case (fastest kept)")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "PARAMS"), help=argparse.SUPPRESS)
    args = bench.parse(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    if not args.mxnet_python:
        parser.error("give the path of a Python with MXNet 1.x (see the docstring)")
    return measure(bench, args.mxnet_python, args.keep, args.repeat)


if __name__ == "__main__":
    sys.exit(main())
