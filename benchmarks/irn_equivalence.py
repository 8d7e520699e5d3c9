"""Equivalence with irn's released inference: the same random weights in irn's layout, run by
irn's own networks and steps (``make_cam``, ``cam_to_ir_label``, ``make_sem_seg_labels``,
``make_ins_seg_labels``) and by this project's stages (``import-weights irn-cam`` and ``irn-irn``,
``infer-cam``, ``confident-regions``, ``irn-walk``, ``irn-instances`` with ``--config voc12_irn``),
on real VOC 2012 photos.

    python -m benchmarks.irn_equivalence IRN_CHECKOUT [--images 14] [--long-side 256] [--work DIR] [--voc TARBALL]

``IRN_CHECKOUT`` is a checkout of github.com/jiwoon-ahn/irn. Its modules are imported from there
and each step's ``run(args)`` is called as irn's ``run_sample.py`` calls it, with irn's defaults
(scales 1.0/0.5/1.5/2.0, conf_fg_thres 0.30, conf_bg_thres 0.05, beta 10, exp_times 8,
sem_seg_bg_thres and ins_seg_bg_thres 0.25), and with shims for what this machine lacks,
installed in this process only while irn's code runs: no CUDA (``.cuda()`` is the identity, one
"GPU", ``multiprocessing.spawn`` calls the worker in this process), no ImageNet download
(``resnet50(pretrained=False)``), the image ids of the VOC photos at hand (irn reads VOC ids as
integers and its class labels from ``voc12/cls_labels.npy``; here the ids, and the tags from the
ground truth, are given to its loader), and a data split that reports at least 20 images to irn's
progress print (``iter % (len(databin) // 20)`` divides by zero under 20; the loader iterates the
real images), and the image size as two integers (irn indexes with a one-element array, which
NumPy 2 refuses).

Weights: irn's ``net.resnet50_cam.CAM`` and ``net.resnet50_irn.EdgeDisplacement`` with their own
initialisation (seed 0), BatchNorm given random statistics, the displacement's ``mean_shift`` a
random mean, saved as ``res50_cam.pth`` and ``res50_irn.pth``. The classifier's weights are made
orthogonal to the mean feature of the first photo, so that the CAMs vary over the image (a ReLU'd
backbone scores a zero-mean classifier almost uniformly).

Images: ``--images`` photos of voc12-mini (``../shared/datasets/voc12-mini.tar.xz``, real VOC
2012 files in VOC's layout, unpacked into the working folder), in the order of its trainval list,
tags from their ground truth, resized so that the long side is ``--long-side`` pixels (voc12-mini's
photos are 513 pixels, and irn's ``EdgeDisplacement`` pads to 512: a larger image is cropped
there) and stored as JPEG, which both sides decode alike.

What is compared (JSON in ``WORK/results.json`` and ``benchmarks/results/irn_equivalence.json``,
a table on stdout; ``WORK`` is a temporary folder unless ``--work`` names one):

- the networks on identical input: irn's ``Net.forward`` and this project's ``IRNet`` on irn's
  padded image and mirror (boundary logits, displacement field);
- the CAMs (``high_res``, present classes) of ``make_cam`` and of ``infer-cam``;
- the confident regions of ``cam_to_ir_label`` and of ``confident-regions``
  (``affinity.confidence: threshold``);
- the boundary maps of ``make_sem_seg_labels`` (image padded to 512) and of ``irn-walk`` (image
  unpadded): largest difference;
- the walked semantic labels of ``make_sem_seg_labels`` and of ``irn-walk``, and, to attribute
  the differences, of this project's walk (``ops.random_walk``) fed irn's boundary map and irn's
  stride-4 CAMs;
- the instances of ``make_ins_seg_labels`` and of ``irn-instances``, matched one to one within a
  class by IoU (Hungarian): how many match at IoU 0.5, their mean IoU, and their score differences.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tarfile
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.optimize import linear_sum_assignment

from affinitynet.cli import main as affinitynet
from affinitynet.config import load_config
from affinitynet.data.datasets import build_dataset
from affinitynet.files import load_label_png
from affinitynet.ops.instance_labels import load_instances
from affinitynet.ops.inter_pixel import path_max_affinities
from affinitynet.ops.random_walk import random_walk
from affinitynet.stages.common import label_images, load_network

from .common import ROOT, Benchmark, Patches, work_folder

SCALES = (1.0, 0.5, 1.5, 2.0)           # run_sample.py's cam_scales
BETA, EXP_TIMES, RADIUS = 10, 8, 5       # run_sample.py; make_*_labels.py call propagate_to_edge with radius 5
BG_THRESHOLD = 0.25                      # sem_seg_bg_thres and ins_seg_bg_thres
CROP = 512                               # EdgeDisplacement's pad
STRIDE = 4
TARBALL = ROOT.parent / "shared" / "datasets" / "voc12-mini.tar.xz"


# --- the data ----------------------------------------------------------------------------------

def unpack_photos(tarball: Path, work: Path, count: int, long_side: int) -> tuple[Path, dict[str, list[int]]]:
    """voc12-mini unpacked under ``work``; its first ``count`` trainval ids with their tags (VOC
    classes, 0-based as irn's keys), listed as the split ``equivalence``, each photo (and its
    ground truth) resized so that its long side is ``long_side``."""
    with tarfile.open(tarball) as archive:
        archive.extractall(work / "data", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    root = work / "data" / "VOCdevkit" / "VOC2012"
    data = build_dataset(load_config("voc12", [f"dataset.root={root}"])["dataset"], "trainval")
    tags = {sample.id: [c - 1 for c in sorted(sample.labels)] for sample in data.samples[:count]}
    for name in tags:
        for folder, suffix, resample in (("JPEGImages", "jpg", Image.BICUBIC), ("SegmentationClass", "png", Image.NEAREST),
                                         ("SegmentationClassAug", "png", Image.NEAREST)):
            path = root / folder / f"{name}.{suffix}"
            if path.is_file():
                picture = Image.open(path)
                scale = long_side / max(picture.size)
                resized = picture.resize((round(picture.width * scale), round(picture.height * scale)), resample)
                resized.save(path, **({"quality": 95} if suffix == "jpg" else {}))
    (root / "ImageSets" / "Segmentation" / "equivalence.txt").write_text("\n".join(tags) + "\n")
    return root, tags


# --- irn's code, run as it is --------------------------------------------------------------------

class AtLeast20(torch.utils.data.Dataset):
    """irn's split of the images, reporting at least 20 to irn's progress print only: the loader
    (:func:`loader`) iterates the real ones."""

    def __init__(self, subset):
        self.subset = subset

    def __len__(self):
        return max(20, len(self.subset))

    def __getitem__(self, index):
        return self.subset[index]


def collate(batch):
    """The default collation, with the image size as two integers: irn indexes with
    ``np.asarray(pack['size'])[0]``, a one-element array that NumPy 2 no longer takes as an index."""
    pack = torch.utils.data.default_collate(batch)
    if "size" in pack:
        pack["size"] = [int(s) for s in pack["size"]]
    return pack


def loader(dataset, **options):
    """irn's DataLoader over the real images of its split, in this process, with :func:`collate`."""
    real = dataset.subset if isinstance(dataset, AtLeast20) else dataset
    return torch.utils.data.DataLoader(real, **{**options, "num_workers": 0, "collate_fn": collate})


