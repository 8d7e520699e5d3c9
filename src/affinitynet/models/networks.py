"""The pipeline's three networks in one place: the CAM network (3.1), AffinityNet (3.2.2) and the
segmentation network (3.4). :func:`build_network` builds each from the config,
:func:`network_meta` gives what its ``model.pt`` records beside the weights, and
:func:`load_network` loads a stage's ``model.pt`` and checks it against the config and the
dataset. Training stages, inference stages and ``import-weights`` all go through here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..config import get, show_value
from ..engine.checkpoints import load_checkpoint
from ..errors import TrainingError
from ..registry import Registry
from .affinity import AffinityNet
from .backbones import create_backbone
from .cam import CAMNet, ReCAMNet
from .irnet import IRNet
from .segmentation import CHECKPOINT_KIND, META_KEYS, SEGMENTATION_DILATION, SegmentationNet


def imagenet_weights(config: dict[str, Any], pretrained: bool = True):
    """What ``create_backbone(pretrained=...)`` gets: nothing to load when the weights will be
    overwritten by a stage's own ``model.pt`` (inference), else the user's file or the packaged
    weights."""
    if not pretrained:
        return False
    return config["backbone"]["weights"] or True


def train_output_stride(kind: str, config: dict[str, Any]) -> int:
    """The output stride network ``kind`` is trained at: its section's ``train_output_stride``, or
    ``backbone.output_stride``, the stride every network runs at in inference."""
    section = network(kind).section
    stride = config.get(section, {}).get("train_output_stride") if section in TRAINED_COARSER else None
    return int(stride or config["backbone"]["output_stride"])


def fine_tune_epochs(kind: str, config: dict[str, Any]) -> int:
    """How many of network ``kind``'s last epochs train at ``backbone.output_stride``, the stride
    it runs at, after the first ones at its coarser ``train_output_stride`` (DeepLab's fine-tuning
    at 8 after training at 16): its section's ``fine_tune_epochs``, at most its ``epochs``; 0 when
    it trains at ``backbone.output_stride`` throughout."""
    if kind not in TRAINED_COARSER or train_output_stride(kind, config) == int(config["backbone"]["output_stride"]):
        return 0
    return min(int(config[kind].get("fine_tune_epochs") or 0), int(config[kind]["epochs"]))


# What places a network's layers on its output stride (convolutions and pooling, a backbone's
# ``output_stride``); the weights are the same at every stride.
_GEOMETRY = ("stride", "padding", "dilation", "output_stride")


def geometry(model: nn.Module) -> list[dict[str, Any]]:
    """Each module's stride, padding, dilation and ``output_stride`` where it has them, in module
    order: what :func:`set_geometry` gives another build of the same network."""
    return [{name: getattr(module, name) for name in _GEOMETRY if hasattr(module, name)}
            for module in model.modules()]


def set_geometry(model: nn.Module, layers: list[dict[str, Any]]) -> None:
    """Put ``model`` at the output stride of the build whose :func:`geometry` is ``layers``, in
    place: the same parameters (and so the same optimizer state) compute that build's function."""
    modules = list(model.modules())
    if len(modules) != len(layers):
        raise ValueError(f"the geometry has {len(layers)} modules, the network {len(modules)}")
    for module, attributes in zip(modules, layers):
        for name, value in attributes.items():
            setattr(module, name, value)


def affinity_backbone_stride(config: dict[str, Any]) -> int:
    """The output stride AffinityNet's backbone runs at, in training and walk alike:
    ``affinity.backbone_stride``, or ``backbone.output_stride``, the stride of the walk's grid."""
    return int(config["affinity"].get("backbone_stride") or config["backbone"]["output_stride"])


def dilate(head: nn.Module, factor: int) -> None:
    """Multiply the dilation (and the padding with it) of every convolution wider than 1x1 in
    ``head`` by ``factor``: a head trained on a map of stride s*factor then reads the map of stride
    s at the spans in pixels it was trained at, as the backbone's layers past the output stride do
    (atrous convolution, 4.1; DeepLab's training at stride 16 for inference at 8)."""
    if factor == 1:
        return
    for module in head.modules():
        if isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1:
            module.dilation = tuple(d * factor for d in module.dilation)
            module.padding = tuple(p * factor for p in module.padding)


def _backbone(config: dict[str, Any], pretrained: bool, output_stride: int):
    section = config["backbone"]
    return create_backbone(section["name"], output_stride=output_stride,
                           pretrained=imagenet_weights(config, pretrained), atrous=section["atrous"])


