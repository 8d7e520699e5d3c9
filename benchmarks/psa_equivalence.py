"""Equivalence with psa's released inference: the same random weights in psa's layout, run by
psa's own networks and scripts (``infer_cls.py``, ``infer_aff.py``) and by this project's stages
(``import-weights``, ``infer-cam``, ``random-walk``), on real MSRC-21 photos.

    python -m benchmarks.psa_equivalence PSA_CHECKOUT [--images 5] [--long-side 160] [--work DIR]
                                         [--msrc data/msrc21]

``PSA_CHECKOUT`` is a checkout of github.com/jiwoon-ahn/psa. Its modules are imported from there
and its two inference scripts run unchanged (``runpy``), with shims for what this machine lacks,
installed in this process only while psa's code runs: no CUDA (``.cuda()`` is the identity, one
"GPU"), no torchvision (``transforms.Compose``), SciPy without ``misc.imsave``, Pillow without the
``Image.CUBIC`` alias of ``BICUBIC``, NumPy that needs ``allow_pickle`` for psa's ``.npy`` dicts,
and psa's VOC file layout (image names, paths and
class labels come from the MSRC-21 images chosen here).

Weights: psa's ``network.resnet38_cls.Net`` and ``network.resnet38_aff.Net`` with their own
initialisation (seed 0), BatchNorm given random statistics, saved as ``res38_cls.pth`` and
``resnet38_aff.pth`` without ``num_batches_tracked`` (as psa's PyTorch 0.4 saved them).

Images: ``--images`` ids of ``msrc21-train.txt`` whose ground truth holds a PASCAL VOC class, the
first of each MSRC-21 category (tags: those VOC classes), resized so the long side is ``--long-side`` pixels
(0: as they are) and stored as PNG, so that both sides read the same pixels. Halving them keeps
the run within reach of a 2-core CPU (ResNet-38 at 4 scales x flip); psa's procedure is the same
at any size.

What is compared (JSON in ``WORK/results.json`` and ``benchmarks/results/psa_equivalence.json``,
a table on stdout; ``WORK`` is a temporary folder unless ``--work`` names one, and it keeps the
photos, which stay out of the repository):

- the networks on identical input: psa's ``forward_cam`` vs ``CAMNet.cams`` (scale 1), psa's
  affinities ``forward(x, to_dense=False)`` vs ``pair_affinities`` of ``AffinityNet`` on psa's
  zero-padded image, on psa's pairs;
- the inputs of each CAM scale: psa resizes the uint8 image with PIL bicubic, then normalises;
  ``multiscale_maps`` normalises, then resizes bilinearly;
- the CAMs (normalised, present classes) and the CAM labels (background 0.2, psa's
  ``out_cam_pred``) of psa's ``infer_cls.py`` and of ``infer-cam``;
- the walked labels of psa's ``infer_aff.py`` and of ``random-walk`` (``random_walk.crf=false``:
  psa's ``out_rw`` has no CRF), and, to attribute the differences, of this project's walk fed
  psa's CAMs, then also psa's padded image, then only psa's pairs, then psa's CAM grid.
"""
from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from affinitynet.ops.background import labels_from_scores
from affinitynet.cli import main as affinitynet
from affinitynet.config import load_config
from affinitynet.data.datasets import build_dataset, ensure_msrc21
from affinitynet.files import load_label_png, load_npz
from affinitynet.ops.multiscale import scaled_size
from affinitynet.ops.pseudo_labels import label_maps, to_grid, to_image
from affinitynet.ops.random_walk import neighbour_offsets, pair_affinities, random_walk
from affinitynet.data.transforms import normalize

from .common import Benchmark, Patches, work_folder

VOC = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
       "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor")
SCALES = (1.0, 0.5, 1.5, 2.0)           # infer_cls.py
ALPHA, BETA, LOGT, RADIUS = 16, 8, 8, 5   # infer_aff.py defaults (t = 2^logt = 256)
STRIDE = 8