@contextlib.contextmanager
def irn_environment(irn: Path, tags: dict[str, list[int]]):
    """The shims irn's steps need on this machine, undone on exit. irn reads
    ``voc12/cls_labels.npy`` relative to its checkout, so the working directory is the checkout."""
    patches = Patches()
    patch = patches.patch

    previous = Path.cwd()
    sys.path.insert(0, str(irn))
    os.chdir(irn)
    try:
        import misc.torchutils
        import net.resnet50
        import voc12.dataloader

        real_resnet50, real_split = net.resnet50.resnet50, misc.torchutils.split_dataset
        patch(net.resnet50, "resnet50", lambda pretrained=True, **k: real_resnet50(pretrained=False, **k))
        patch(misc.torchutils, "split_dataset", lambda dataset, n: [AtLeast20(s) for s in real_split(dataset, n)])
        patch(voc12.dataloader, "load_img_name_list", lambda path: np.array(Path(path).read_text().split()))
        patch(voc12.dataloader, "decode_int_filename", lambda name: str(name))
        patch(voc12.dataloader, "load_image_label_list_from_npy",
              lambda names: np.stack([np.isin(np.arange(20), tags[str(n)]).astype(np.float32) for n in names]))
        patch(torch.Tensor, "cuda", lambda self, *a, **k: self)
        patch(torch.nn.Module, "cuda", lambda self, *a, **k: self)
        patch(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
        patch(torch.cuda, "device_count", lambda: 1)
        patch(torch.cuda, "empty_cache", lambda: None)
        patch(torch.multiprocessing, "spawn", lambda fn, nprocs=1, args=(), join=True: [fn(i, *args) for i in range(nprocs)])
        yield
    finally:
        patches.undo()
        os.chdir(previous)
        sys.path.remove(str(irn))


def random_irn_weights(irn: Path, work: Path, tags: dict[str, list[int]], photo: np.ndarray) -> tuple[Path, Path]:
    """irn's two networks with irn's initialisation (seed 0), random BatchNorm statistics and a
    random displacement mean; the CAM classifier orthogonal to ``photo``'s mean feature."""
    with irn_environment(irn, tags):
        import net.resnet50_cam
        import net.resnet50_irn
        import voc12.dataloader

        generator = torch.Generator().manual_seed(0)
        paths = []
        for build, name in ((net.resnet50_cam.CAM, "res50_cam.pth"), (net.resnet50_irn.EdgeDisplacement, "res50_irn.pth")):
            torch.manual_seed(0)
            model = build()
            for layer in model.modules():
                if isinstance(layer, torch.nn.BatchNorm2d):
                    n = layer.num_features
                    layer.weight.data = 1 + 0.1 * torch.randn(n, generator=generator)
                    layer.bias.data = 0.1 * torch.randn(n, generator=generator)
                    layer.running_mean = 0.1 * torch.randn(n, generator=generator)
                    layer.running_var = 0.5 + torch.rand(n, generator=generator)
            model.eval()
            if hasattr(model, "classifier"):
                x = torch.from_numpy(voc12.dataloader.TorchvisionNormalize()(photo).transpose(2, 0, 1).copy())[None]
                with torch.no_grad():
                    mean = model.stage4(model.stage3(model.stage2(model.stage1(x)))).mean(dim=(0, 2, 3))
                    weight = model.classifier.weight[:, :, 0, 0]
                    weight -= (weight @ mean)[:, None] * mean[None] / (mean @ mean)
            else:
                model.mean_shift.running_mean = 0.5 * torch.randn(2, generator=generator)
            torch.save(model.state_dict(), work / name)
            paths.append(work / name)
    return paths[0], paths[1]


def run_irn(irn: Path, root: Path, work: Path, cam_weights: Path, irn_weights: Path,
            tags: dict[str, list[int]]) -> dict:
    """irn's four inference steps on the chosen photos; records what ``EdgeDisplacement`` saw and
    gave (its input pair, boundary map and field) and the model."""
    listing = work / "irn_list.txt"
    listing.write_text("\n".join(tags) + "\n")
    dirs = {name: work / "irn" / name for name in ("cam", "ir_label", "sem_seg", "ins_seg")}
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    args = types.SimpleNamespace(
        voc12_root=str(root), train_list=str(listing), infer_list=str(listing), num_workers=1,
        cam_network="net.resnet50_cam", cam_weights_name=str(cam_weights.with_suffix("")), cam_scales=SCALES,
        conf_fg_thres=0.30, conf_bg_thres=0.05, irn_network="net.resnet50_irn", irn_weights_name=str(irn_weights),
        beta=BETA, exp_times=EXP_TIMES, sem_seg_bg_thres=BG_THRESHOLD, ins_seg_bg_thres=BG_THRESHOLD,
        cam_out_dir=str(dirs["cam"]), ir_label_out_dir=str(dirs["ir_label"]), sem_seg_out_dir=str(dirs["sem_seg"]),
        ins_seg_out_dir=str(dirs["ins_seg"]))
    seen: dict = {"inputs": [], "edges": [], "displacements": [], "model": None}
    with irn_environment(irn, tags):
        import net.resnet50_irn
        import step.cam_to_ir_label
        import step.make_cam
        import step.make_ins_seg_labels
        import step.make_sem_seg_labels

        forward = net.resnet50_irn.EdgeDisplacement.forward

        def recording(self, x):
            edge, dp = forward(self, x)
            seen["inputs"].append(x.clone())
            seen["edges"].append(edge.clone())
            seen["displacements"].append(dp.clone())
            seen["model"] = self
            return edge, dp

        net.resnet50_irn.EdgeDisplacement.forward = recording
        modules = (step.make_cam, step.cam_to_ir_label, step.make_sem_seg_labels, step.make_ins_seg_labels)
        originals = [module.DataLoader for module in modules]
        try:
            for module in modules:
                module.DataLoader = loader
                started = time.time()
                with contextlib.redirect_stdout(io.StringIO()):
                    module.run(args)
                print(f"irn {module.__name__}: {time.time() - started:.0f} s", flush=True)
        finally:
            net.resnet50_irn.EdgeDisplacement.forward = forward
            for module, original in zip(modules, originals):
                module.DataLoader = original
        seen["net_forward"] = net.resnet50_irn.Net.forward
    # make_sem_seg_labels saw each photo first, make_ins_seg_labels again: keep the first pass.
    count = len(tags)
    seen.update({key: dict(zip(tags, seen[key][:count])) for key in ("inputs", "edges", "displacements")})
    seen["dirs"] = dirs
    return seen


# --- this project's stages ----------------------------------------------------------------------

def run_ours(root: Path, work: Path, cam_weights: Path, irn_weights: Path, threads: int) -> dict:
    """import-weights irn-cam and irn-irn, then infer-cam, confident-regions, irn-walk and
    irn-instances with ``--config voc12_irn`` on the same photos; records the float32 CAMs,
    boundary maps and displacement fields before the stages store them."""
    run_dir = work / "ours"
    options = ["--config", "voc12_irn", f"dataset.root={root}", "dataset.train_split=equivalence",
               "dataset.label_split=equivalence", "dataset.eval_split=equivalence", f"run_dir={run_dir}",
               "backbone.weights=null", "num_workers=0", "device=cpu", "amp=off", f"threads={threads}"]
    import affinitynet.stages.infer_cam as infer_cam_stage
    import affinitynet.stages.irn_instances as instances_stage
    import affinitynet.stages.irn_walk as walk_stage

    seen: dict[str, list] = {"cams": [], "boundaries": [], "displacements": []}
    real_cams, real_walk, real_instances = infer_cam_stage.infer_cams, walk_stage.relations, instances_stage.relations

    def walk_relations(*a, **k):
        result = real_walk(*a, **k)
        seen["boundaries"].append(result[0].float().cpu())
        return result

    def instance_relations(*a, **k):
        result = real_instances(*a, **k)
        seen["displacements"].append(result[1].float().cpu())
        return result

    infer_cam_stage.infer_cams = lambda *a, **k: seen["cams"].append(real_cams(*a, **k)) or seen["cams"][-1]
    walk_stage.relations, instances_stage.relations = walk_relations, instance_relations
    try:
        saved = ["--config", str(run_dir / "config.yaml")]
        for command in (["import-weights", "irn-cam", str(cam_weights), *options],
                        ["import-weights", "irn-irn", str(irn_weights), *options],
                        ["infer-cam", *saved], ["confident-regions", *saved], ["irn-walk", *saved],
                        ["irn-instances", *saved]):
            started = time.time()
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                code = affinitynet(command)
            if code != 0:
                raise SystemExit(f"affinitynet {' '.join(command)} failed: {err.getvalue().strip()[-500:]}")
            print(f"affinitynet {command[0]} {command[1] if command[0] == 'import-weights' else ''}: "
                  f"{time.time() - started:.0f} s", flush=True)
    finally:
        infer_cam_stage.infer_cams = real_cams
        walk_stage.relations, instances_stage.relations = real_walk, real_instances
    config = load_config(run_dir / "config.yaml")
    order = [sample.id for sample in label_images(config).samples]
    return {"config": config, "dir": run_dir, **{key: dict(zip(order, seen[key])) for key in seen}}


# --- comparisons --------------------------------------------------------------------------------

def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean()) * 100


