"""Experiment configuration: the paper's hyper-parameters as defaults, YAML files, command-line
overrides, validation with one-line errors, and per-stage hashes for resumable runs.

The defaults are the paper's settings (PASCAL VOC 2012, ResNet-38, Section 5.1); the shipped YAML
files (``affinitynet/configs/*.yaml``) override what differs for their experiment.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from .errors import ConfigError
from .io import write_text

# The paper's values (Section 5.1, 4.2) unless a comment says otherwise.
DEFAULTS: dict[str, Any] = {
    "run_dir": "runs/voc12",
    "seed": 0,
    "device": "auto",
    "num_workers": 0,
    "threads": 0,
    "strict": False,
    "amp": "auto",                     # mixed precision: auto (bf16/fp16 on CUDA, off on CPU), native, bf16, fp16, off
    "channels_last": "auto",           # NHWC convolutions: auto (CUDA with AMP, CPU inference), on, off
    "dataset": {
        "name": "voc12",
        "root": None,
        "protocol": "object",          # msrc21 only: "object" (14 + background) or "standard21"
        "train_split": "train_aug",    # CAM, AffinityNet and segmentation training images
        "label_split": "train",        # split on which pseudo labels are scored (Table 1)
        "eval_split": "val",           # split on which the segmentation network is scored (Table 2)
        "labels_file": None,           # folder dataset: CSV or JSON of tags per image
        "classes_file": None,          # folder dataset: class names, one per line
        "demo_size": 128,              # demo dataset: image side in pixels
        "demo_train": 240,             # demo dataset: images in the train split
        "demo_val": 60,                # demo dataset: images in the val split
        "demo_seed": 0,                # demo dataset: generator seed
        "masks_dir": None,             # folder dataset: optional ground-truth masks
        "max_skipped": 0.1,            # share of images left out (bad tags, untagged) that stops a run
    },
    "backbone": {
        "name": "resnet38d",
        "weights": None,               # file with ImageNet weights; None: the packaged ones, if any
        "output_stride": 8,
        "atrous": True,                # dilate past the output stride (4.1); false: irn's undilated ResNet-50
    },
    "labels": {
        "method": "affinitynet",       # the pseudo-label method: a stage that declares it (pipeline.label_methods)
    },
    "cam": {
        "head": "conv",                # the 3x3 conv of Section 4.2; "psa"/"irn": the released 1x1 classifier only
        "head_channels": 512,          # the 3x3 conv of Section 4.2
        "train_output_stride": None,   # null: backbone.output_stride; 16: trained at 16, run at 8 (atrous)
        "fine_tune_epochs": 0,         # the last N epochs at backbone.output_stride (DeepLab's fine-tuning at 8)
        "crop_size": 448,
        "resize_long": [256, 512],     # random rescale of the long side (released code)
        "color_jitter": [0.3, 0.3, 0.3, 0.1],
        "batch_size": 16,
        "epochs": 15,
        # The paper says Adam without a rate; the released code's SGD at lr 0.1 ran with momentum
        # 5e-4 (weight decay passed into the momentum slot). Momentum 0.9 multiplies SGD's
        # steady-state step by 1 / (1 - 0.9) = 10, so lr 0.01 keeps the code's step,
        # 0.01 / (1 - 0.9) = 0.1 = 0.1 / (1 - 5e-4) to 0.05% (README, "Running on PASCAL VOC 2012").
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "poly_power": 0.9,
        "new_layer_lr_mult": 10.0,
        "method": "cam",               # how maps are read off the network: Eq. 1, or a registered CAM method
        "scales": [1.0, 0.5, 1.5, 2.0],
        "flip": True,
        "eval_alpha": 16.0,            # background (1 - max M)^alpha for the "CAM" row of Table 1
        "eval_bg_threshold": None,     # or a constant background score (released code: 0.2)
    },
    "crf": {
        "gaussian_sxy": 3.0,
        "gaussian_compat": 3.0,
        "bilateral_sxy": 80.0,
        "bilateral_srgb": 13.0,
        "bilateral_compat": 10.0,
        "iterations": 10,
    },
    "affinity": {
        "alpha_low": 4.0,              # amplified background: confident objects
        "alpha_high": 24.0,            # weakened background: confident background (code: 32)
        "radius": 5,                   # gamma of Eq. 4
        "distance": "mean",            # "mean" over channels (released code) or "sum" (Eq. 3)
        "channels": [128, 256, 512],   # 1x1 reductions of the last three levels (4.2; psa: 64, 128, 256)
        "backbone_stride": None,       # null: backbone.output_stride; 16: run at 16, f_aff upsampled to 8
        "crop_size": 448,
        "color_jitter": [0.3, 0.3, 0.3, 0.1],
        "batch_size": 8,
        "epochs": 8,
        # As for the CAM network; and Eq. 10's loss is 4x the released code's (L+_bg/4 + L+_fg/4 +
        # L-/2), so are its gradients g: lr 0.1 * (1 - 0.9) / 4 = 0.0025, and weight decay 4 * 5e-4
        # so that decay keeps its share of the step: 0.0025 / (1 - 0.9) * (4 g + 2e-3 w) is the
        # code's 0.1 * (g + 5e-4 w).
        "optimizer": "sgd",
        "lr": 0.0025,
        "momentum": 0.9,
        "weight_decay": 2e-3,
        "poly_power": 0.9,
        "new_layer_lr_mult": 10.0,
    },
    "random_walk": {
        "alpha": 16.0,                 # background of Eq. 2 for the walk's input CAMs
        "beta": 8.0,                   # Hadamard power of Eq. 11
        "t": 256,                      # iterations of Eq. 12
        "radius": 5,
        "scale": 1.0,                  # AffinityNet's input scale for the walk (finer grid above 1)
        "crf": "full",                 # the paper's dCRF on the walked labels; "band" or "off" (pseudo_labels.py)
    },
    "irn": {                           # labels.method: irn (IRN, Ahn, Cho & Kwak 2019), on the stride-4 grid
        "radius": 5,                   # pairs of the boundary loss and of the walk (irn: 10 to train, 5 to walk)
        "alpha": 16.0,                 # background of Eq. 2 for the walk's input CAMs (irn: a constant 0.25)
        "beta": 10.0,                  # Hadamard power of the boundary affinities (irn's)
        "t": 256,                      # walk iterations (irn: 256)
        "crf": "band",                 # refinement of the walked labels, as random_walk.crf
        "crop_size": 448,
        "color_jitter": [0.3, 0.3, 0.3, 0.1],
        "batch_size": 8,
        "epochs": 3,                   # irn's
        "optimizer": "sgd",            # irn: SGD at 0.1 without momentum, weight decay 1e-4, poly
        "lr": 0.1,
        "momentum": 0.0,
        "weight_decay": 1e-4,
        "poly_power": 0.9,
        "new_layer_lr_mult": 1.0,      # every trained layer is new: the backbone is frozen
    },
    "segmentation": {
        "head": "resnet38",            # two 3x3 atrous convs, dilation 12 (Section 4.2)
        "supervision": "pseudo",       # "pseudo" labels, or "gt" for the fully supervised bound
        "train_output_stride": None,   # as cam.train_output_stride
        "fine_tune_epochs": 0,         # as cam.fine_tune_epochs
        "seed": None,                  # null: the run's seed; another: the same labels, another training
        "crop_size": 448,
        "scale_range": [0.7, 1.3],
        "color_jitter": [0.3, 0.3, 0.3, 0.1],
        "batch_size": 8,
        "epochs": 30,
        "optimizer": "adam",           # Section 5.1; or "sgd"
        "lr": 1e-4,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "poly_power": 0.9,             # the poly schedule, for Adam as for SGD; 0: constant lr
        "new_layer_lr_mult": 10.0,
        "scales": [0.5, 0.75, 1.0, 1.25, 1.5],   # Appendix A.2
        "flip": True,
        "crf": False,
    },
    "report": {
        "gallery_size": 8,
    },
    "sweep": {
        "betas": [2.0, 4.0, 8.0, 16.0, 32.0],
        "ts": [16, 32, 64, 128, 256],
        "alphas": [4.0, 8.0, 16.0, 24.0, 32.0],
        "max_images": 0,               # 0: the whole label split
    },
}


# What each key means, for `affinitynet config show` (every key of DEFAULTS has a line; a test
# holds it). The three training sections share their training keys' meanings.
_TRAINING_HELP = {
    "crop_size": "training crop side in pixels ('auto': from the image size)",
    "color_jitter": "brightness, contrast, saturation, hue jitter",
    "batch_size": "images per step (split over the processes of a distributed run)",
    "epochs": "passes over the training images",
    "optimizer": "'sgd' or 'adam'",
    "lr": "base learning rate of the backbone (new layers: times new_layer_lr_mult)",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay",
    "poly_power": "poly schedule lr * (1 - step/total)^power; 0 keeps the rate constant",
    "new_layer_lr_mult": "learning-rate multiplier of the layers added to the backbone",
}
KEY_HELP: dict[str, str] = {
    "run_dir": "output directory of the run (every stage writes a folder in it)",
    "seed": "seed of every random choice (initialisation, crops, order)",
    "device": "'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'",
    "num_workers": "data-loading processes per training process (0: load in the training process)",
    "threads": "torch threads per process (0: torch's default, all cores)",
    "strict": "stop at the first bad input instead of skipping it",
    "amp": ("mixed precision: 'auto' (bf16/fp16 on CUDA, off on CPU), 'native' (as auto on CUDA, bf16 on a CPU "
            "with AVX512-BF16 or AMX), 'bf16', 'fp16', 'off'"),
    "channels_last": "NHWC convolutions: 'auto' (CUDA with AMP; CPU inference), 'on', 'off'",
    "dataset.name": "a registered dataset (affinitynet datasets list): demo, msrc21, voc12, folder (your photos), ...",
    "dataset.root": "dataset directory",
    "dataset.protocol": "msrc21: 'object' (14 classes + background) or 'standard21'",
    "dataset.train_split": "split the CAM network, AffinityNet and the segmentation network train on",
    "dataset.label_split": "split whose pseudo labels are scored (Table 1)",
    "dataset.eval_split": "split the segmentation network is scored on (Table 2)",
    "dataset.labels_file": "folder: CSV or JSON of tags per image (a path, or a name inside the root)",
    "dataset.classes_file": "folder: object class names, one per line (unknown tags are then refused)",
    "dataset.demo_size": "demo: image side in pixels",
    "dataset.demo_train": "demo: images in the train split",
    "dataset.demo_val": "demo: images in the val split",
    "dataset.demo_seed": "demo: generator seed",
    "dataset.masks_dir": "folder: optional ground-truth masks (index PNGs named <id>.png)",
    "dataset.max_skipped": "share of the images left out (bad tags, untagged, unreadable) that stops a run",
    "backbone.name": "mobilenetv2, efficientnet_lite0, efficientnet_lite2, resnet38d, resnet50 or vgg16",
    "backbone.weights": "ImageNet weight file (null: the packaged weights, where a backbone has them)",
    "backbone.output_stride": "8 or 16: the feature map is 1/output_stride of the image",
    "labels.method": "pseudo-label method whose labels train the segmentation network ('affinitynet': 3.2-3.4)",
    "cam.head_channels": "channels of the CAM network's 3x3 conv (Sec. 4.2)",
    "cam.head": "'conv' (3x3 conv + GAP + 1x1, Sec. 4.2), 'psa' (psa's 1x1 fc8 on the backbone) or 'irn'",
    "cam.train_output_stride": "null (backbone.output_stride) or 16: trained at 16, the head dilated to run at 8",
    "cam.fine_tune_epochs": ("with train_output_stride 16: the last N epochs train at backbone.output_stride, "
                             "the stride the network runs at (DeepLab's fine-tuning at 8)"),
    "affinity.channels": "AffinityNet's 1x1 conv widths on the last three levels (psa's: [64, 128, 256])",
    "affinity.backbone_stride": ("null (backbone.output_stride) or 16: AffinityNet's backbone runs at 16 in "
                                 "training and walk, its levels upsampled to the walk's grid"),
    "backbone.atrous": "strides past the output stride become dilations; false: irn's undilated ResNet-50",
    "cam.resize_long": "random rescale range of the long side before cropping ('auto': from the image size)",
    "cam.method": "a registered CAM method: 'cam' (Eq. 1) or 'gradcam' (Grad-CAM)",
    "cam.scales": "CAM inference scales, each with its flip (Eq. 1; 'auto': from the image size)",
    "cam.flip": "add horizontally flipped CAMs",
    "cam.eval_alpha": "background (1 - max M)^alpha of the 'CAM' row of Table 1 (Eq. 2)",
    "cam.eval_bg_threshold": "or a constant background score (the released code's 0.2); null: use alpha",
    "crf.gaussian_sxy": "dCRF smoothness kernel width (pixels)",
    "crf.gaussian_compat": "dCRF smoothness kernel weight",
    "crf.bilateral_sxy": "dCRF appearance kernel width (pixels)",
    "crf.bilateral_srgb": "dCRF appearance kernel colour width",
    "crf.bilateral_compat": "dCRF appearance kernel weight",
    "crf.iterations": "dCRF mean-field iterations",
    "affinity.alpha_low": "low alpha: amplified background, confident objects (3.2.1)",
    "affinity.alpha_high": "high alpha: weakened background, confident background (3.2.1)",
    "affinity.radius": "gamma of Eq. 4: pairs within this radius on the feature grid",
    "affinity.distance": "Eq. 3 over feature channels: 'mean' (released code) or 'sum' (L1 norm)",
    "random_walk.alpha": "background alpha of the walk's input CAMs (Eq. 2)",
    "random_walk.beta": "Hadamard power of the affinities (Eq. 11)",
    "random_walk.t": "walk iterations (Eq. 12; 'auto': from the feature grid's area)",
    "random_walk.radius": "radius of the affinity matrix's pairs",
    "random_walk.scale": "AffinityNet's input scale for the walk (above 1: a finer grid)",
    "random_walk.crf": ("refinement of the walked labels that train the network: 'full' (the paper's dCRF), "
                        "'band' (the dCRF within half a grid cell of the walk's boundaries), 'off'"),
    "irn.radius": "IRN: radius of the pairs on the stride-4 grid (boundary loss and walk)",
    "irn.alpha": "IRN: background (1 - max M)^alpha of the walk's input CAMs (Eq. 2)",
    "irn.beta": "IRN: Hadamard power of the path-max affinities",
    "irn.t": "IRN: walk iterations",
    "irn.crf": "IRN: refinement of the walked labels: 'band', 'full' (the dCRF) or 'off', as random_walk.crf",
    "segmentation.head": "'resnet38' (two 3x3 atrous convs) or 'deeplab_largefov'",
    "segmentation.train_output_stride": "null (backbone.output_stride) or 16: trained at 16, run at 8",
    "segmentation.fine_tune_epochs": "as cam.fine_tune_epochs",
    "segmentation.supervision": "'pseudo' labels, or 'gt' for the fully supervised bound",
    "segmentation.seed": ("seed of the segmentation network's training (null: the run's 'seed'); another "
                          "value retrains the network alone on the same pseudo labels, for the seed spread"),
    "segmentation.scale_range": "random rescale range of the training images",
    "segmentation.scales": "inference scales, each with its flip (A.2; 'auto': from the image size)",
    "segmentation.flip": "add horizontally flipped predictions",
    "segmentation.crf": "dCRF on the network's predictions",
    "report.gallery_size": "label-split images in the report's gallery (at least one per class)",
    "sweep.betas": "beta values of the Fig. 8 sweep",
    "sweep.ts": "t values of the Fig. 8 sweep",
    "sweep.alphas": "alpha values of the Fig. 8 sweep",
    "sweep.max_images": "images the sweep scores (0: the whole label split)",
}
for _section, _what in (("cam", "CAM network"), ("affinity", "AffinityNet"), ("irn", "IRNet"),
                        ("segmentation", "segmentation network")):
    KEY_HELP.update({f"{_section}.{key}": f"{_what}: {text}" for key, text in _TRAINING_HELP.items()})


@dataclass(frozen=True)
class Rule:
    describe: str
    check: Callable[[Any], bool]
    # The names a value is one of, for the "did you mean" of a misspelt one.
    choices: Callable[[], Iterable[str]] | None = None


def did_you_mean(value: Any, names: Iterable[str]) -> str:
    """`` (did you mean 'mobilenetv2'?)`` for a string close to one of ``names``, else ``""``."""
    if not isinstance(value, str):
        return ""
    close = difflib.get_close_matches(value, list(names), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _bound(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _number(low: float | None = None, high: float | None = None, *, strict_low: bool = False,
            integer: bool = False, optional: bool = False) -> Rule:
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if strict_low else '>='} {_bound(low)}")
    if high is not None:
        bounds.append(f"<= {_bound(high)}")
    describe = ("an integer" if integer else "a number") + (" " + " and ".join(bounds) if bounds else "")
    if optional:
        describe += " (or null)"

    def check(value: Any) -> bool:
        if value is None:
            return optional
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if integer and not isinstance(value, int):
            return False
        if value != value or value in (float("inf"), float("-inf")):  # NaN, infinity
            return False
        if low is not None and (value <= low if strict_low else value < low):
            return False
        return high is None or value <= high

    return Rule(describe, check)


def _choice(*options: str) -> Rule:
    return Rule("one of " + ", ".join(repr(o) for o in options), lambda v: isinstance(v, str) and v in options,
                lambda: options)


class _Registered:
    """A rule whose choices are a registry's names, read when a config is checked (the parts
    register themselves on import, after this module)."""

    def __init__(self, registry: Callable[[], Any]):
        self._registry = registry

    def choices(self) -> list[str]:
        return list(self._registry().names())

    @property
    def describe(self) -> str:
        return "one of " + ", ".join(repr(name) for name in self.choices())

    def check(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.choices()


def _dataset_registry():
    from .datasets import DATASETS

    return DATASETS


def _cam_head_registry():
    from .cam import HEADS

    return HEADS


def _cam_method_registry():
    from .cam import METHODS

    return METHODS


def _segmentation_head_registry():
    from .segmentation import HEADS

    return HEADS


def _backbone_registry():
    from .backbones import BACKBONES

    return BACKBONES


# Longer strings are no path or name a user meant; a NUL byte is no path the OS can open.
_MAX_STRING = 4096


def _string(optional: bool = False) -> Rule:
    return Rule("a string" + (" (or null)" if optional else ""),
                lambda v: (isinstance(v, str) and v != "" and len(v) <= _MAX_STRING and "\0" not in v)
                or (optional and v is None))


def _is_plain_name(value: Any) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= 255 and value not in (".", "..")
            and not any(c in value for c in "/\\\0"))


def _name() -> Rule:
    """A split's name: a file name inside the dataset, never a path out of it."""
    return Rule("a name without path separators", _is_plain_name)


