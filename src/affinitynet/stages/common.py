"""What several stages share (a stage never imports another): the datasets of the configured
splits, the device, threads and seeds, scoring (Table 1), the training-stage helper
:func:`train_stage` and its :class:`AffinityTrainSet`, the segmentation network's training on
a stage's labels (:func:`train_segmentation`, for ``train_seg`` and the refinement round's
``draft_seg``), a stage's network loaded from its ``model.pt``, AffinityNet's features of an
image, and IRN's inference start.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data import transforms
from ..data.datasets import build_dataset
from ..data.datasets.base import SegmentationDataset
from ..engine import distributed
from ..engine.precision import for_inference
from ..engine.training import AugmentedTrainSet, resolve_device, train
from ..errors import InputError, TrainingError
from ..files import IGNORE_INDEX, load_label_png, load_npz, save_label_png
from ..metrics import ConfusionMatrix, format_table, score_samples, scored_samples, summarize_scores
from ..models.affinity import (
    NEUTRAL,
    affinity_loss_from_distances,
    confident_regions,
    downsample_labels,
    feature_distances,
    pair_labels,
    threshold_confident_regions,
)
from ..models.backbones import freeze_batchnorm
from ..models.irnet import predict
from ..models.networks import (
    build_network,
    check_meta,
    fine_tune_epochs,
    geometry,
    layout,
    load_checkpoint_meta,
    load_weights,
    model_from_checkpoint,
    network,
    network_meta,
    set_geometry,
    training_section,
)
from ..ops.crf import CRFParams
from ..ops.inter_pixel import path_max_affinities
from ..pipeline import Stage, StageRun, map_images, stage, training_keys


class AffinityTrainSet(AugmentedTrainSet):
    """The shared augmentation without a rescale (5.1); the confident-region labels follow the
    same flip and crop, then move to the feature grid of ``stride`` (AffinityNet's and IRNet's
    training)."""

    def __init__(self, data, label_dir, section: dict[str, Any], mean, std, stride: int, seed: int):
        super().__init__(data, section, mean, std, seed,
                         load_label=lambda sample: load_label_png(label_dir / f"{sample.id}.png"))
        self.stride = stride

    def target(self, label, sample):
        return torch.from_numpy(np.ascontiguousarray(downsample_labels(label, stride=self.stride)))


def setup(config: dict[str, Any], seed: int | None = None) -> torch.device:
    """Device, threads, seeds (``seed``, else the run's) and (under torchrun) the process group."""
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = resolve_device(config["device"])
    distributed.init_from_env(device)
    seed = config["seed"] if seed is None else seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return device


def dataset(config: dict[str, Any], split_key: str) -> SegmentationDataset:
    return build_dataset(config["dataset"], config["dataset"][split_key])


def label_images(config: dict[str, Any]) -> SegmentationDataset:
    """The images that get CAMs and pseudo labels: the training split plus the split on which
    pseudo labels are scored (VOC: train_aug includes train; both are usually the same)."""
    train = dataset(config, "train_split")
    if config["dataset"]["label_split"] == config["dataset"]["train_split"]:
        return train
    scored = dataset(config, "label_split")
    known = set(train.ids)
    merged = SegmentationDataset(train.name, train.root, f"{train.split}+{scored.split}", train.class_names,
                                 list(train.samples) + [s for s in scored.samples if s.id not in known],
                                 list(train.skipped) + list(scored.skipped))
    for attr in ("load_mask", "load_image"):
        setattr(merged, attr, getattr(train, attr))
    return merged


def score(config: dict[str, Any], pred_dir, split_key: str, title: str) -> dict[str, Any] | None:
    """Score the label PNGs in ``pred_dir`` on a split with ground truth; None without it.

    Every rank must call it: under torchrun each scores its share of the images and the
    confusion matrices are summed (all-reduce), so the result is exactly the single-process one
    (skipped lines in dataset order). It is returned on rank 0 only (None elsewhere), so that
    one process prints and records it.
    """

    data = dataset(config, split_key)
    if not data.has_masks:
        return None
    confusion, num_images, skipped = score_samples(data, pred_dir, distributed.shard(scored_samples(data)))
    if distributed.is_distributed():
        counts = distributed.all_reduce_sum(torch.from_numpy(confusion.state()))
        confusion = ConfusionMatrix.from_state(counts.numpy(), confusion.ignore)
        parts = distributed.all_gather_objects((num_images, skipped))
        num_images = sum(part[0] for part in parts)
        skipped = sorted(item for part in parts for item in part[1])
    if not distributed.is_main():
        return None
    result = summarize_scores(data.class_names, confusion, num_images, [line for _, line in skipped])
    result["title"] = title
    result["split"] = data.split
    return result


def table1(config: dict[str, Any], data, labelled) -> dict[str, Any]:
    """Score each (title, label folder) on the label split and print them as Table 1; the
    scores by title (``{"miou", "iou"}``) for the stage's record. Every rank must call it."""

    rows, results = {}, {}
    for title, directory in labelled:
        result = score(config, directory, "label_split", title)
        if result is not None:
            rows[title], results[title] = result["iou"], result
    if rows:
        split = next(iter(results.values()))["split"]
        print(format_table(rows, data.class_names, f"Table 1: pseudo labels on {data.name} {split} (mIoU %)"))
    return {title: {"miou": r["miou"], "iou": r["iou"]} for title, r in results.items()}


def _fine_tuning(kind: str, config: dict[str, Any], num_classes: int, model):
    """What the training loop calls before each epoch: from the first of the section's last
    ``fine_tune_epochs`` on, ``model`` (built at its ``train_output_stride``) runs at
    ``backbone.output_stride``, its inference stride; None when it trains at one stride."""

    epochs = fine_tune_epochs(kind, config)
    if not epochs:
        return None
    first = config[kind]["epochs"] - epochs
    final = geometry(build_network(kind, config, num_classes, pretrained=False))

    def at_epoch(epoch: int) -> None:
        if epoch >= first:
            if epoch == first and distributed.is_main():
                tqdm.write(f"{kind}: epochs {first + 1}-{config[kind]['epochs']} at output stride "
                           f"{config['backbone']['output_stride']} (fine_tune_epochs)")
            set_geometry(model, final)

    return at_epoch


def train_stage(config: dict[str, Any], force: bool, kind: str, make_train_set, step,
                seed: int | None = None, check=None, name: str | None = None, init=None) -> dict[str, Any]:
    """What every training stage's ``run`` does: network ``kind`` (``networks.network(kind)`` names
    the stage that trains it) trained by the shared loop
    (``training.train``) on the training split, the backbone at the base learning rate and the new
    layers at ``new_layer_lr_mult`` times it, BatchNorm frozen (the paper's setting).
    ``make_train_set(data, backbone)`` gives the stage's augmented images; ``check(data)`` refuses
    the inputs before the network is built. ``seed`` replaces the run's seed and is recorded. The
    marker holds the epochs, the images trained on (a bad image is not one), and the last epoch's
    means as ``final_loss`` and ``final_<part>``. ``name``: another stage that trains ``kind``
    (the refinement round's first segmentation network). ``init(model, data)`` sets the weights it
    starts from in place of the ImageNet ones (ReCAM's: the trained CAM network's). The training
    keys (epochs, rates, batch, crop) are ``networks.training_section(kind, config)``."""

    device = setup(config, seed)
    job = StageRun(config, name or network(kind).stage, force)
    data = dataset(config, "train_split")
    job.skipped.extend(data.skipped)
    if check is not None:
        check(data)
    model = build_network(kind, config, data.num_classes, pretrained=init is None, training=True)
    if init is not None:
        init(model, data)
    section = training_section(kind, config)
    train_set = make_train_set(data, model.backbone)
    result = train(model=model, groups=[(model.backbone_parameters(), 1.0),
                                        (model.new_parameters(), section["new_layer_lr_mult"])],
                   dataset=train_set, step=step, section=section, out_dir=job.dir,
                   seed=config["seed"] if seed is None else seed, device=device,
                   meta=network_meta(kind, config, data.class_names, model.backbone), desc=kind,
                   num_workers=config["num_workers"], amp=config["amp"], channels_last=config["channels_last"],
                   prepare=freeze_batchnorm, strict=config["strict"],
                   at_epoch=_fine_tuning(kind, config, data.num_classes, model))
    skipped = sorted(set(result.skipped))
    job.images = len(train_set) - len(skipped) if distributed.is_main() else 0
    job.skipped.extend(skipped)
    last = result.history[-1] if result.history else {}
    return job.finish(epochs=result.epochs, **({} if seed is None else {"seed": seed}),
                      **{f"final_{key}": value for key, value in last.items() if key != "epoch"})


class CAMTrainSet(AugmentedTrainSet):
    """Random rescale of the long side, then the shared augmentation (5.1); the target is the
    image's tags."""

    def rescale(self, image, label, rng):
        low, high = self.section["resize_long"]
        return transforms.random_resize_long(image, label, low, high, rng)

    def target(self, label, sample):
        return self.dataset.multi_hot(sample)


# The keys of every segmentation network's training: train_seg's and the refinement round's first
# network's (draft_seg).
SEGMENTATION_KEYS = (("seed", "backbone", "segmentation.head", "segmentation.supervision",
                      "segmentation.scale_range") + training_keys("segmentation"))
SEGMENTATION_OPTIONAL_KEYS = ("segmentation.seed", "segmentation.train_output_stride",
                              "segmentation.fine_tune_epochs")


class SegTrainSet(AugmentedTrainSet):
    """Random rescale, then the shared augmentation with the label padded by 255 (5.1)."""

    def rescale(self, image, label, rng):
        return transforms.random_scale(image, label, self.section["scale_range"], rng)

    def target(self, label, sample):
        return torch.from_numpy(label.astype(np.int64))


def label_loader(config: dict[str, Any], data, labels: Stage) -> Callable[[Any], np.ndarray]:
    """The training labels of a sample: its PNG in the ``pseudo_labels`` of stage ``labels`` (3.4)
    or its ground-truth mask."""
    supervision = config["segmentation"]["supervision"]
    num_classes = data.num_classes
    label_dir = labels.output("pseudo_labels", config)

    def load(sample) -> np.ndarray:
        if supervision == "gt":
            path = sample.mask_path or sample.image_path
            label = data.load_mask(sample)
            if label is None:
                raise InputError(path, "no ground-truth mask (segmentation.supervision is 'gt')")
        else:
            path = label_dir / f"{sample.id}.png"
            label = load_label_png(path)
        # An out-of-range index would abort cross-entropy for the whole batch; refuse the file.
        bad = (label >= num_classes) & (label != IGNORE_INDEX)
        if bad.any():
            raise InputError(path, f"label value {int(label[bad].max())} out of range "
                                   f"(0..{num_classes - 1} or {IGNORE_INDEX})")
        return label

    return load


def check_labels_exist(config: dict[str, Any], data, labels: Stage) -> None:
    """Fail at once, with the fix, when no training image has a label, instead of skipping them
    all one by one through an epoch that learns nothing."""
    if config["segmentation"]["supervision"] == "gt":
        if not data.has_masks:
            raise TrainingError(f"segmentation.supervision is 'gt' but {data.name} split '{data.split}' has "
                                f"no ground-truth masks; use segmentation.supervision=pseudo")
        return
    label_dir = labels.output("pseudo_labels", config)
    if not any((label_dir / f"{sample.id}.png").exists() for sample in data.samples):
        raise TrainingError(f"no pseudo labels for the {data.split} split in {label_dir}: run "
                            f"`affinitynet {labels.command}` first (or segmentation.supervision=gt)")


def segmentation_step(model, batch):
    """Mean cross-entropy over the labelled pixels of the batch; a crop with no labelled pixel
    (all padding or neutral) contributes zero instead of making the loss NaN."""
    images, labels = batch
    logits = model(images)
    valid = labels != IGNORE_INDEX
    count = valid.sum().clamp(min=1)
    loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / count
    with torch.no_grad():
        correct = ((logits.argmax(1) == labels) & valid).sum()
    return loss, {"pixel_accuracy": float(correct) / float(count)}


def train_segmentation(config: dict[str, Any], force: bool, labels: Stage, name: str | None = None) -> dict[str, Any]:
    """The segmentation network trained on the ``pseudo_labels`` of stage ``labels`` (or on the
    ground truth), under the ``segmentation`` section and its seed, by stage ``name`` (default
    ``train_seg``)."""
    section = config["segmentation"]
    seed = config["seed"] if section["seed"] is None else section["seed"]
    return train_stage(config, force, "segmentation",
                       lambda data, backbone: SegTrainSet(data, section, backbone.mean, backbone.std, seed,
                                                          label_loader(config, data, labels)),
                       segmentation_step, seed=seed, check=lambda data: check_labels_exist(config, data, labels),
                       name=name)


def segmentation_model(config: dict[str, Any], name: str, device: torch.device, class_names):
    """(network ready for inference on ``device``, meta) of the segmentation ``model.pt`` of stage
    ``name`` (``train_seg``, or the refinement round's ``draft_seg``). The checkpoint's meta, not
    the config, says how the network was built: the stage hash already ties it to the current
    training settings."""
    path = stage(name).output("model", config)
    model, meta = model_from_checkpoint(path, device)
    check_meta(path, meta, class_names, command=stage(name).command)
    return for_inference(model, device, config["amp"], config["channels_last"]), meta


def model_path(kind: str, config: dict[str, Any], name: str | None = None) -> Path:
    """The ``model.pt`` of the stage that trains ``kind`` (or of stage ``name``, another that does)."""
    return stage(name or network(kind).stage).output("model", config)


def load_network(kind: str, config: dict[str, Any], device: torch.device, num_classes: int,
                 class_names=None, name: str | None = None) -> nn.Module:
    """The ``kind`` network of the run (``num_classes`` with background), from its stage's
    ``model.pt``, checked against the config's backbone and layout and, given, the dataset's
    classes; in eval mode on ``device``. ``name``: another stage that trains ``kind`` (the first
    AffinityNet of ``affinity.refine_cams``)."""
    model = build_network(kind, config, num_classes, pretrained=False)
    path, state = trained_weights(kind, config, class_names, name)
    load_weights(model, state, path)
    return model.to(device).eval()


def trained_weights(kind: str, config: dict[str, Any], class_names=None,
                    name: str | None = None) -> tuple[Path, dict[str, Any]]:
    """(path, state dict) of the ``kind`` network's ``model.pt`` in the run (in stage ``name``,
    given), checked as :func:`load_network` checks it."""
    path = model_path(kind, config, name)
    state, meta = load_checkpoint_meta(path)
    check_meta(path, meta, class_names, config["backbone"]["name"], stage(name or network(kind).stage).command,
               layout(kind, config))
    return path, state


def start(config: dict[str, Any], name: str, force: bool):
    """What IRN's inference stages begin with: the device, the stage's record, the label images
    (their refused inputs recorded) and the trained IRNet."""
    device = setup(config)
    job = StageRun(config, name, force)
    data = label_images(config)
    job.skipped.extend(data.skipped)
    model = load_network("irn", config, device, data.num_classes, data.class_names)
    return device, job, data, for_inference(model, device, config["amp"], config["channels_last"])


def affinity_features(model, image: np.ndarray, device: torch.device, flip: bool = False) -> torch.Tensor:
    """AffinityNet's features f of an RGB image (3.3), on ``device``: what its pair affinities
    (Eq. 3) and boundary map are computed from. With ``flip`` (``random_walk.flip``), the mean of
    the features of the image and of its mirror image, mirrored back: the test-time flip of the
    CAMs (4.2), one batch of two. Call it under ``torch.no_grad()``."""
    batch = transforms.normalize(image, model.backbone.mean, model.backbone.std)[None].to(device)
    if not flip:
        return model.features(batch)[0]
    both = model.features(torch.cat([batch, batch.flip(-1)]))
    return (both[0] + both[1].flip(-1)) / 2


def relations(model, image: np.ndarray, radius: int, device: torch.device):
    """IRNet's boundary map and displacement field of an RGB image (``irnet.predict``), and the
    path-max affinities of the boundary map (on the CPU)."""
    with torch.no_grad():
        boundary, displacement = predict(model, transforms.normalize(image, model.backbone.mean,
                                                                     model.backbone.std).to(device))
        return boundary, displacement, path_max_affinities(boundary, radius).float().cpu()


def train_on_pairs(config: dict[str, Any], force: bool, kind: str, stride: int, step,
                   regions: str = "confident_regions", name: str | None = None) -> dict[str, Any]:
    """:func:`train_stage` for a network that learns from the pairs of the confident regions
    (AffinityNet, IRNet): :class:`AffinityTrainSet` with the labels on the grid of ``stride``.
    ``regions``, ``name``: the stage of the confident regions and the stage that trains (the first
    AffinityNet of ``affinity.refine_cams``: ``draft_regions``, ``draft_affinity``)."""
    labels = stage(regions).output("labels", config)
    section = config[kind]
    return train_stage(config, force, kind,
                       lambda data, backbone: AffinityTrainSet(data, labels, section, backbone.mean, backbone.std,
                                                               stride, config["seed"]),
                       step, name=name)


# AffinityNet's training (train_affinity, and draft_affinity under affinity.refine_cams): its keys.
AFFINITY_KEYS = (("seed", "backbone", "affinity.radius", "affinity.distance", "affinity.channels")
                 + training_keys("affinity"))
AFFINITY_OPTIONAL_KEYS = ("affinity.backbone_stride",)


def affinity_step(radius: int, distance: str):
    """AffinityNet's training step: the class-balanced loss (Eq. 7-10) on the pairs within ``radius``."""

    def step(model, batch):
        images, grid_labels = batch
        distances = feature_distances(model(images), radius, distance)
        masks = pair_labels(grid_labels, radius)
        loss, parts = affinity_loss_from_distances(distances, masks["pos_fg"], masks["pos_bg"], masks["neg"])
        return loss, {part: float(value) for part, value in parts.items()}

    return step


def train_affinitynet(config: dict[str, Any], force: bool, regions: str = "confident_regions",
                      name: str | None = None) -> dict[str, Any]:
    """AffinityNet trained on the pairs of the confident regions of stage ``regions`` (3.2.2,
    Eq. 7-10), its labels on the walk's grid whatever stride the backbone runs at."""
    step = affinity_step(config["affinity"]["radius"], config["affinity"]["distance"])
    return train_on_pairs(config, force, "affinity", config["backbone"]["output_stride"], step, regions, name)


# The confident regions' keys (confident_regions, and draft_regions under affinity.refine_cams).
REGION_KEYS = ("affinity.alpha_low", "affinity.alpha_high", "crf")
REGION_OPTIONAL_KEYS = ("affinity.confidence", "affinity.conf_fg_threshold", "affinity.conf_bg_threshold")


def cut_confident_regions(config: dict[str, Any], force: bool, name: str, cams: Stage) -> dict[str, Any]:
    """Stage ``name``: the confident object / background / neutral label maps of the CAMs that
    stage ``cams`` wrote (3.2.1, Fig. 4a), low and high alpha each refined by the dense CRF; or,
    with ``affinity.confidence: threshold``, irn's constant thresholds. Records the share of
    confident pixels."""
    setup(config)
    job = StageRun(config, name, force)
    data = dataset(config, "train_split")
    job.skipped.extend(data.skipped)
    cam_dir = cams.output("cams", config)
    out_dir = stage(name).output("labels", config)
    section = config["affinity"]
    crf_params = CRFParams.from_config(config["crf"])

    counted: dict[str, tuple[int, int]] = {}   # confident and all pixels of each image's map

    def work(sample):
        image = data.load_image(sample)
        stored = load_npz(cam_dir / f"{sample.id}.npz")
        maps, classes = stored["cams"].astype("float32"), stored["classes"].tolist()
        if section["confidence"] == "threshold":
            labels = threshold_confident_regions(image, maps, classes, section["conf_fg_threshold"],
                                                 section["conf_bg_threshold"])
        else:
            labels = confident_regions(image, maps, classes, section["alpha_low"], section["alpha_high"], crf_params)
        save_label_png(out_dir / f"{sample.id}.png", labels)
        counted[sample.id] = (int((labels != NEUTRAL).sum()), labels.size)

    map_images(job, data.samples, lambda s: [out_dir / f"{s.id}.png"], work, stage(name).command,
               config["strict"])
    # A resumed stage's share covers the maps an earlier run wrote too; each process counts its shard.
    for sample in distributed.shard(data.samples):
        path = out_dir / f"{sample.id}.png"
        if sample.id not in counted and path.exists():
            labels = load_label_png(path)
            counted[sample.id] = (int((labels != NEUTRAL).sum()), labels.size)
    counts = torch.tensor([sum(c for c, _ in counted.values()), sum(n for _, n in counted.values())])
    confident, pixels = distributed.all_reduce_sum(counts).tolist()
    share = confident / pixels if pixels else None
    if share is not None and distributed.is_main():
        print(f"[{name}] confident pixels: {100 * share:.1f}% (neutral {100 * (1 - share):.1f}%)")
    return job.finish(confident_share=share)