def walk_on_irn_inputs(cam: torch.Tensor, edge: torch.Tensor, keys: np.ndarray, height: int, width: int) -> np.ndarray:
    """This project's walk (``path_max_affinities``, ``random_walk``) fed irn's stride-4 CAMs and
    boundary map, the rest as ``make_sem_seg_labels`` does it (upsample 4x, over the largest value,
    constant background)."""
    seeds = cam.float() * (1 - edge.float())
    walked = random_walk(seeds, affinities=path_max_affinities(edge.float(), RADIUS).float(), radius=RADIUS,
                         beta=BETA, t=2 ** EXP_TIMES)
    up = F.interpolate(walked[None], scale_factor=STRIDE, mode="bilinear", align_corners=False)[0, :, :height, :width]
    up = up / up.max()
    scores = F.pad(up, (0, 0, 0, 0, 1, 0), value=BG_THRESHOLD)
    return np.pad(keys + 1, (1, 0))[scores.argmax(0).numpy()]


def match_instances(theirs: dict, ours: list) -> list[dict]:
    """irn's instances (``detect_instance``'s dict) matched one to one with ours of the same class
    by IoU (Hungarian), each match's IoU and both scores; unmatched ones with IoU 0."""
    irn = [(int(c) + 1, m.astype(bool), float(s)) for c, m, s in zip(theirs["class"], theirs["mask"], theirs["score"])]
    mine = [(inst.label, inst.mask.astype(bool), float(inst.score)) for inst in ours]
    matches = []
    for label in sorted({c for c, _, _ in irn} | {c for c, _, _ in mine}):
        a = [x for x in irn if x[0] == label]
        b = [x for x in mine if x[0] == label]
        iou = np.zeros((len(a), len(b)))
        for i, (_, ma, _) in enumerate(a):
            for j, (_, mb, _) in enumerate(b):
                union = (ma | mb).sum()
                iou[i, j] = (ma & mb).sum() / union if union else 0.0
        rows, cols = linear_sum_assignment(-iou) if iou.size else ([], [])
        for i, j in zip(rows, cols):
            matches.append({"class": label, "iou": float(iou[i, j]), "irn_score": a[i][2], "our_score": b[j][2],
                            "irn_area": int(a[i][1].sum()), "our_area": int(b[j][1].sum())})
        for i in set(range(len(a))) - set(rows):
            matches.append({"class": label, "iou": 0.0, "irn_score": a[i][2], "our_score": None,
                            "irn_area": int(a[i][1].sum()), "our_area": 0})
        for j in set(range(len(b))) - set(cols):
            matches.append({"class": label, "iou": 0.0, "irn_score": None, "our_score": b[j][2],
                            "irn_area": 0, "our_area": int(b[j][1].sum())})
    return matches


