"""Experiment configuration: the paper's hyper-parameters as defaults, YAML files, command-line
overrides, validation with one-line errors, and per-stage hashes for resumable runs.

Each key is declared once, in :data:`SETTINGS`: its default, its rule and its help, from which
come the default tree, ``affinitynet config show`` and ``docs/configuration.md``
(``affinitynet config docs``). The defaults are the paper's settings (PASCAL VOC 2012, ResNet-38,
Section 5.1); the shipped YAML files (``affinitynet/configs/*.yaml``) override what differs for
their experiment.
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
from .files import write_text
from .registry import load_plugins


@dataclass(frozen=True)
class Rule:
    describe: str
    check: Callable[[Any], bool]
    # The names a value is one of, for the "did you mean" of a misspelt one.
    choices: Callable[[], Iterable[str]] | None = None
    # Another spelling of a value, as the value it means: applied where the value is set, so that
    # the stages, the saved config and the stage hashes see one spelling.
    canonical: Callable[[Any], Any] | None = None


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


class Named:
    """A rule for a part's name: which kind of registered part it names (a backbone, a dataset,
    ...). The config checks only that it is a name; the names a registry holds are checked above
    the config, where the parts are (``pipeline.settings.check_names``), before anything is written."""

    def __init__(self, kind: str):
        self.kind = kind
        self.choices = None

    @property
    def describe(self) -> str:
        return f"the name of a registered {self.kind}"

    def check(self, value: Any) -> bool:
        return isinstance(value, str) and 0 < len(value) <= 255


# The keys that ``auto`` sets from the training images' size (``pipeline.size_rules``).
AUTO = "auto"
AUTO_KEYS = ("cam.crop_size", "cam.resize_long", "cam.scales", "affinity.crop_size", "segmentation.crop_size",
             "segmentation.scales", "random_walk.t")


# Longer strings are no path or name a user meant; a NUL byte is no path the OS can open.
_MAX_STRING = 4096


def _string(optional: bool = False) -> Rule:
    return Rule("a string" + (" (or null)" if optional else ""),
                lambda v: (isinstance(v, str) and v != "" and len(v) <= _MAX_STRING and "\0" not in v)
                or (optional and v is None))


def _is_plain_name(value: Any) -> bool:
    return (isinstance(value, str) and 0 < len(value) <= 255 and value not in (".", "..")
            and not any(c in value for c in "/\\\0"))


def _is_module_name(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= 255 and all(part.isidentifier() for part in value.split("."))


def _name() -> Rule:
    """A split's name: a file name inside the dataset, never a path out of it."""
    return Rule("a name without path separators", _is_plain_name)


def _names(max_length: int = 10_000) -> Rule:
    """A list of names (or null)."""
    return Rule(f"a list of 1 to {max_length} names (or null)",
                lambda v: v is None or (isinstance(v, list) and 0 < len(v) <= max_length
                                        and all(isinstance(n, str) and n.strip() and len(n) <= 255 for n in v)))


def _refinement() -> Rule:
    """A refinement of walked labels. true and false are 'full' and 'off': the older spellings,
    and what YAML makes of an unquoted on / off (``random_walk.crf=off`` on the command line)."""
    choices = ("band", "full", "off")
    return Rule("one of 'band', 'full', 'off' (or true/false)", lambda v: isinstance(v, str) and v in choices,
                lambda: choices,
                lambda v: ({True: "full", False: "off"}[v] if isinstance(v, bool) else v))


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


@dataclass(frozen=True)
class Setting:
    """One config key, declared once: its default, the rule its values keep, what it means."""
    default: Any
    help: str
    rule: Rule | Named