@dataclass(frozen=True)
class Network:
    kind: str                  # the ``kind`` of its model.pt's meta
    stage: str                 # the stage that trains it and holds its model.pt
    build: Callable[[dict[str, Any], int, bool, int], nn.Module]   # (config, classes with background, pretrained,
    #                                                                  output stride)
    # Meta entries beyond the common ones: (meta key, config key) of what shapes the weights.
    recorded: tuple[tuple[str, str], ...]
    # The recorded entries that must match the config for the weights to mean what they meant
    # (layouts whose weights have the same keys and shapes would load silently otherwise).
    checked: tuple[str, ...]
    # The config section it trains with (images, batches, optimizer, stride), and the keys its own
    # section sets instead (:func:`training_section`): a network that fine-tunes another's.
    section: str
    own_keys: tuple[str, ...] = ()


# The pipeline's networks, each registered with the stage that trains it and the entries of its
# model.pt that describe it (:class:`Network`).
NETWORKS = Registry("network")


def register_network(kind: str, *, stage: str, recorded: tuple[tuple[str, str], ...], checked: tuple[str, ...],
                     section: str | None = None, own_keys: tuple[str, ...] = ()):
    """Decorator on a network's builder ``(config, classes with background, pretrained, output stride)``.
    ``section``: the config section it trains with (its own, ``kind``, by default); ``own_keys``:
    the keys of section ``kind`` that replace that section's."""
    return NETWORKS.register(kind, stage=stage, recorded=recorded, checked=checked, section=section or kind,
                             own_keys=own_keys)


def network(kind: str) -> Network:
    """The registered network ``kind``."""
    entry = NETWORKS.get(kind)
    return Network(kind, entry.info["stage"], entry.builder, entry.info["recorded"], entry.info["checked"],
                   entry.info["section"], entry.info["own_keys"])


def networks() -> list[Network]:
    """Every registered network."""
    return [network(entry.name) for entry in NETWORKS]