def compare(tags: dict[str, list[int]], root: Path, irn: dict, ours: dict) -> dict:
    model = load_network("irn", ours["config"], torch.device("cpu"), 21)
    per_image, matches = [], []
    for name, classes in tags.items():
        image = np.asarray(Image.open(root / "JPEGImages" / f"{name}.jpg").convert("RGB"))
        height, width = image.shape[:2]
        keys = np.asarray(classes)
        # The networks on identical input: irn's padded image and mirror.
        pair = irn["inputs"][name]
        padded = F.pad(pair, [0, CROP - pair.shape[3], 0, CROP - pair.shape[2]])
        with torch.no_grad():
            edge_theirs, dp_theirs = irn["net_forward"](irn["model"], padded)   # fc_dp7 ends in mean_shift
            edge_mine, dp_mine = model(padded)
        network_edge = float((edge_mine - edge_theirs).abs().max())
        network_dp = float((dp_mine - dp_theirs).abs().max())
        # CAMs of the whole procedure (irn's high_res, ours in float32 before storage).
        stored = np.load(irn["dirs"]["cam"] / f"{name}.npy", allow_pickle=True).item()
        cam_diff = np.abs(ours["cams"][name].numpy() - stored["high_res"])
        # Confident regions.
        conf = agreement(load_label_png(ours["dir"] / "confident_regions" / "labels" / f"{name}.png"),
                         np.asarray(Image.open(irn["dirs"]["ir_label"] / f"{name}.png")))
        # Boundary maps: irn's (padded image) vs the stage's (unpadded).
        edge_irn, edge_ours = irn["edges"][name][0], ours["boundaries"][name]
        boundary = (edge_ours - edge_irn).abs()
        # Walked semantic labels: the stage, then this project's walk on irn's inputs.
        irn_labels = np.asarray(Image.open(irn["dirs"]["sem_seg"] / f"{name}.png"))
        stage_labels = load_label_png(ours["dir"] / "irn_walk" / "pseudo_labels" / f"{name}.png")
        on_irn_inputs = walk_on_irn_inputs(stored["cam"], edge_irn, keys, height, width)
        # Instances.
        theirs = np.load(irn["dirs"]["ins_seg"] / f"{name}.npy", allow_pickle=True).item()
        mine, _ = load_instances(ours["dir"] / "irn_instances" / "SegmentationObject" / f"{name}.png",
                                 ours["dir"] / "irn_instances" / "detections" / f"{name}.json")
        image_matches = match_instances(theirs, mine)
        matches += image_matches
        per_image.append({
            "id": name, "size": [width, height], "tags": classes,
            "network_boundary_logits_max": network_edge, "network_displacement_max": network_dp,
            "cam_max": float(cam_diff.max()), "cam_mean": float(cam_diff.mean()),
            "confident_regions": conf,
            "boundary_max": float(boundary.max()), "boundary_mean": float(boundary.mean()),
            "boundary_max_away_from_edges": float(boundary[:-2, :-2].max()),
            "walk": {"stage": agreement(stage_labels, irn_labels), "irn_inputs": agreement(on_irn_inputs, irn_labels)},
            "instances": {"irn": len(theirs["score"]), "ours": len(mine),
                          "matched_at_0.5": sum(m["iou"] >= 0.5 for m in image_matches)}})
    pixels = [p["size"][0] * p["size"][1] for p in per_image]

    def pooled(get):
        return sum(get(p) * n for p, n in zip(per_image, pixels)) / sum(pixels)

    matched = [m for m in matches if m["iou"] >= 0.5]
    scored = [m for m in matched if m["irn_score"] > 0 or m["our_score"] > 0]
    return {
        "images": per_image, "instance_matches": matches,
        "max": {key: max(p[key] for p in per_image) for key in (
            "network_boundary_logits_max", "network_displacement_max", "cam_max", "boundary_max",
            "boundary_max_away_from_edges")},
        "boundary_mean": pooled(lambda p: p["boundary_mean"]),
        "confident_region_agreement": pooled(lambda p: p["confident_regions"]),
        "walk_agreement": {key: pooled(lambda p, key=key: p["walk"][key]) for key in ("stage", "irn_inputs")},
        "instances": {
            "irn": sum(p["instances"]["irn"] for p in per_image), "ours": sum(p["instances"]["ours"] for p in per_image),
            "matched_at_0.5": len(matched),
            "mean_iou_of_matched": float(np.mean([m["iou"] for m in matched])) if matched else None,
            "score_max_abs_diff_of_matched": max((abs(m["irn_score"] - m["our_score"]) for m in scored), default=None),
            "score_mean_abs_diff_of_matched": (float(np.mean([abs(m["irn_score"] - m["our_score"]) for m in scored]))
                                               if scored else None)}}