def _boolean() -> Rule:
    return Rule("true or false", lambda v: isinstance(v, bool))


def _number_list(low: float = 0.0, high: float | None = None, length: int | None = None, strict_low: bool = True,
                 integer: bool = False, max_length: int = 64) -> Rule:
    item = _number(low, high, strict_low=strict_low, integer=integer)
    size = f"{length} " if length else f"a list of 1 to {max_length} "
    describe = f"{size}{'integers' if integer else 'numbers'} each {item.describe.split(' ', 2)[-1]}"

    def check(value: Any) -> bool:
        return (isinstance(value, list) and 0 < len(value) <= (length or max_length)
                and (length is None or len(value) == length) and all(item.check(v) for v in value))

    return Rule(describe, check)


RULES: dict[str, Rule | _Registered] = {
    "run_dir": _string(),
    "seed": _number(0, 2**32 - 1, integer=True),   # numpy's seeds are 32-bit
    "device": Rule("'auto', 'cpu', 'cuda' or 'cuda:N'",
                   lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or
                                                     (v.startswith("cuda:") and v[5:].isdigit()))),
    "num_workers": _number(0, 64, integer=True),
    "threads": _number(0, 256, integer=True),
    "strict": _boolean(),
    # YAML reads on/off as booleans, which mean the same here.
    "amp": Rule("one of 'auto', 'native', 'bf16', 'fp16', 'off' (or true/false)",
                lambda v: isinstance(v, bool) or v in ("auto", "native", "bf16", "fp16", "off")),
    "channels_last": Rule("one of 'auto', 'on', 'off' (or true/false)",
                          lambda v: isinstance(v, bool) or v in ("auto", "on", "off")),
    "dataset.name": _Registered(_dataset_registry),
    "dataset.root": _string(optional=True),
    "dataset.protocol": _choice("object", "standard21"),
    "dataset.train_split": _name(),
    "dataset.label_split": _name(),
    "dataset.eval_split": _name(),
    "dataset.labels_file": _string(optional=True),
    "dataset.classes_file": _string(optional=True),
    "dataset.demo_size": _number(32, 1024, integer=True),
    "dataset.demo_train": _number(1, 1_000_000, integer=True),
    "dataset.demo_val": _number(1, 1_000_000, integer=True),
    "dataset.demo_seed": _number(0, 2**32 - 1, integer=True),
    "dataset.masks_dir": _string(optional=True),
    "dataset.max_skipped": _number(0, 1),
    "backbone.name": _Registered(_backbone_registry),
    "backbone.weights": _string(optional=True),
    "backbone.output_stride": Rule("8 or 16", lambda v: v in (8, 16) and not isinstance(v, bool)),
    "backbone.atrous": _boolean(),
    "cam.head": _Registered(_cam_head_registry),
    "cam.train_output_stride": Rule("null, 8 or 16", lambda v: v in (None, 8, 16) and not isinstance(v, bool)),
    "cam.fine_tune_epochs": _number(0, 10_000, integer=True),
    "cam.method": _Registered(_cam_method_registry),
    "cam.eval_alpha": _number(1, 1000),
    "cam.eval_bg_threshold": _number(0, 1, optional=True),
    "affinity.alpha_low": _number(1, 1000),
    "affinity.alpha_high": _number(1, 1000),
    "affinity.radius": _number(1, 64, integer=True),
    "affinity.distance": _choice("mean", "sum"),
    "affinity.channels": _number_list(1, 8192, length=3, strict_low=False, integer=True),
    "affinity.backbone_stride": Rule("null, 8 or 16", lambda v: v in (None, 8, 16) and not isinstance(v, bool)),
    "random_walk.alpha": _number(1, 1000),
    "random_walk.beta": _number(0, 1000, strict_low=True),
    "random_walk.t": _number(1, 1_000_000, integer=True),
    "random_walk.radius": _number(1, 64, integer=True),
    "random_walk.scale": _number(0, 8, strict_low=True),
    # true and false: the older spellings of 'full' and 'off'.
    "random_walk.crf": Rule("one of 'band', 'full', 'off' (or true/false)",
                            lambda v: isinstance(v, bool) or v in ("band", "full", "off")),
    "irn.radius": _number(2, 16, integer=True),
    "irn.alpha": _number(1, 1000),
    "irn.beta": _number(0, 1000, strict_low=True),
    "irn.t": _number(1, 1_000_000, integer=True),
    "irn.crf": _choice("band", "full", "off"),
    "segmentation.head": _Registered(_segmentation_head_registry),
    "segmentation.train_output_stride": Rule("null, 8 or 16", lambda v: v in (None, 8, 16) and not isinstance(v, bool)),
    "segmentation.fine_tune_epochs": _number(0, 10_000, integer=True),
    "segmentation.supervision": _choice("pseudo", "gt"),
    "segmentation.seed": _number(0, 2**32 - 1, integer=True, optional=True),
    "crf.iterations": _number(0, 1000, integer=True),
    "report.gallery_size": _number(0, 1000, integer=True),
    "sweep.betas": _number_list(0.0, 1000),
    "sweep.ts": _number_list(1, 1_000_000, strict_low=False, integer=True),
    "sweep.alphas": _number_list(1, 1000, strict_low=False),
    "sweep.max_images": _number(0, 10**9, integer=True),
}
for _section in ("cam", "affinity", "irn", "segmentation"):
    RULES.update({
        f"{_section}.crop_size": _number(16, 4096, integer=True),
        f"{_section}.color_jitter": _number_list(0.0, 10, length=4, strict_low=False),
        f"{_section}.batch_size": _number(1, 4096, integer=True),
        f"{_section}.epochs": _number(1, 10_000, integer=True),
        f"{_section}.optimizer": _choice("sgd", "adam"),
        f"{_section}.lr": _number(0, 10, strict_low=True),
        f"{_section}.momentum": _number(0, 1),
        f"{_section}.weight_decay": _number(0, 1),
        f"{_section}.poly_power": _number(0, 100),
        f"{_section}.new_layer_lr_mult": _number(0, 1000, strict_low=True),
    })