# --- the data ----------------------------------------------------------------------------------

def choose_images(msrc: Path, count: int, long_side: int, out: Path) -> dict[str, list[int]]:
    """{id: VOC class indices (0-based, psa's)} of ``count`` MSRC-21 train images with a VOC class,
    the first of each MSRC-21 category (the number before the id's first '_') in the order of
    ``msrc21-train.txt``, written to ``out`` as RGB PNGs."""
    data = build_dataset(load_config("msrc21", [f"dataset.root={msrc}"])["dataset"], "train")
    chosen: dict[str, list[int]] = {}
    categories: set[str] = set()
    out.mkdir(parents=True, exist_ok=True)
    for sample in data.samples:
        tags = sorted({VOC.index(data.class_names[c]) for c in sample.labels if data.class_names[c] in VOC})
        if not tags or sample.id.split("_")[0] in categories:
            continue
        categories.add(sample.id.split("_")[0])
        image = Image.fromarray(data.load_image(sample))
        if long_side:
            scale = long_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        image.save(out / f"{sample.id}.png")
        chosen[sample.id] = tags
        if len(chosen) == count:
            break
    return chosen


def random_psa_weights(psa: Path, work: Path, image: np.ndarray) -> tuple[Path, Path]:
    """psa's two networks with psa's initialisation (seed 0) and random BatchNorm statistics.

    The backbone's last map is ReLU'd, so a zero-mean random ``fc8`` scores a class almost
    uniformly over an image: mostly all positive or all negative, and a CAM of zeros compares
    nothing. Each class's weights are therefore made orthogonal to the mean feature of
    ``image`` (one photo, at half size), which leaves CAMs that vary over the image."""
    sys.path.insert(0, str(psa))
    import network.resnet38_aff
    import network.resnet38_cls

    generator = torch.Generator().manual_seed(0)
    paths = []
    for module, name in ((network.resnet38_cls, "res38_cls.pth"), (network.resnet38_aff, "resnet38_aff.pth")):
        torch.manual_seed(0)
        net = module.Net()
        for layer in net.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                n = layer.num_features
                layer.weight.data = 1 + 0.1 * torch.randn(n, generator=generator)
                layer.bias.data = 0.1 * torch.randn(n, generator=generator)
                layer.running_mean = 0.1 * torch.randn(n, generator=generator)
                layer.running_var = 0.5 + torch.rand(n, generator=generator)
        if hasattr(net, "fc8"):
            small = np.asarray(Image.fromarray(image).resize((image.shape[1] // 2, image.shape[0] // 2), Image.BICUBIC))
            x = torch.from_numpy(net.normalize(small).transpose(2, 0, 1).copy())[None]
            with torch.no_grad():
                net.eval()   # psa's train() returns None, so not chained
                mean = net.forward_as_dict(x)["conv6"].mean(dim=(0, 2, 3))
                weight = net.fc8.weight[:, :, 0, 0]
                weight -= (weight @ mean)[:, None] * mean[None] / (mean @ mean)
        state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
        torch.save(state, work / name)
        paths.append(work / name)
    return paths[0], paths[1]


# --- psa's scripts, run as they are -------------------------------------------------------------

@contextlib.contextmanager
def psa_environment(psa: Path, images: Path, tags: dict[str, list[int]]):
    """The shims psa's scripts need on this machine, undone on exit."""
    sys.path.insert(0, str(psa))
    patches = Patches()
    patch = patches.patch

    def compose(steps):
        def apply(x):
            for step in steps:
                x = step(x)
            return x
        return apply

    torchvision = types.ModuleType("torchvision")
    torchvision.transforms = types.SimpleNamespace(Compose=compose)
    sys.modules["torchvision"] = torchvision
    patch(Image, "CUBIC", Image.Resampling.BICUBIC)   # the old alias, gone from Pillow 10
    import scipy.misc
    patch(scipy.misc, "imsave", lambda path, array: Image.fromarray(array).save(path))
    import voc12.data
    patch(voc12.data, "load_img_name_list", lambda path: Path(path).read_text().split())
    patch(voc12.data, "get_img_path", lambda name, root: str(Path(root) / f"{name}.png"))
    patch(voc12.data, "load_image_label_list_from_npy",
          lambda names: [np.isin(np.arange(20), tags[n]).astype(np.float32) for n in names])
    patch(torch.Tensor, "cuda", lambda self, *a, **k: self)
    patch(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    patch(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
    patch(torch.cuda, "device_count", lambda: 1)
    patch(torch.nn.parallel, "replicate", lambda module, devices, *a, **k: [module for _ in devices])
    real_load = np.load
    patch(np, "load", lambda *a, **k: real_load(*a, **{"allow_pickle": True, **k}))
    try:
        yield
    finally:
        patches.undo()
        sys.modules.pop("torchvision", None)


def run_psa(psa: Path, work: Path, cls_weights: Path, aff_weights: Path, tags: dict[str, list[int]]) -> dict:
    """psa's infer_cls.py and infer_aff.py on the chosen images; records the inputs psa's networks
    saw (each scale's image for forward_cam, the padded image for the AffinityNet)."""
    images, listing = work / "images", work / "psa_list.txt"
    listing.write_text("\n".join(tags) + "\n")
    out = {name: work / "psa" / name for name in ("cam", "cam_pred", "rw")}
    for folder in out.values():
        folder.mkdir(parents=True, exist_ok=True)
    seen: dict[str, list] = {"cam_inputs": [], "cam_outputs": [], "aff_inputs": [], "aff_model": []}
    with psa_environment(psa, images, tags):
        import network.resnet38_aff
        import network.resnet38_cls

        forward_cam = network.resnet38_cls.Net.forward_cam
        forward_aff = network.resnet38_aff.Net.forward

        def recording_cam(self, x):
            cam = forward_cam(self, x)
            seen["cam_inputs"].append(x.clone())
            seen["cam_outputs"].append(cam.clone())
            return cam

        def recording_aff(self, x, to_dense=False):
            seen["aff_inputs"].append(x.clone())
            seen["aff_model"] = [self]
            return forward_aff(self, x, to_dense)

        network.resnet38_cls.Net.forward_cam = recording_cam
        network.resnet38_aff.Net.forward = recording_aff
        common = ["--infer_list", str(listing), "--voc12_root", str(images), "--num_workers", "1"]
        try:
            for script, args in (("infer_cls.py", ["--weights", str(cls_weights), "--network", "network.resnet38_cls",
                                                   "--out_cam", str(out["cam"]), "--out_cam_pred", str(out["cam_pred"])]),
                                 ("infer_aff.py", ["--weights", str(aff_weights), "--network", "network.resnet38_aff",
                                                   "--cam_dir", str(out["cam"]), "--out_rw", str(out["rw"])])):
                started = time.time()
                sys.argv = [script, *common, *args]
                with contextlib.redirect_stdout(io.StringIO()):
                    runpy.run_path(str(psa / script), run_name="__main__")
                print(f"psa {script}: {time.time() - started:.0f} s", flush=True)
            # psa's affinities themselves (the script only keeps the dense matrix it builds from them).
            model = seen["aff_model"][0]
            with torch.no_grad():
                seen["aff"] = [forward_aff(model, x, False)[0] for x in seen["aff_inputs"]]
        finally:
            network.resnet38_cls.Net.forward_cam = forward_cam
            network.resnet38_aff.Net.forward = forward_aff
    seen["dirs"] = out
    return seen


# --- this project's stages ----------------------------------------------------------------------

def run_ours(work: Path, cls_weights: Path, aff_weights: Path, tags: dict[str, list[int]], threads: int) -> dict:
    """import-weights psa-cam and psa-aff, then infer-cam and random-walk, on a folder dataset of
    the same images with VOC's classes; records the float32 CAMs and affinities before the stages
    store them as float16."""
    images = work / "images"
    (images / "tags.csv").write_text("image,tags\n" + "".join(
        f"{name}.png,{';'.join(VOC[k] for k in classes)}\n" for name, classes in tags.items()))
    (images / "classes.txt").write_text("\n".join(VOC) + "\n")
    run_dir = work / "ours"
    options = ["--config", "voc12", "--dataset", "folder", "--root", str(images), "--run-dir", str(run_dir),
               "dataset.labels_file=tags.csv", "dataset.classes_file=classes.txt", "backbone.weights=null",
               "num_workers=0", "device=cpu", "amp=off", f"threads={threads}", "random_walk.crf=false",
               "cam.eval_bg_threshold=0.2", f"random_walk.alpha={ALPHA}", f"random_walk.beta={BETA}",
               f"random_walk.t={2 ** LOGT}", f"random_walk.radius={RADIUS}", f"cam.scales={list(SCALES)}",
               "cam.flip=true"]
    import affinitynet.stages.infer_cam as infer_cam_stage
    import affinitynet.stages.random_walk as random_walk_stage

    seen: dict[str, list] = {"cams": [], "affinities": []}
    real_cams, real_pairs = infer_cam_stage.infer_cams, random_walk_stage.pair_affinities
    infer_cam_stage.infer_cams = lambda *a, **k: seen["cams"].append(real_cams(*a, **k)) or seen["cams"][-1]
    random_walk_stage.pair_affinities = lambda *a, **k: seen["affinities"].append(real_pairs(*a, **k)) or seen["affinities"][-1]
    try:
        # The later stages read the config the imports saved (it holds psa's network layout).
        saved = ["--config", str(run_dir / "config.yaml")]
        for command in (["import-weights", "psa-cam", str(cls_weights), *options],
                        ["import-weights", "psa-aff", str(aff_weights), *options],
                        ["infer-cam", *saved], ["random-walk", *saved]):
            started = time.time()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                code = affinitynet(command)
            if code != 0:
                raise SystemExit(f"affinitynet {' '.join(command)} failed: {err.getvalue().strip()[-500:]}")
            print(f"affinitynet {command[0]}: {time.time() - started:.0f} s", flush=True)
    finally:
        infer_cam_stage.infer_cams, random_walk_stage.pair_affinities = real_cams, real_pairs
    seen["config"] = load_config(run_dir / "config.yaml")
    seen["dir"] = run_dir
    # The stages went through the images in the dataset's order.
    from affinitynet.stages.common import label_images

    order = [sample.id for sample in label_images(seen["config"]).samples]
    seen["cams"] = dict(zip(order, seen["cams"]))
    seen["affinities"] = dict(zip(order, seen["affinities"]))
    return seen


# --- comparisons --------------------------------------------------------------------------------

def psa_pair_mask(h: int, w: int) -> torch.Tensor:
    """(num_offsets, h, w): the pairs psa computes, those whose 'from' end lies in rows
    [0, h - radius + 1) and columns [radius - 1, w - radius + 1) (pyutils.get_indices_of_pairs)."""
    mask = torch.zeros(len(neighbour_offsets(RADIUS)), h, w, dtype=torch.bool)
    mask[:, :h - RADIUS + 1, RADIUS - 1:w - RADIUS + 1] = True
    return mask


def in_grid(h: int, w: int) -> torch.Tensor:
    """(num_offsets, h, w): entries whose second end is on the grid (real pairs)."""
    mask = torch.zeros(len(neighbour_offsets(RADIUS)), h, w, dtype=torch.bool)
    for k, (dy, dx) in enumerate(neighbour_offsets(RADIUS)):
        mask[k, :h - dy, max(0, -dx):w - max(0, dx)] = True
    return mask


def psa_layout(affinities: torch.Tensor) -> torch.Tensor:
    """This project's (num_offsets, h, w) affinities in psa's (num_offsets, from-pixels) order."""
    _, h, w = affinities.shape
    return affinities[:, :h - RADIUS + 1, RADIUS - 1:w - RADIUS + 1].reshape(affinities.shape[0], -1)


def walk_like_psa(cams: np.ndarray, classes: list[int], affinities: torch.Tensor, height: int, width: int,
                  psa_grid: bool) -> np.ndarray:
    """This project's sparse walk (``random_walk``, then ``to_image`` as the stage does) on psa's
    pairs only, and with ``psa_grid`` on psa's CAM grid: averaged over the zero-padded image, the
    background padded with 0 too (the stage averages the cells over the pixels they cover)."""
    cams_t = torch.from_numpy(cams)
    scores = torch.cat([(1 - cams_t.max(0, keepdim=True).values) ** ALPHA, cams_t])
    _, h, w = affinities.shape
    if psa_grid:
        grid = F.avg_pool2d(F.pad(scores[None], (0, w * STRIDE - width, 0, h * STRIDE - height)), STRIDE)[0]
    else:
        grid = to_grid(scores, STRIDE)
    masked = torch.where(psa_pair_mask(h, w), affinities, torch.zeros(()))
    walked = random_walk(grid, affinities=masked, radius=RADIUS, beta=BETA, t=2 ** LOGT)
    return labels_from_scores(to_image(walked, height, width, STRIDE).numpy(), classes)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean()) * 100


def compare(tags: dict[str, list[int]], psa: dict, ours: dict, work: Path) -> dict:
    from affinitynet.stages.common import load_network

    config = ours["config"]
    cam_model = load_network("cam", config, torch.device("cpu"), 21)
    aff_model = load_network("affinity", config, torch.device("cpu"), 21)
    ids = list(tags)
    per_image = []
    worst = {"network_cam": 0.0, "network_aff": 0.0, "cam": 0.0, "cam_stored": 0.0, "aff_stage": 0.0,
             "aff_stage_away": 0.0}
    inputs = {scale: 0.0 for scale in SCALES}
    with torch.no_grad():
        for index, name in enumerate(ids):
            image = np.asarray(Image.open(work / "images" / f"{name}.png").convert("RGB"))
            height, width = image.shape[:2]
            classes = [k + 1 for k in tags[name]]
            tensor = normalize(image, cam_model.backbone.mean, cam_model.backbone.std)

            # Networks on identical input: psa's scale-1, unflipped forward_cam call (the first of 8).
            psa_in, psa_out = psa["cam_inputs"][8 * index], psa["cam_outputs"][8 * index]
            network_cam = float((F.relu(cam_model.cams(psa_in)) - psa_out).abs().max())
            # Each scale's input: psa (PIL bicubic on uint8, then normalise) vs ours (bilinear after).
            for s, scale in enumerate(SCALES):
                size = scaled_size(height, width, scale)
                mine = tensor[None] if size == (height, width) else F.interpolate(
                    tensor[None], size=size, mode="bilinear", align_corners=False)
                theirs = psa["cam_inputs"][8 * index + 2 * s]
                inputs[scale] = max(inputs[scale], float((mine - theirs).abs().max()))

            # CAMs of the whole procedure.
            psa_cams = np.load(psa["dirs"]["cam"] / f"{name}.npy", allow_pickle=True).item()
            psa_stack = np.stack([psa_cams[k] for k in tags[name]]).astype(np.float32)
            ours_cams = ours["cams"][name].numpy()
            stored_npz = load_npz(ours["dir"] / "infer_cam" / "cams" / f"{name}.npz")
            assert stored_npz["classes"].tolist() == classes, (stored_npz["classes"], classes)
            stored = stored_npz["cams"].astype(np.float32)
            cam_diff = float(np.abs(ours_cams - psa_stack).max())
            cam_mean = float(np.abs(ours_cams - psa_stack).mean())
            stored_diff = float(np.abs(stored - psa_stack).max())
            cam_labels = agreement(load_label_png(ours["dir"] / "infer_cam" / "labels" / f"{name}.png"),
                                   load_label_png(psa["dirs"]["cam_pred"] / f"{name}.png"))

            # Affinities: psa's on its padded image vs ours on the same tensor (networks + Eq. 3),
            # and vs the stage's (unpadded image).
            padded = psa["aff_inputs"][index]
            features = aff_model.features(padded)[0]
            ours_padded = pair_affinities(features, RADIUS, "mean")
            network_aff = float((psa_layout(ours_padded) - psa["aff"][index]).abs().max())
            stage_aff = ours["affinities"][name]
            real = in_grid(*stage_aff.shape[1:])
            aff_stage = float((stage_aff - ours_padded).abs()[real].max())
            aff_stage_mean = float((stage_aff - ours_padded).abs()[real].mean())
            rows = torch.arange(stage_aff.shape[1]).view(1, -1, 1).expand_as(real)
            away = real & (rows < stage_aff.shape[1] - 2)
            aff_stage_away = float((stage_aff - ours_padded).abs()[away].max())

            # Walked labels: end to end, then step by step towards psa's inputs.
            psa_rw = load_label_png(psa["dirs"]["rw"] / f"{name}.png")
            stage_rw = load_label_png(ours["dir"] / "random_walk" / "rw_labels" / f"{name}.png")
            walk = {"stage": agreement(stage_rw, psa_rw)}
            on_psa_cams, _ = label_maps(image, psa_stack, classes, stage_aff, ALPHA, BETA, 2 ** LOGT,
                                        RADIUS, STRIDE, None)
            walk["psa_cams"] = agreement(on_psa_cams, psa_rw)
            padded_walk, _ = label_maps(image, psa_stack, classes, ours_padded, ALPHA, BETA, 2 ** LOGT, RADIUS,
                                        STRIDE, None)
            walk["psa_cams_padded"] = agreement(padded_walk, psa_rw)
            walk["psa_pairs"] = agreement(walk_like_psa(psa_stack, classes, ours_padded, height, width, False), psa_rw)
            walk["psa_inputs"] = agreement(walk_like_psa(psa_stack, classes, ours_padded, height, width, True), psa_rw)

            worst["network_cam"] = max(worst["network_cam"], network_cam)
            worst["network_aff"] = max(worst["network_aff"], network_aff)
            worst["cam"] = max(worst["cam"], cam_diff)
            worst["cam_stored"] = max(worst["cam_stored"], stored_diff)
            worst["aff_stage"] = max(worst["aff_stage"], aff_stage)
            worst["aff_stage_away"] = max(worst["aff_stage_away"], aff_stage_away)
            per_image.append({"id": name, "size": [width, height], "tags": [VOC[k] for k in tags[name]],
                              "network_cam": network_cam, "network_aff": network_aff, "cam_max": cam_diff,
                              "cam_mean": cam_mean, "cam_stored_max": stored_diff, "cam_labels": cam_labels,
                              "aff_stage_max": aff_stage, "aff_stage_mean": aff_stage_mean,
                              "aff_stage_max_above_last_2_rows": aff_stage_away,
                              "psa_border_cells": 1 - float(psa_pair_mask(*stage_aff.shape[1:])[0].float().mean()),
                              "walk": walk})
    pixels = [p["size"][0] * p["size"][1] for p in per_image]

    def pooled(get):
        return sum(get(p) * n for p, n in zip(per_image, pixels)) / sum(pixels)

    return {"images": per_image, "max": worst, "input_max_by_scale": {str(k): v for k, v in inputs.items()},
            "cam_label_agreement": pooled(lambda p: p["cam_labels"]),
            "walk_agreement": {key: pooled(lambda p, key=key: p["walk"][key])
                               for key in ("stage", "psa_cams", "psa_cams_padded", "psa_pairs", "psa_inputs")}}


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("psa", type=Path, help="a checkout of github.com/jiwoon-ahn/psa")
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--long-side", type=int, default=160, help="resize the photos to this long side (0: keep)")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder, outside the repository (the photos are copied there; emptied "
                             "first; default: a new temporary folder)")
    parser.add_argument("--msrc", type=Path, default=Path("data/msrc21"),
                        help="where MSRC-21 is (unpacked there from the shared tarball if absent; default data/msrc21)")
    args = bench.parse(argv)
    if not (args.psa / "infer_cls.py").is_file():
        parser.error(f"{args.psa} is not a psa checkout (no infer_cls.py)")
    threads = torch.get_num_threads()
    args.work = work_folder(args.work, "affinitynet-psa-equivalence-")
    started = time.time()
    tags = choose_images(ensure_msrc21(args.msrc), args.images, args.long_side, args.work / "images")
    first = np.asarray(Image.open(args.work / "images" / f"{next(iter(tags))}.png").convert("RGB"))
    cls_weights, aff_weights = random_psa_weights(args.psa.resolve(), args.work, first)
    psa = run_psa(args.psa.resolve(), args.work, cls_weights, aff_weights, tags)
    ours = run_ours(args.work, cls_weights, aff_weights, tags, threads)
    result = compare(tags, psa, ours, args.work)
    result["seconds"] = round(time.time() - started)
    result["settings"] = {"images": args.images, "long_side": args.long_side, "scales": SCALES,
                          "alpha": ALPHA, "beta": BETA, "t": 2 ** LOGT, "radius": RADIUS}
    (args.work / "results.json").write_text(json.dumps(result, indent=2))

    m = result["max"]
    print(f"\n{len(tags)} MSRC-21 photos ({', '.join(p['id'] for p in result['images'])}), long side "
          f"{args.long_side or 'as is'}; {result['seconds']} s")
    print(f"networks on identical input, max |diff|: CAM {m['network_cam']:.2e}, affinities {m['network_aff']:.2e}")
    print("CAM inputs per scale, max |diff| (normalised units): "
          + ", ".join(f"{k}: {v:.3f}" for k, v in result["input_max_by_scale"].items()))
    print(f"CAMs (normalised, present classes), max |diff|: {m['cam']:.4f} (float32), {m['cam_stored']:.4f} "
          f"(as stored, float16); CAM labels agree on {result['cam_label_agreement']:.2f}% of pixels")
    mean_aff = sum(p["aff_stage_mean"] for p in result["images"]) / len(result["images"])
    border = sum(p["psa_border_cells"] for p in result["images"]) / len(result["images"])
    print(f"affinities, stage (unpadded image) vs psa's padded image: max |diff| {m['aff_stage']:.2e}, "
          f"{m['aff_stage_away']:.2e} above the last two grid rows, mean {mean_aff:.1e}")
    print(f"grid cells whose pairs psa drops (border band): {100 * border:.0f}% on average")
    walk = result["walk_agreement"]
    print(f"walked labels agree with psa's infer_aff.py on: {walk['stage']:.2f}% (random-walk stage); "
          f"{walk['psa_cams']:.2f}% (our walk in float32 on psa's CAMs); {walk['psa_cams_padded']:.2f}% (+ psa's padded "
          f"image); {walk['psa_pairs']:.2f}% (+ psa's pairs); {walk['psa_inputs']:.2f}% (+ psa's CAM grid)")
    print(f"details: {args.work / 'results.json'}")
    bench.write({**result, "summary": {
        "CAM network max |diff|": m["network_cam"], "affinities max |diff|": m["network_aff"],
        "CAM labels agree (%)": result["cam_label_agreement"], "walked labels agree (%)": walk["stage"],
        "walked labels agree on psa's inputs (%)": walk["psa_inputs"]}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
