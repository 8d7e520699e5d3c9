"""Hyper-parameter analysis (Appendix A.3, Fig. 8): pseudo-label mIoU over a beta x t grid and
over alpha, re-running only the random walk and the labelling.

No network runs: the CAMs (``infer_cam/cams``) and the affinities (``random_walk/affinities``)
saved by the main run are reused. For each beta the walk runs once up to the largest t and is
scored at every t on the way (T^t2 M = T^(t2-t1) T^t1 M), so a 5 x 5 grid costs five walks, not
twenty-five. The labels are the CAM+RW labels of Table 1 (no dCRF), computed by the same
functions as the stage, so the grid point at the run's own (alpha, beta, t) reproduces the run's
CAM+RW mIoU exactly.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .errors import StageError
from .files import load_npz, write_bytes, write_json
from .metrics import ConfusionMatrix
from .ops.background import background_map, labels_from_scores
from .ops.pseudo_labels import to_grid, to_image
from .ops.random_walk import random_walk
from .pipeline import is_complete, stage
from .stages.common import dataset, setup

# Where the sweep writes, in the run directory (the report shows its figure).
FOLDER, FIGURE = "sweep", "fig8.png"


def figure_path(run_dir: str | Path) -> Path:
    """The Fig. 8 plot of a run's sweep."""
    return Path(run_dir) / FOLDER / FIGURE


def _grid_scores(cams: np.ndarray, alpha: float, stride: int) -> torch.Tensor:
    cams_t = torch.from_numpy(cams.astype(np.float32))
    return to_grid(torch.cat([background_map(cams_t, alpha)[None], cams_t]), stride)


def run_sweep(config: dict[str, Any], which: str = "both") -> dict[str, Any]:
    setup(config)
    for needed in ("infer_cam", "random_walk"):
        if not is_complete(config, needed):
            raise StageError(f"sweep needs the finished '{needed}' stage of {config['run_dir']} "
                             f"(run `affinitynet run` with the same config first)")
    data = dataset(config, "label_split")
    if not data.has_masks:
        raise StageError(f"sweep scores against ground truth, and {data.name} '{data.split}' has none")
    section, grid_cfg = config["random_walk"], config["sweep"]
    betas = sorted(float(b) for b in grid_cfg["betas"])
    ts = sorted(int(t) for t in grid_cfg["ts"])
    alphas = sorted(float(a) for a in grid_cfg["alphas"])
    samples = [s for s in data.samples if s.mask_path is not None]
    if grid_cfg["max_images"]:
        samples = samples[: grid_cfg["max_images"]]
    cam_dir = stage("infer_cam").output("cams", config)
    aff_dir = stage("random_walk").output("affinities", config)
    num_classes = data.num_classes
    beta_t = {(b, t): ConfusionMatrix(num_classes) for b in betas for t in ts}
    by_alpha = {a: ConfusionMatrix(num_classes) for a in alphas}
    radius, skipped = section["radius"], []
    started = time.time()
    for sample in tqdm(samples, desc="sweep", dynamic_ncols=True):
        try:
            stored = load_npz(cam_dir / f"{sample.id}.npz")
            saved = load_npz(aff_dir / f"{sample.id}.npz")
            gt = data.load_mask(sample)
        except Exception as error:  # noqa: BLE001 - one bad image must not end the sweep
            skipped.append(str(error))
            continue
        cams, classes = stored["cams"].astype(np.float32), stored["classes"].tolist()
        affinities = torch.from_numpy(saved["affinities"]).float()
        stride = int(saved["stride"])
        height, width = cams.shape[1:]

        def label_of(state: torch.Tensor) -> np.ndarray:
            return labels_from_scores(to_image(state, height, width, stride).numpy(), classes)

        if which in ("beta_t", "both"):
            start = _grid_scores(cams, section["alpha"], stride)
            for beta in betas:
                state, done = start, 0
                for t in ts:
                    state = random_walk(state, affinities=affinities, radius=radius, beta=beta, t=t - done)
                    done = t
                    beta_t[(beta, t)].add(gt, label_of(state))
        if which in ("alpha", "both"):
            for alpha in alphas:
                state = random_walk(_grid_scores(cams, alpha, stride), affinities=affinities, radius=radius,
                                    beta=section["beta"], t=section["t"])
                by_alpha[alpha].add(gt, label_of(state))
    seconds = time.time() - started
    result: dict[str, Any] = {"images": len(samples) - len(skipped), "skipped": skipped, "seconds": round(seconds, 2),
                              "run": {"alpha": section["alpha"], "beta": section["beta"], "t": section["t"]}}
    if which in ("beta_t", "both"):
        result["beta_t"] = [{"beta": b, "t": t, "miou": beta_t[(b, t)].miou() * 100} for b in betas for t in ts]
    if which in ("alpha", "both"):
        result["alpha"] = [{"alpha": a, "miou": by_alpha[a].miou() * 100} for a in alphas]
    out_dir = figure_path(config["run_dir"]).parent
    write_json(out_dir / "sweep.json", result)
    plot_sweep(result, out_dir)
    _print(result)
    return result


def plot_sweep(result: dict[str, Any], out_dir: Path) -> None:
    """Fig. 8 (a): mIoU against t, one line per beta; (b): mIoU against alpha."""
    import matplotlib
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt


    panels = [key for key in ("beta_t", "alpha") if key in result]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, key in zip(axes[0], panels):
        if key == "beta_t":
            for beta in sorted({row["beta"] for row in result[key]}):
                rows = [r for r in result[key] if r["beta"] == beta]
                axis.plot([r["t"] for r in rows], [r["miou"] for r in rows], marker="o", label=f"beta={beta:g}")
            axis.set_xscale("log", base=2)
            axis.set_xlabel("t (random-walk iterations)")
            axis.set_title("(a) beta and t")
            axis.legend(fontsize=8)
        else:
            rows = result[key]
            axis.plot([r["alpha"] for r in rows], [r["miou"] for r in rows], marker="o")
            axis.set_xlabel("alpha (background power, Eq. 2)")
            axis.set_title("(b) alpha")
        axis.set_ylabel("pseudo-label mIoU (%)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    write_bytes(Path(out_dir) / FIGURE, buffer.getvalue())


def _print(result: dict[str, Any]) -> None:
    if "beta_t" in result:
        ts = sorted({r["t"] for r in result["beta_t"]})
        print("CAM+RW mIoU (%) by beta (rows) and t (columns)")
        print("beta   " + "".join(f"{t:>8d}" for t in ts))
        for beta in sorted({r["beta"] for r in result["beta_t"]}):
            values = {r["t"]: r["miou"] for r in result["beta_t"] if r["beta"] == beta}
            print(f"{beta:<7g}" + "".join(f"{values[t]:8.1f}" for t in ts))
    if "alpha" in result:
        print("CAM+RW mIoU (%) by alpha: " + ", ".join(f"{r['alpha']:g}: {r['miou']:.1f}" for r in result["alpha"]))
    print(f"sweep: {result['images']} images in {result['seconds']:.1f}s, written to sweep/")