RULES.update({
    "cam.head_channels": _number(1, 8192, integer=True),
    "cam.resize_long": _number_list(16, 8192, length=2, strict_low=False, integer=True),
    "cam.scales": _number_list(0.0, 8, max_length=16),
    "cam.flip": _boolean(),
    "segmentation.scale_range": _number_list(0.0, 8, length=2),
    "segmentation.scales": _number_list(0.0, 8, max_length=16),
    "segmentation.flip": _boolean(),
    "segmentation.crf": _boolean(),
})
for _key in ("gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat"):
    RULES[f"crf.{_key}"] = _number(0, 10_000)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def defaults() -> dict[str, Any]:
    """A copy of DEFAULTS with the keys of every registered dataset (a dataset declares its own
    keys and their defaults where it is defined, ``datasets.register_dataset``)."""
    tree = copy.deepcopy(DEFAULTS)
    for entry in _dataset_registry():
        for key, value in entry.info["keys"].items():
            tree["dataset"].setdefault(key, copy.deepcopy(value))
    return tree


def _known_keys() -> set[str]:
    return set(flatten(defaults()))


def get(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    return node


def _set(config: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    known = _known_keys()
    section = _default_at(dotted)
    if isinstance(section, dict):  # e.g. "random_walk: 5": a section given a value
        raise ConfigError(f"{source}: '{dotted}' is a section of keys, not a value "
                          f"(its keys: {', '.join(sorted(flatten(section)))})")
    if dotted not in known:
        sections = {k.split(".")[0] for k in known if "." in k}
        head = dotted.split(".")[0]
        if head in sections and "." in dotted:
            choices = sorted(k.split(".", 1)[1] for k in known if k.startswith(head + "."))
            hint = f"known keys in '{head}': {', '.join(choices)}"
        else:
            hint = "known top-level keys: " + ", ".join(sorted({k.split('.')[0] for k in known}))
        raise ConfigError(f"{source}: unknown config key '{dotted}' ({hint})")
    _assign(config, dotted, value)


def show_value(value: Any) -> str:
    """A value as it is written in a ``key=value`` override (``[64,128,256]``, ``false``, ``psa``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(show_value(v) for v in value) + "]"
    return str(value)


def set_value(config: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Set one known key (``source`` names who sets it in the error for an unknown key); call
    :func:`validate` afterwards."""
    _set(config, dotted, value, source)


def _merge(config: dict[str, Any], tree: Any, source: str, prefix: str = "") -> None:
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping of keys")
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(_default_at(dotted), dict):
            _merge(config, value, source, dotted + ".")
        else:
            _set(config, dotted, value, source)


def _default_at(dotted: str) -> Any:
    # DEFAULTS first: validation asks for many keys, and only a registered dataset's own keys
    # need the copied tree of defaults().
    for tree in (lambda: DEFAULTS, defaults):
        try:
            return get(tree(), dotted)
        except (KeyError, TypeError):
            continue
    return None


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value parsed as YAML (so ``8``, ``true``, ``[1, 2]`` work)."""
    if "=" not in text:
        raise ConfigError(f"command line: override '{text}' must look like key=value (e.g. random_walk.beta=8)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _assign(config: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def validate(config: dict[str, Any]) -> None:
    """Every key's rule, then the settings that are each allowed but not together."""
    check_keys(config)
    _check_combinations(config)


def check_keys(config: dict[str, Any]) -> None:
    """Every key's own rule (its type and range, or the names a registry holds)."""
    from .size_rules import AUTO, AUTO_KEYS

    # The known keys, not the config's leaves: a mapping given as a key's value is no value.
    for dotted in flatten(defaults()):
        value = get(config, dotted)
        if value == AUTO and dotted in AUTO_KEYS:
            continue  # set from the images' size (size_rules.resolve_auto)
        rule = RULES.get(dotted)
        if rule is None:
            # Keys without a rule share the type of their default.
            default = _default_at(dotted)
            if default is None or value is None and default is None:
                continue
            expected = float if isinstance(default, float) else type(default)
            ok = isinstance(value, expected) or (expected is float and isinstance(value, int)
                                                 and not isinstance(value, bool))
            if not ok:
                raise ConfigError(f"config key '{dotted}' must be {expected.__name__}, got {_shown(value)}")
            continue
        if not rule.check(value):
            hint = did_you_mean(value, rule.choices()) if rule.choices else ""
            raise ConfigError(f"config key '{dotted}' must be {rule.describe}, got {_shown(value)}{hint}")


def _shown(value: Any) -> str:
    """A bad value in a one-line error: a huge list or string cut short, never a line break."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_combinations(config: dict[str, Any]) -> None:
    """The settings that are each allowed but not together (what the stages would refuse later)."""
    backbone = config["backbone"]
    from .backbones import output_strides

    supported = output_strides(backbone["name"])
    for key in ("backbone.output_stride", "cam.train_output_stride", "segmentation.train_output_stride",
                "affinity.backbone_stride"):
        stride = get(config, key)
        if stride is not None and stride not in supported:
            raise ConfigError(f"config key '{key}' must be a stride backbone '{backbone['name']}' supports "
                              f"({' or '.join(map(str, supported))}), got {stride}")
    for key in ("cam.resize_long", "segmentation.scale_range"):
        value = get(config, key)
        if isinstance(value, list) and value[0] > value[1]:
            low, high = value
            raise ConfigError(f"config key '{key}' must be [low, high] with low <= high, got {[low, high]}")
    scale = config["random_walk"]["scale"]
    if (backbone["output_stride"] / scale) % 1 or backbone["output_stride"] / scale < 1:
        raise ConfigError(f"config key 'random_walk.scale' must divide the output stride "
                          f"{backbone['output_stride']} into whole pixels (e.g. 1, 2, 4), got {scale}")
    for section in ("cam", "segmentation"):
        stride = config[section]["train_output_stride"]
        if stride is not None and stride < backbone["output_stride"]:
            raise ConfigError(f"config key '{section}.train_output_stride' must be at least backbone.output_stride "
                              f"({backbone['output_stride']}): a network trained at a finer stride cannot run "
                              f"at a coarser one, got {stride}")
        if stride not in (None, backbone["output_stride"]) and not backbone["atrous"]:
            raise ConfigError(f"config key '{section}.train_output_stride' needs backbone.atrous: true "
                              f"(the network runs at a finer stride than it trained at by dilating)")
    stride = config["affinity"]["backbone_stride"]
    if stride is not None and stride < backbone["output_stride"]:
        raise ConfigError(f"config key 'affinity.backbone_stride' must be at least backbone.output_stride "
                          f"({backbone['output_stride']}), the stride of the walk's grid, got {stride}")
    if not backbone["atrous"]:
        from .backbones import supports_undilated

        if not supports_undilated(backbone["name"]):
            raise ConfigError(f"config key 'backbone.atrous' can be false only for backbone 'resnet50' "
                              f"(irn's undilated ResNet-50), not '{backbone['name']}'")
    from .pipeline import label_methods

    methods = label_methods()
    if config["labels"]["method"] not in methods:
        method = config["labels"]["method"]
        raise ConfigError(f"config key 'labels.method' must be one of {', '.join(map(repr, sorted(methods)))}, "
                          f"got {_shown(method)}{did_you_mean(method, methods)}")
    dataset = _dataset_registry().get(config["dataset"]["name"])
    name, root = dataset.name, config["dataset"]["root"]
    needs_root = dataset.info.get("needs_root", True)
    if needs_root and not root:
        raise ConfigError(f"config key 'dataset.root' must name the {name} dataset directory (it is null)")
    for key, what in dataset.info.get("required", {}).items():
        if not config["dataset"][key]:
            raise ConfigError(f"config key 'dataset.{key}' must name {what} for the {name} dataset")
    if needs_root and root and not Path(root).is_dir():
        raise ConfigError(f"config key 'dataset.root': directory '{root}' does not exist")


def builtin_config_path(name: str) -> Path:
    return Path(str(resources.files("affinitynet") / "configs" / f"{name}.yaml"))


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                check: bool = True) -> dict[str, Any]:
    """Defaults <- YAML file (a path, or a built-in name like ``demo``) <- ``key=value`` overrides."""
    config = defaults()
    if path is None:
        path = builtin_config_path("demo")
    path = Path(path)
    if not path.exists() and not path.suffix and builtin_config_path(str(path)).exists():
        path = builtin_config_path(str(path))
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    _merge(config, tree, str(path))
    for text in overrides:
        key, value = parse_override(text)
        _set(config, key, value, "command line")
    if check:
        validate(config)
    return config


def dump(config: dict[str, Any]) -> str:
    return yaml.safe_dump(config, sort_keys=False)


def save_resolved(config: dict[str, Any], path: str | Path) -> None:
    write_text(path, dump(config))


def section_hash(config: dict[str, Any], keys: Iterable[str], *upstream: str) -> str:
    """Hash of the named config keys (dotted or whole sections) and of upstream stage hashes."""
    picked = {key: get(config, key) for key in sorted(keys)}
    payload = json.dumps({"keys": picked, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