def _training(what: str, *, batch_size: int, epochs: int, optimizer: str, lr: float, momentum: float,
              weight_decay: float, new_layer_lr_mult: float = 10.0, poly_power: float = 0.9, crop_size: int = 448,
              after_crop: dict[str, Setting] | None = None) -> dict[str, Setting]:
    """The keys of a training section (``cam``, ``affinity``, ``irn``, ``segmentation``) that shape
    what its network learns (:data:`TRAINING_KEYS`; the section's stage hashes them), with the
    section's own keys ``after_crop`` placed after ``crop_size``."""
    return {
        "crop_size": Setting(crop_size, f"{what}: training crop side in pixels ('auto': from the image size)",
                             _number(16, 4096, integer=True)),
        **(after_crop or {}),
        "color_jitter": Setting([0.3, 0.3, 0.3, 0.1], f"{what}: brightness, contrast, saturation, hue jitter",
                                _number_list(0.0, 10, length=4, strict_low=False)),
        "batch_size": Setting(batch_size, f"{what}: images per step (split over the processes of a distributed run)",
                              _number(1, 4096, integer=True)),
        "epochs": Setting(epochs, f"{what}: passes over the training images", _number(1, 10_000, integer=True)),
        "optimizer": Setting(optimizer, f"{what}: 'sgd' or 'adam'", _choice("sgd", "adam")),
        "lr": Setting(lr, f"{what}: base learning rate of the backbone (new layers: times new_layer_lr_mult)",
                      _number(0, 10, strict_low=True)),
        "momentum": Setting(momentum, f"{what}: SGD momentum", _number(0, 1)),
        "weight_decay": Setting(weight_decay, f"{what}: L2 weight decay", _number(0, 1)),
        "poly_power": Setting(poly_power, f"{what}: poly schedule lr * (1 - step/total)^power; 0 keeps the rate "
                                          f"constant", _number(0, 100)),
        "new_layer_lr_mult": Setting(new_layer_lr_mult, f"{what}: learning-rate multiplier of the layers added to the "
                                                        f"backbone", _number(0, 1000, strict_low=True)),
    }


_STRIDE = Rule("null, 8 or 16", lambda v: v in (None, 8, 16) and not isinstance(v, bool))