def _cam_network(model_class: type[CAMNet], kind: str) -> Callable[[dict[str, Any], int, bool, int], nn.Module]:
    """The builder of a CAM network (``cam``, or ``recam`` with ReCAM's second classifier)."""

    def build(config, num_classes, pretrained, output_stride):
        model = model_class(_backbone(config, pretrained, output_stride), num_classes - 1,
                            config["cam"]["head_channels"], config["cam"]["head"])
        # Section 4.2's 3x3 convolution is on the map the network is trained on.
        dilate(model.head, train_output_stride(kind, config) // output_stride)
        return model

    return build


_CAM_RECORDED = (("head", "cam.head"), ("head_channels", "cam.head_channels"),
                 ("train_output_stride", "cam.train_output_stride"))
_CAM_CHECKED = ("head", "atrous", "train_output_stride")
register_network("cam", stage="train_cam", checked=_CAM_CHECKED, recorded=_CAM_RECORDED)(_cam_network(CAMNet, "cam"))
# ReCAM fine-tunes the CAM network on its images, batches, optimizer and training stride (with no
# fine-tuning epochs of its own at the inference stride); its section holds its epochs and rates.
register_network("recam", stage="train_recam", checked=_CAM_CHECKED, recorded=_CAM_RECORDED, section="cam",
                 own_keys=("epochs", "lr", "new_layer_lr_mult"))(_cam_network(ReCAMNet, "recam"))


@register_network("affinity", stage="train_affinity", checked=("channels", "distance", "atrous", "backbone_stride"),
                  recorded=(("channels", "affinity.channels"), ("radius", "affinity.radius"),
                            ("distance", "affinity.distance"), ("backbone_stride", "affinity.backbone_stride")))
def _affinity(config, num_classes, pretrained, output_stride):
    section = config["affinity"]
    # The pairs stay on the walk's grid (output_stride); the backbone may run coarser.
    return AffinityNet(_backbone(config, pretrained, affinity_backbone_stride(config)),
                       channels=section["channels"], radius=section["radius"], distance=section["distance"],
                       grid_stride=output_stride)


@register_network("irn", stage="train_irn", recorded=(("radius", "irn.radius"), ("layout", "irn.layout")),
                  checked=("atrous", "layout"))
def _irn(config, num_classes, pretrained, output_stride):
    return IRNet(_backbone(config, pretrained, output_stride), layout=config["irn"].get("layout", "compact"))


@register_network("segmentation", stage="train_seg", checked=("train_output_stride",),
                  recorded=(("head", "segmentation.head"), ("supervision", "segmentation.supervision"),
                            ("train_output_stride", "segmentation.train_output_stride")))
def _segmentation(config, num_classes, pretrained, output_stride):
    # Section 4.2's dilation 12 is at backbone.output_stride (the paper's 8): at any other stride
    # (training at a coarser one) the head spans the same pixels.
    dilation = SEGMENTATION_DILATION * config["backbone"]["output_stride"] // output_stride
    return SegmentationNet(_backbone(config, pretrained, output_stride), num_classes, config["segmentation"]["head"],
                           dilation=dilation)


# The networks whose section may set ``train_output_stride``. AffinityNet's and IRNet's pairs
# (radius gamma of Eq. 4) are counted on the grid the walk reads, so they train at that stride
# (AffinityNet's backbone may run coarser in training and walk alike: ``affinity.backbone_stride``).
TRAINED_COARSER = ("cam", "segmentation")


def training_section(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """The training keys of network ``kind`` (batch size, epochs, optimizer, crop, ...): the
    section it is registered to train with, its ``own_keys`` taken from its own section."""
    spec = network(kind)
    if not spec.own_keys:   # the section itself: a copy would read every key, used or not
        return config[spec.section]
    return {**config[spec.section], **{key: config[kind][key] for key in spec.own_keys}}


def build_network(kind: str, config: dict[str, Any], num_classes: int, pretrained: bool = True,
                  training: bool = False) -> nn.Module:
    """The ``kind`` network (``cam``, ``affinity``, ``segmentation``) for a dataset of
    ``num_classes`` classes, background included; ``pretrained=False`` skips the ImageNet
    weights (they are about to be overwritten by a ``model.pt``). ``training``: at the stride it
    is trained at (:func:`train_output_stride`), else at ``backbone.output_stride``; the two have
    the same weights."""
    stride = train_output_stride(kind, config) if training else int(config["backbone"]["output_stride"])
    return network(kind).build(config, num_classes, pretrained, stride)


def meta_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The config keys a ``model.pt``'s meta records, as a config tree that
    :func:`build_network` reads: a network rebuilt from its file alone (``predict``)."""
    tree: dict[str, Any] = {"backbone": {"name": meta["backbone"], "output_stride": int(meta["output_stride"]),
                                         "atrous": bool(meta.get("atrous", True)), "weights": None}}
    for key, config_key in network(meta["kind"]).recorded:
        if key in meta:
            section, leaf = config_key.split(".")
            tree.setdefault(section, {})[leaf] = meta[key]
    return tree


def network_meta(kind: str, config: dict[str, Any], class_names, backbone) -> dict[str, Any]:
    """What ``model.pt`` records beside the weights: enough for ``predict`` to rebuild the
    segmentation network without a config, and for :func:`load_network` to refuse a file that
    does not fit."""
    meta: dict[str, Any] = {"kind": kind, "class_names": list(class_names)}
    if kind == "segmentation":
        meta["num_classes"] = len(class_names)
    meta.update({"backbone": config["backbone"]["name"], "output_stride": config["backbone"]["output_stride"],
                 "atrous": config["backbone"]["atrous"]})
    for key, config_key in network(kind).recorded:
        value = _configured(kind, config, config_key)
        meta[key] = list(value) if isinstance(value, (list, tuple)) else value
    meta.update({"mean": list(backbone.mean), "std": list(backbone.std)})
    return meta


def layout(kind: str, config: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """The meta keys of ``kind`` that must match the config, with (config key, configured value)."""
    config_keys = dict(network(kind).recorded, atrous="backbone.atrous")
    return {key: (config_keys[key], _configured(kind, config, config_keys[key])) for key in network(kind).checked}


def _configured(kind: str, config: dict[str, Any], config_key: str) -> Any:
    """A recorded key's value; the strides resolved (null: backbone.output_stride)."""

    if config_key.endswith(".train_output_stride"):
        return train_output_stride(kind, config)
    if config_key == "affinity.backbone_stride":
        return affinity_backbone_stride(config)
    return get(config, config_key)


def load_checkpoint_meta(path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state dict, meta) of a stage's final ``model.pt``, loaded with ``weights_only=True``;
    a file that is not one (a bare state dict, say) raises a one-line TrainingError."""

    state = load_checkpoint(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise TrainingError(f"{path}: not the model.pt of an affinitynet stage (no 'model' weights in it)")
    meta = state.get("meta")
    return state["model"], meta if isinstance(meta, dict) else {}


def check_meta(path, meta: dict[str, Any], class_names=None, backbone: str | None = None,
               command: str = "run", layout: dict[str, tuple[str, Any]] | None = None) -> None:
    """Refuse, in one line, a model.pt trained on other classes or with another backbone than the
    dataset and config say: its weights would not load, or worse, would label with wrong names.

    ``layout`` maps meta keys to (config key, configured value), e.g. ``{"head": ("cam.head",
    "psa")}``: layouts whose weights have the same keys and shapes (psa's and irn's CAM heads, a
    dilated and an undilated ResNet-50) would load silently into the wrong network. A meta
    without the key (a model.pt older than the option) is taken to have the option's default."""

    for key, (config_key, value) in (layout or {}).items():
        if key not in meta:
            continue
        made = list(meta[key]) if isinstance(meta[key], (list, tuple)) else meta[key]
        wanted = list(value) if isinstance(value, (list, tuple)) else value
        if made != wanted:
            raise TrainingError(f"{path}: made with {config_key}={show_value(made)} but the config has "
                                f"{config_key}={show_value(wanted)}; retrain it (affinitynet {command} --force) "
                                f"or set {config_key}={show_value(made)}")

    trained = meta.get("class_names")
    if class_names is not None and trained is not None and list(trained) != list(class_names):
        if len(trained) != len(class_names):
            detail = f"{len(trained)} classes in it, {len(class_names)} in the dataset"
        else:
            index = next(i for i, (a, b) in enumerate(zip(trained, class_names)) if a != b)
            detail = f"class {index} is '{trained[index]}' in it but '{class_names[index]}' in the dataset"
        raise TrainingError(f"{path}: trained on other classes than the dataset ({detail}); retrain it "
                            f"(affinitynet {command} --force) or use the dataset it was trained on")
    if backbone is not None and meta.get("backbone") not in (None, backbone):
        raise TrainingError(f"{path}: trained with backbone '{meta['backbone']}' but config key 'backbone.name' "
                            f"is '{backbone}'; retrain it (affinitynet {command} --force)")


def load_weights(model: nn.Module, state, path) -> None:
    """``model.load_state_dict(state)``; a mismatch is one line naming the file."""
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0]) if lines else error.__class__.__name__
        raise TrainingError(f"{path}: weights do not fit the configured model ({detail[:160]})") from None