def main(argv: list[str] | None = None) -> int:
    bench = Benchmark(__file__, __doc__)
    parser = bench.parser
    parser.add_argument("irn", type=Path, help="a checkout of github.com/jiwoon-ahn/irn")
    parser.add_argument("--images", type=int, default=14, help="photos of voc12-mini (default and at most: 14)")
    parser.add_argument("--long-side", type=int, default=256,
                        help="resize the photos so that their long side is this (at most 512, irn's pad; default 256: irn's dense walk squares an N x N matrix of the stride-4 grid 8 times)")
    parser.add_argument("--work", type=Path, default=None,
                        help="working folder, outside the repository (the photos are unpacked there; emptied "
                             "first; default: a new temporary folder)")
    parser.add_argument("--voc", type=Path, default=TARBALL, help=f"the voc12-mini tarball (default {TARBALL})")
    args = bench.parse(argv)
    if not (args.irn / "step" / "make_sem_seg_labels.py").is_file():
        parser.error(f"{args.irn} is not an irn checkout (no step/make_sem_seg_labels.py)")
    if not 16 <= args.long_side <= CROP:
        parser.error(f"--long-side must be 16 to {CROP} (irn's EdgeDisplacement pads the image to {CROP}), not {args.long_side}")
    if not args.voc.is_file():
        parser.error(f"{args.voc}: the voc12-mini tarball is not there")
    threads = torch.get_num_threads()
    args.work = work_folder(args.work, "affinitynet-irn-equivalence-")
    started = time.time()
    root, tags = unpack_photos(args.voc, args.work, args.images, args.long_side)
    first = np.asarray(Image.open(root / "JPEGImages" / f"{next(iter(tags))}.jpg").convert("RGB"))
    irn_dir = args.irn.resolve()
    cam_weights, irn_weights = random_irn_weights(irn_dir, args.work, tags, first)
    irn = run_irn(irn_dir, root, args.work, cam_weights, irn_weights, tags)
    ours = run_ours(root, args.work, cam_weights, irn_weights, threads)
    result = compare(tags, root, irn, ours)
    result["seconds"] = round(time.time() - started)
    result["settings"] = {"images": len(tags), "long_side": args.long_side, "scales": SCALES, "beta": BETA, "t": 2 ** EXP_TIMES,
                          "radius": RADIUS, "bg_threshold": BG_THRESHOLD}
    (args.work / "results.json").write_text(json.dumps(result, indent=2))

    m, inst, walk = result["max"], result["instances"], result["walk_agreement"]
    print(f"\n{len(tags)} VOC 2012 photos ({', '.join(tags)}); {result['seconds']} s")
    print(f"networks on irn's padded input, max |diff|: boundary logits {m['network_boundary_logits_max']:.2e}, "
          f"displacements {m['network_displacement_max']:.2e}")
    print(f"CAMs (high_res, present classes), max |diff|: {m['cam_max']:.2e}")
    print(f"confident regions agree on {result['confident_region_agreement']:.2f}% of pixels")
    print(f"boundary maps (irn's padded image vs the stage's unpadded one): max |diff| {m['boundary_max']:.3f} "
          f"({m['boundary_max_away_from_edges']:.3f} away from the last two rows and columns), mean "
          f"{result['boundary_mean']:.1e}")
    print(f"walked semantic labels agree with irn's make_sem_seg_labels on {walk['stage']:.2f}% (irn-walk stage); "
          f"{walk['irn_inputs']:.2f}% (this project's walk on irn's CAMs and boundary map)")
    print(f"instances: irn {inst['irn']}, ours {inst['ours']}, matched at IoU >= 0.5: {inst['matched_at_0.5']} "
          f"(mean IoU {inst['mean_iou_of_matched'] or 0:.3f}); score |diff| of matched: max "
          f"{inst['score_max_abs_diff_of_matched'] or 0:.3f}, mean {inst['score_mean_abs_diff_of_matched'] or 0:.3f}")
    print(f"details: {args.work / 'results.json'}")
    bench.write({**result, "summary": {
        "boundary logits, identical input, max |diff|": m["network_boundary_logits_max"],
        "boundary maps, max |diff|": m["boundary_max"],
        "confident regions agree (%)": result["confident_region_agreement"],
        "walked labels agree (%)": walk["stage"],
        "walked labels agree on irn's inputs (%)": walk["irn_inputs"],
        "instances matched at IoU 0.5": f"{inst['matched_at_0.5']} of irn's {inst['irn']}, ours {inst['ours']}"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