# Every key: the paper's values (Section 5.1, 4.2) unless a comment says otherwise, what each
# means (``affinitynet config show``, docs/configuration.md) and what it may be.
SETTINGS: dict[str, Any] = {
    "run_dir": Setting("runs/voc12", "output directory of the run (every stage writes a folder in it)", _string()),
    "seed": Setting(0, "seed of every random choice (initialisation, crops, order)",
                    _number(0, 2**32 - 1, integer=True)),   # numpy's seeds are 32-bit
    "device": Setting("auto", "'auto' (CUDA if present), 'cpu', 'cuda' or 'cuda:N'",
                      Rule("'auto', 'cpu', 'cuda' or 'cuda:N'",
                           lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or
                                                             (v.startswith("cuda:") and v[5:].isdigit())))),
    "num_workers": Setting(0, "data-loading processes per training process (0: load in the training process)",
                           _number(0, 64, integer=True)),
    "threads": Setting(0, "torch threads per process (0: torch's default, all cores)", _number(0, 256, integer=True)),
    "strict": Setting(False, "stop at the first bad input instead of skipping it", _boolean()),
    # YAML reads on/off as booleans, which mean the same here.
    "amp": Setting("auto", "mixed precision: 'auto' (bf16/fp16 on CUDA, off on CPU), 'native' (as auto on CUDA, bf16 "
                           "on a CPU with AVX512-BF16 or AMX), 'bf16', 'fp16', 'off'",
                   Rule("one of 'auto', 'native', 'bf16', 'fp16', 'off' (or true/false)",
                        lambda v: isinstance(v, bool) or v in ("auto", "native", "bf16", "fp16", "off"))),
    "channels_last": Setting("auto", "NHWC convolutions: 'auto' (CUDA with AMP; CPU inference), 'on', 'off'",
                             Rule("one of 'auto', 'on', 'off' (or true/false)",
                                  lambda v: isinstance(v, bool) or v in ("auto", "on", "off"))),
    "plugins": Setting([], "modules imported before the config is read, whose parts (backbones, datasets, heads, CAM "
                           "methods) register themselves; installed plug-ins' entry points are imported anyway",
                       Rule("a list of at most 64 module names (dotted, like my_lab.parts)",
                            lambda v: isinstance(v, list) and len(v) <= 64 and all(_is_module_name(m) for m in v))),
    "dataset": {
        "name": Setting("voc12", "a registered dataset (affinitynet datasets list; folder: your photos)",
                        Named("dataset")),
        "root": Setting(None, "dataset directory", _string(optional=True)),
        "protocol": Setting("object", "msrc21: 'object' (14 classes + background) or 'standard21'",
                            _choice("object", "standard21")),
        "train_split": Setting("train_aug", "split the CAM network, AffinityNet and the segmentation network train on",
                               _name()),
        "label_split": Setting("train", "split whose pseudo labels are scored (Table 1)", _name()),
        "eval_split": Setting("val", "split the segmentation network is scored on (Table 2)", _name()),
        "labels_file": Setting(None, "folder: CSV or JSON of tags per image (a path, or a name inside the root)",
                               _string(optional=True)),
        "classes_file": Setting(None, "folder: object class names, one per line (unknown tags are then refused)",
                                _string(optional=True)),
        "demo_size": Setting(128, "demo: image side in pixels", _number(32, 1024, integer=True)),
        "demo_train": Setting(240, "demo: images in the train split", _number(1, 1_000_000, integer=True)),
        "demo_val": Setting(60, "demo: images in the val split", _number(1, 1_000_000, integer=True)),
        "demo_seed": Setting(0, "demo: generator seed", _number(0, 2**32 - 1, integer=True)),
        "demo_same_class": Setting(0.0, "demo: share of the images of 2 or 3 objects whose objects are all of one "
                                        "class (instances of one class, for IRN); 0: every object its own class",
                                   _number(0, 1)),
        "masks_dir": Setting(None, "folder: optional ground-truth masks (index PNGs named <id>.png)",
                             _string(optional=True)),
        "annotations_file": Setting("annotations/instances_{split}.json", "coco: a split's instances JSON, inside "
                                    "the root or absolute ({split}: the split's name; without it, every split)",
                                    _string()),
        "images_dir": Setting("{split}", "coco: a split's image folder, inside the root or absolute ({split}: the "
                                         "split's name)", _string()),
        "category_subset": Setting(None, "coco: the category names to keep (null: all); the others are no tag and "
                                         "their pixels background", _names()),
        "max_skipped": Setting(0.1, "share of the images left out (bad tags, untagged, unreadable) that stops a run",
                               _number(0, 1)),
    },
    "backbone": {
        "name": Setting("resnet38d", "a registered backbone", Named("backbone")),
        "weights": Setting(None, "ImageNet weight file (null: the packaged weights, where a backbone has them)",
                           _string(optional=True)),
        "output_stride": Setting(8, "8 or 16: the feature map is 1/output_stride of the image",
                                 Rule("8 or 16", lambda v: v in (8, 16) and not isinstance(v, bool))),
        "atrous": Setting(True, "strides past the output stride become dilations (4.1); false: irn's undilated "
                                "ResNet-50", _boolean()),
    },
    "labels": {
        "method": Setting("affinitynet", "pseudo-label method whose labels train the segmentation network: a stage "
                                         "that declares one", Named("label method")),
        "refine": Setting(False, "a refinement round: a first segmentation network trained on the method's labels "
                                 "segments the training images, and its agreement with them, or its confident "
                                 "label, trains the network (docs/label-refinement.md)", _boolean()),
        "refine_confidence": Setting(0.9, "refinement round: where the first network and the method's labels "
                                          "differ, its probability (over the image's tagged classes) that takes "
                                          "its label; below it the pixel is ignored", _number(0, 1)),
    },
    "cam": {
        "head": Setting("conv", "a registered CAM head: 'conv' is Sec. 4.2's 3x3 conv + GAP + 1x1; the others, "
                                "released layouts", Named("CAM head")),
        "head_channels": Setting(512, "channels of the CAM network's 3x3 conv (Sec. 4.2)",
                                 _number(1, 8192, integer=True)),
        "train_output_stride": Setting(None, "null (backbone.output_stride) or 16: trained at 16, the head dilated to "
                                             "run at 8", _STRIDE),
        "fine_tune_epochs": Setting(0, "with train_output_stride 16: the last N epochs train at "
                                       "backbone.output_stride, the stride the network runs at (DeepLab's fine-tuning "
                                       "at 8)", _number(0, 10_000, integer=True)),
        # The paper says Adam without a rate; the released code's SGD at lr 0.1 ran with momentum
        # 5e-4 (weight decay passed into the momentum slot). Momentum 0.9 multiplies SGD's
        # steady-state step by 1 / (1 - 0.9) = 10, so lr 0.01 keeps the code's step,
        # 0.01 / (1 - 0.9) = 0.1 = 0.1 / (1 - 5e-4) to 0.05% (docs/voc12.md, "Running on PASCAL VOC 2012").
        **_training("CAM network", batch_size=16, epochs=15, optimizer="sgd", lr=0.01, momentum=0.9,
                    weight_decay=5e-4, after_crop={
                        # The released code's random rescale of the long side.
                        "resize_long": Setting([256, 512], "random rescale range of the long side before cropping "
                                                           "('auto': from the image size)",
                                               _number_list(16, 8192, length=2, strict_low=False, integer=True))}),
        "method": Setting("cam", "a registered CAM method ('cam': Eq. 1)", Named("CAM method")),
        "scales": Setting([1.0, 0.5, 1.5, 2.0], "CAM inference scales, each with its flip (Eq. 1; 'auto': from the "
                                                "image size)", _number_list(0.0, 8, max_length=16)),
        "flip": Setting(True, "add horizontally flipped CAMs", _boolean()),
        "eval_alpha": Setting(16.0, "background (1 - max M)^alpha of the 'CAM' row of Table 1 (Eq. 2)",
                              _number(1, 1000)),
        "eval_bg_threshold": Setting(None, "or a constant background score (the released code's 0.2); null: use "
                                           "alpha", _number(0, 1, optional=True)),
    },
    # cam.method 'recam' (ReCAM, Chen et al. 2022): the trained CAM network fine-tuned with a second
    # classifier, on the CAM network's images, batches and optimizer; these keys are its own.
    "recam": {
        "epochs": Setting(4, "ReCAM: epochs of fine-tuning after train-cam (ReCAM's recam_num_epoches)",
                          _number(1, 10_000, integer=True)),
        # ReCAM's 5e-5 for the backbone, with momentum 1e-4 (irn's weight decay in the momentum
        # slot); under cam.momentum 0.9 the same steady-state step is a tenth of it.
        "lr": Setting(5e-6, "ReCAM: base learning rate of the CAM network's layers (the new classifier: times "
                            "new_layer_lr_mult), poly over the ReCAM epochs", _number(0, 10, strict_low=True)),
        "new_layer_lr_mult": Setting(10.0, "ReCAM: learning-rate multiplier of the new classifier (ReCAM's 5e-4 "
                                           "against 5e-5)", _number(0, 1000, strict_low=True)),
        "loss_weight": Setting(1.0, "ReCAM: weight of the softmax cross-entropy on the CAM-pooled features "
                                    "(ReCAM's recam_loss_weight)", _number(0, 1000)),
    },
    "crf": {
        "gaussian_sxy": Setting(3.0, "dCRF smoothness kernel width (pixels)", _number(0, 10_000)),
        "gaussian_compat": Setting(3.0, "dCRF smoothness kernel weight", _number(0, 10_000)),
        "bilateral_sxy": Setting(80.0, "dCRF appearance kernel width (pixels)", _number(0, 10_000)),
        "bilateral_srgb": Setting(13.0, "dCRF appearance kernel colour width", _number(0, 10_000)),
        "bilateral_compat": Setting(10.0, "dCRF appearance kernel weight", _number(0, 10_000)),
        "iterations": Setting(10, "dCRF mean-field iterations", _number(0, 1000, integer=True)),
    },
    "affinity": {
        "alpha_low": Setting(4.0, "low alpha: amplified background, confident objects (3.2.1)", _number(1, 1000)),
        "alpha_high": Setting(24.0, "high alpha: weakened background, confident background (3.2.1)",
                              _number(1, 1000)),   # the released code: 32
        "refine_cams": Setting(False, "cut the confident regions from the CAMs walked class by class with a first "
                                      "AffinityNet (draft-regions, draft-affinity, walk-cams), not from the CAMs",
                               _boolean()),
        # irn's cam_to_ir_label.py: constant CAM thresholds (set on VOC) and its label dCRF.
        "confidence": Setting("alpha", "confident regions: 'alpha' (alpha_low / alpha_high and the dCRF of 'crf', "
                                       "3.2.1) or 'threshold' (irn's: conf_fg_threshold / conf_bg_threshold, each "
                                       "argmax refined by irn's label dCRF)", _choice("alpha", "threshold")),
        "conf_fg_threshold": Setting(0.30, "confidence 'threshold': an object where its CAM beats this (irn's "
                                           "conf_fg_thres)", _number(0, 1)),
        "conf_bg_threshold": Setting(0.05, "confidence 'threshold': background where every CAM is below this (irn's "
                                           "conf_bg_thres)", _number(0, 1)),
        "radius": Setting(5, "gamma of Eq. 4: pairs within this radius on the feature grid",
                          _number(1, 64, integer=True)),
        "distance": Setting("mean", "Eq. 3 over feature channels: 'mean' (released code) or 'sum' (L1 norm)",
                            _choice("mean", "sum")),
        "channels": Setting([128, 256, 512], "AffinityNet's 1x1 conv widths on the last three levels (psa's: [64, "
                                             "128, 256])", _number_list(1, 8192, length=3, strict_low=False,
                                                                        integer=True)),
        "backbone_stride": Setting(None, "null (backbone.output_stride) or 16: AffinityNet's backbone runs at 16 in "
                                         "training and walk, its levels upsampled to the walk's grid", _STRIDE),
        # As for the CAM network; and Eq. 10's loss is 4x the released code's (L+_bg/4 + L+_fg/4 +
        # L-/2), so are its gradients g: lr 0.1 * (1 - 0.9) / 4 = 0.0025, and weight decay 4 * 5e-4
        # so that decay keeps its share of the step: 0.0025 / (1 - 0.9) * (4 g + 2e-3 w) is the
        # code's 0.1 * (g + 5e-4 w).
        **_training("AffinityNet", batch_size=8, epochs=8, optimizer="sgd", lr=0.0025, momentum=0.9,
                    weight_decay=2e-3),
    },
    "random_walk": {
        "alpha": Setting(16.0, "background alpha of the walk's input CAMs (Eq. 2)", _number(1, 1000)),
        "beta": Setting(8.0, "Hadamard power of the affinities (Eq. 11)", _number(0, 1000, strict_low=True)),
        "t": Setting(256, "walk iterations (Eq. 12; 'auto': from the feature grid's area)",
                     _number(1, 1_000_000, integer=True)),
        "radius": Setting(5, "radius of the affinity matrix's pairs", _number(1, 64, integer=True)),
        "scale": Setting(1.0, "AffinityNet's input scale for the walk (above 1: a finer grid)",
                         _number(0, 8, strict_low=True)),
        "flip": Setting(False, "AffinityNet's features for the walk averaged over the image and its mirror image "
                               "(the CAMs' test-time flip, 4.2)", _boolean()),
        "crf": Setting("full", "refinement of the walked labels that train the network: 'full' (the paper's dCRF), "
                               "'band' (the dCRF within half a grid cell of the walk's boundaries), 'off'",
                       _refinement()),
    },
    # labels.method: irn (IRN, Ahn, Cho & Kwak 2019), on the stride-4 grid.
    "irn": {
        # irn trains with radius 10 and walks with 5.
        "radius": Setting(5, "IRN: radius of the pairs on the stride-4 grid (boundary loss and walk)",
                          _number(2, 16, integer=True)),
        "layout": Setting("compact", "IRNet's branches: 'compact' (this project's) or 'irn' (irn's resnet50_irn.py, "
                                     "the network of its res50_irn.pth: import-weights irn-irn)",
                          _choice("compact", "irn")),
        "background": Setting("alpha", "IRN: the walk's background: 'alpha' ((1 - max M)^alpha walked with the "
                                       "CAMs) or 'threshold' (irn's: the CAMs times (1 - B) walked, over their "
                                       "largest value, against the constant bg_threshold)",
                              _choice("alpha", "threshold")),
        "alpha": Setting(16.0, "IRN: background (1 - max M)^alpha of the walk's input CAMs (Eq. 2)", _number(1, 1000)),
        "bg_threshold": Setting(0.25, "IRN, background 'threshold': the constant background score of the walked "
                                      "labels (irn's sem_seg_bg_thres)", _number(0, 1)),
        "instance_bg_threshold": Setting(0.25, "IRN, background 'threshold': the constant background score of the "
                                               "walked instances (irn's ins_seg_bg_thres)", _number(0, 1)),
        "beta": Setting(10.0, "IRN: Hadamard power of the path-max affinities", _number(0, 1000, strict_low=True)),
        "t": Setting(256, "IRN: walk iterations", _number(1, 1_000_000, integer=True)),
        "crf": Setting("band", "IRN: refinement of the walked labels: 'band', 'full' (the dCRF) or 'off', as "
                               "random_walk.crf", _refinement()),
        # irn's: 3 epochs of SGD at 0.1 without momentum, weight decay 1e-4, poly; every trained
        # layer is new (the backbone is frozen), so no multiplier.
        **_training("IRNet", batch_size=8, epochs=3, optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=1e-4,
                    new_layer_lr_mult=1.0),
    },
    "segmentation": {
        "head": Setting("resnet38", "a registered segmentation head ('resnet38': two 3x3 atrous convs, Sec. 4.2)",
                        Named("segmentation head")),
        "supervision": Setting("pseudo", "'pseudo' labels, or 'gt' for the fully supervised bound",
                               _choice("pseudo", "gt")),
        "train_output_stride": Setting(None, "null (backbone.output_stride) or 16: trained at 16, run at 8", _STRIDE),
        "fine_tune_epochs": Setting(0, "as cam.fine_tune_epochs", _number(0, 10_000, integer=True)),
        "seed": Setting(None, "seed of the segmentation network's training (null: the run's 'seed'); another value "
                              "retrains the network alone on the same pseudo labels, for the seed spread",
                        _number(0, 2**32 - 1, integer=True, optional=True)),
        # Section 5.1's Adam, with the poly schedule as for SGD.
        **_training("segmentation network", batch_size=8, epochs=30, optimizer="adam", lr=1e-4, momentum=0.9,
                    weight_decay=5e-4, after_crop={
                        "scale_range": Setting([0.7, 1.3], "random rescale range of the training images",
                                               _number_list(0.0, 8, length=2))}),
        "scales": Setting([0.5, 0.75, 1.0, 1.25, 1.5], "inference scales, each with its flip (A.2; 'auto': from the "
                                                       "image size)", _number_list(0.0, 8, max_length=16)),
        "flip": Setting(True, "add horizontally flipped predictions", _boolean()),
        "crf": Setting(False, "dCRF on the network's predictions", _boolean()),
    },
    "report": {
        "gallery_size": Setting(8, "label-split images in the report's gallery (at least one per class)",
                                _number(0, 1000, integer=True)),
    },
    "sweep": {
        "betas": Setting([2.0, 4.0, 8.0, 16.0, 32.0], "beta values of the Fig. 8 sweep", _number_list(0.0, 1000)),
        "ts": Setting([16, 32, 64, 128, 256], "t values of the Fig. 8 sweep",
                      _number_list(1, 1_000_000, strict_low=False, integer=True)),
        "alphas": Setting([4.0, 8.0, 16.0, 24.0, 32.0], "alpha values of the Fig. 8 sweep",
                          _number_list(1, 1000, strict_low=False)),
        "max_images": Setting(0, "images the sweep scores (0: the whole label split)", _number(0, 10**9, integer=True)),
    },
}