def model_from_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu"
                          ) -> tuple[SegmentationNet, dict[str, Any]]:
    """(model in eval mode on ``device``, meta) from a ``train_seg/model.pt``, loaded with
    ``weights_only=True``; anything else raises a one-line :class:`TrainingError`."""

    state = load_checkpoint(path)
    meta = state.get("meta") if isinstance(state, dict) else None
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind != CHECKPOINT_KIND or not isinstance(state.get("model"), Mapping):
        what = f"a '{kind}' checkpoint" if kind else "a checkpoint without model meta"
        raise TrainingError(f"{path}: {what}, not a segmentation model (use <run_dir>/train_seg/model.pt)")
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise TrainingError(f"{path}: segmentation checkpoint meta lacks {', '.join(missing)}")
    try:
        model = build_network(CHECKPOINT_KIND, meta_config(meta), int(meta["num_classes"]), pretrained=False)
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise TrainingError(f"{path}: weights do not fit a {meta['backbone']}/{meta['head']} "
                            f"segmentation model ({first[:160]})") from None
    return model.to(device).eval(), meta


def build_segmentation_model(backbone_name: str, output_stride: int, num_classes: int,
                             head: str = "resnet38", pretrained: bool | str = True,
                             atrous: bool = True) -> SegmentationNet:
    """A backbone from the registry (``pretrained``: True, False or a weight file; ``atrous``:
    see ``create_backbone``) + the head, by :func:`networks.build_network`."""

    config = {"backbone": {"name": backbone_name, "output_stride": output_stride, "atrous": atrous,
                           "weights": pretrained if isinstance(pretrained, (str, os.PathLike)) else None},
              "segmentation": {"head": head}}
    return build_network("segmentation", config, num_classes, pretrained=bool(pretrained))