def _declared(tree: dict[str, Any], prefix: str = "") -> dict[str, Setting]:
    """The settings by dotted key, in declaration order."""
    flat: dict[str, Setting] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_declared(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _defaults_of(tree: dict[str, Any]) -> dict[str, Any]:
    return {key: _defaults_of(value) if isinstance(value, dict) else value.default for key, value in tree.items()}


DECLARED: dict[str, Setting] = _declared(SETTINGS)
# The views the rest of the package reads: the default tree (saved configs keep its order), what
# each key means, and the rule of each.
DEFAULTS: dict[str, Any] = _defaults_of(SETTINGS)
KEY_HELP: dict[str, str] = {key: setting.help for key, setting in DECLARED.items()}
RULES: dict[str, Rule | Named] = {key: setting.rule for key, setting in DECLARED.items()}
# The keys of every training section that shape what its network learns.
TRAINING_KEYS: tuple[str, ...] = tuple(key for key in _training("", batch_size=1, epochs=1, optimizer="sgd", lr=1,
                                                                momentum=0, weight_decay=0))


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
    for declared in _DATASET_KEYS:
        for key, value in declared().items():
            tree["dataset"].setdefault(key, copy.deepcopy(value))
    return tree


# The datasets' own keys and defaults, declared where each dataset is defined: the data layer adds
# a function giving them (``datasets.register_dataset``), so the config reads no registry.
_DATASET_KEYS: list[Callable[[], dict[str, Any]]] = []


def declare_dataset_keys(keys: Callable[[], dict[str, Any]]) -> None:
    """Add a source of ``dataset.*`` keys with their defaults (called by the data layer)."""
    if keys not in _DATASET_KEYS:
        _DATASET_KEYS.append(keys)


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
    canonical = getattr(RULES.get(dotted), "canonical", None)
    _assign(config, dotted, canonical(value) if canonical else value)


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
    # The known keys, not the config's leaves: a mapping given as a key's value is no value.
    for dotted in flatten(defaults()):
        value = get(config, dotted)
        if value == AUTO and dotted in AUTO_KEYS:
            continue  # set from the images' size (pipeline.size_rules)
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
                raise ConfigError(f"config key '{dotted}' must be {expected.__name__}, got {shown(value)}")
            continue
        if not rule.check(value):
            hint = did_you_mean(value, rule.choices()) if rule.choices else ""
            raise ConfigError(f"config key '{dotted}' must be {rule.describe}, got {shown(value)}{hint}")


def shown(value: Any) -> str:
    """A bad value in a one-line error: a huge list or string cut short, never a line break."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_combinations(config: dict[str, Any]) -> None:
    """The settings that are each allowed but not together (what the stages would refuse later)."""
    backbone = config["backbone"]
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


def builtin_config_path(name: str) -> Path:
    return Path(str(resources.files("affinitynet") / "configs" / f"{name}.yaml"))


def builtin_configs() -> list[str]:
    """The names of the configs shipped in ``affinitynet/configs``."""
    return sorted(path.stem for path in builtin_config_path("demo").parent.glob("*.yaml"))


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                check: bool = True) -> dict[str, Any]:
    """Defaults <- YAML file (a path, or a built-in name like ``demo``) <- ``key=value`` overrides."""
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
    given = [parse_override(text) for text in overrides]
    # The plug-ins first: their parts' names and their datasets' keys are the config's to check.
    plugins = dict(given).get("plugins", tree.get("plugins", []) if isinstance(tree, dict) else [])
    if not RULES["plugins"].check(plugins):
        raise ConfigError(f"config key 'plugins' must be {RULES['plugins'].describe}, got {shown(plugins)}")
    load_plugins(plugins)
    config = defaults()
    _merge(config, tree, str(path))
    for key, value in given:
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
