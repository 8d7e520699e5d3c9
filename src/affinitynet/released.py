"""The authors' released checkpoints as finished training stages: ``affinitynet import-weights``.

The authors released trained networks with their code, for PASCAL VOC 2012's 20 object classes:

- ``psa-cam``, psa's ``res38_cls.pth``: the CAM network, ResNet-38 at output stride 8 and a 1x1
  ``fc8`` (no bias) on its 4096 channels, CAM = ReLU(conv(features, fc8)) (``cam.head: psa``;
  paper 3.1, Eq. 1).
- ``psa-aff``, psa's ``resnet38_aff.pth``: AffinityNet, ResNet-38 with 1x1 convs ``f8_3``,
  ``f8_4``, ``f8_5`` from the last three levels (512, 1024, 4096 channels) to 64, 128, 256,
  concatenated (448) and ``f9`` (1x1, 448), ELU after each (``affinity.channels: [64, 128, 256]``;
  paper 3.2, Fig. 3, Eq. 3).
- ``irn-cam``, irn's ``res50_cam.pth``: the CAM network of IRNet, ResNet-50 with strides
  (2, 2, 2, 1) and no dilation (output stride 16, ``backbone.atrous: false``) and a 1x1
  ``classifier`` (no bias) on its 2048 channels (``cam.head: irn``).
- ``irn-irn``, irn's ``res50_irn.pth`` (``net/resnet50_irn.py``, loaded by its
  ``EdgeDisplacement``): the same ResNet-50 and IRNet's boundary branch ``fc_edge1..6`` and
  displacement branch ``fc_dp1..7`` with its ``mean_shift`` (``irn.layout: irn``, ``irnet.py``).

:func:`import_weights` renames the file's keys to this project's model, loads them strictly (with
``torch.load(..., weights_only=True)``), and writes ``train_cam/model.pt``,
``train_affinity/model.pt`` or ``train_irn/model.pt`` as the training stage would: the same state dict, the meta that the
later stages check (classes, backbone, layout), and a complete ``_stage.json`` whose hash is
:func:`affinitynet.pipeline.stage_hash` of the config. ``affinitynet run`` then skips the stage.
The config keys the file's network fixes (its layout) are set in the config, which is saved as
``RUN_DIR/config.yaml``.

Stages already in the run that derive from the replaced stage (infer_cam, random_walk, ...) are
marked out of date, so they are redone from the new weights instead of being kept: their hash
depends on the config only, not on the weights. A stage imported earlier (psa-aff before psa-cam)
keeps its layout in the config and stays current: its hash covers the keys of the stages before
it, but its weights do not derive from them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .config import get, parse_override, set_value, show_value, validate
from .engine import distributed
from .engine.checkpoints import save_checkpoint
from .errors import ConfigError, WeightsError
from .files import read_json, write_json
from .models.backbones.weights import read_state_dict
from .models.networks import build_network, network_meta, networks
from .pipeline import SCHEMA, StageRun, descendants, imported_kind, settings, stage, stage_hash
from .stages.common import dataset

_SHOWN_KEYS = 6


@dataclass(frozen=True)
class ReleasedLayout:
    kind: str
    repository: str
    file: str
    stage: str                                # the training stage it replaces
    layout: tuple[tuple[str, Any], ...]       # config keys the file's network fixes
    prefixes: tuple[tuple[str, str], ...]     # (released key prefix, this project's key prefix), first match wins
    aliases: tuple[str, ...] = ()             # released prefixes that repeat other keys (same modules)
    classifier: str | None = None             # released key of the class weights (rows = classes)

    def rename(self, key: str) -> str | None:
        """This project's name of a released key; None for an alias of another key."""
        if key.startswith(self.aliases):
            return None
        for released, ours in self.prefixes:
            if key.startswith(released):
                return ours + key[len(released):]
        return key   # matches nothing: reported as an unexpected key under its own name

    def released_name(self, key: str) -> str:
        """The released name of one of this project's keys (for missing-key messages)."""
        for released, ours in self.prefixes:
            if key.startswith(ours):
                return released + key[len(ours):]
        return key


_RESNET38 = (("backbone.name", "resnet38d"), ("backbone.output_stride", 8), ("backbone.atrous", True))

KINDS: dict[str, ReleasedLayout] = {layout.kind: layout for layout in (
    ReleasedLayout("psa-cam", "psa", "res38_cls.pth", "train_cam", _RESNET38 + (("cam.head", "psa"),),
                   (("fc8.", "classifier."), ("", "backbone.")), classifier="fc8.weight"),
    ReleasedLayout("psa-aff", "psa", "resnet38_aff.pth", "train_affinity",
                   _RESNET38 + (("affinity.channels", [64, 128, 256]), ("affinity.distance", "mean"),
                                ("affinity.radius", 5)),
                   (("f8_3.", "reducers.0."), ("f8_4.", "reducers.1."), ("f8_5.", "reducers.2."),
                    ("f9.", "adapt."), ("", "backbone."))),
    ReleasedLayout("irn-cam", "irn", "res50_cam.pth", "train_cam",
                   (("backbone.name", "resnet50"), ("backbone.output_stride", 16), ("backbone.atrous", False),
                    ("cam.head", "irn")),
                   (("resnet50.", "backbone."), ("classifier.", "classifier.")),
                   # irn's Net registers the same modules again as stage1..4, backbone and newly_added.
                   aliases=("stage1.", "stage2.", "stage3.", "stage4.", "backbone.", "newly_added."),
                   classifier="classifier.weight"),
    ReleasedLayout("irn-irn", "irn", "res50_irn.pth", "train_irn",
                   (("backbone.name", "resnet50"), ("backbone.output_stride", 16), ("backbone.atrous", False),
                    ("irn.layout", "irn")),
                   (("resnet50.", "backbone."),
                    *((f"fc_edge{i + 1}.", f"boundary_units.{i}.") for i in range(5)), ("fc_edge6.", "boundary_out."),
                    *((f"fc_dp{i + 1}.", f"displacement_units.{i}.") for i in range(5)),
                    ("fc_dp6.", "displacement_mix."), ("fc_dp7.", "displacement_out."),
                    ("mean_shift.running_mean", "displacement_mean")),
                   # irn's Net registers the same modules again as stage1..5, backbone, edge_layers and
                   # dp_layers, its mean shift also inside fc_dp7; train_irn.py saves the loss module,
                   # whose path indices and displacement targets are buffers (EdgeDisplacement loads
                   # the file with strict=False and ignores them).
                   aliases=("stage1.", "stage2.", "stage3.", "stage4.", "stage5.", "backbone.", "edge_layers.",
                            "dp_layers.", "fc_dp7.4.", "path_indices", "disp_target")),
)}


def imported_kinds(config: dict[str, Any]) -> dict[str, str]:
    """{training stage: kind} of the stages of ``config['run_dir']`` written by import-weights."""
    found = {}
    for name in sorted({spec.stage for spec in KINDS.values()}):
        kind = imported_kind(config, name)
        if kind in KINDS:
            found[name] = kind
    return found


def apply_layout(config: dict[str, Any], kind: str, overrides: Iterable[str] = (),
                 keep: Iterable[str] = ()) -> list[str]:
    """Set the config keys that ``kind``'s network fixes and validate the config; returns the
    ``key=value`` settings that changed. A command-line override (``overrides``) that asks for
    another value is a ConfigError: the file's network cannot be built another way.

    ``keep``: kinds already imported into the run for other stages (psa-cam beside psa-aff),
    whose layouts are set first so that importing one does not make the other out of date;
    ``kind`` and the command line win where they disagree."""
    spec = KINDS[kind]
    given = dict(parse_override(text) for text in overrides)
    changed: dict[str, str] = {}
    for other in keep:
        for key, value in KINDS[other].layout:
            if key not in given and get(config, key) != value:
                set_value(config, key, value, "import-weights")
                changed[key] = show_value(value)
    for key, value in spec.layout:
        if key in given and show_value(given[key]) != show_value(value):
            raise ConfigError(f"command line: {key}={show_value(given[key])} does not fit {spec.repository}'s "
                              f"{spec.file}, whose network has {key}={show_value(value)} (import-weights {kind} sets it)")
        if get(config, key) != value:
            set_value(config, key, value, "import-weights")
            changed[key] = show_value(value)
    validate(config)
    settings.check(config)
    return [f"{key}={value}" for key, value in changed.items()]


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")


def check_classes(kind: str, path: str | Path, state: dict[str, torch.Tensor], num_object_classes: int,
                  dataset: str = "the dataset") -> None:
    """One-line WeightsError when the file's classifier scores another number of classes."""
    spec = KINDS[kind]
    if spec.classifier is None or spec.classifier not in state:
        return
    rows = state[spec.classifier].shape[0]
    if rows != num_object_classes:
        raise WeightsError(f"'{path}' is not {spec.repository}'s {spec.file} ({kind}): its {spec.classifier} "
                           f"{tuple(state[spec.classifier].shape)} scores {rows} classes but {dataset} has "
                           f"{num_object_classes} object classes (the released files are for PASCAL VOC's 20: "
                           f"--config voc12)")


def mapped_state(kind: str, path: str | Path, state: dict[str, torch.Tensor],
                 model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The released weights ``state`` (read from ``path``) under this project's key names, checked
    against ``model`` (whose own values are not used: it may live on the meta device): a file of
    another layout raises a one-line WeightsError naming the released keys. BatchNorm
    ``num_batches_tracked`` may be absent (psa saved its files with PyTorch 0.4); it is 0 then,
    as in a network trained here with frozen BatchNorm."""
    spec = KINDS[kind]
    what = f"'{path}' is not {spec.repository}'s {spec.file} ({kind})"
    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        ours = spec.rename(key)
        if ours is not None:
            mapped[ours], origin[ours] = value, key
    expected = model.state_dict()
    missing = [spec.released_name(k) for k in expected
               if k not in mapped and not k.endswith("num_batches_tracked")]
    unexpected = [origin[k] for k in mapped if k not in expected]
    shapes = [f"{origin[k]} {tuple(mapped[k].shape)} (needs {tuple(expected[k].shape)})"
              for k in expected if k in mapped and mapped[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        parts = ([f"{len(missing)} missing keys: {_key_list(missing)}"] if missing else []) + \
                ([f"{len(unexpected)} unexpected keys: {_key_list(unexpected)}"] if unexpected else []) + \
                ([f"{len(shapes)} keys of another shape: {_key_list(shapes)}"] if shapes else [])
        raise WeightsError(f"{what}: {'; '.join(parts)}")
    for key, value in expected.items():
        if key not in mapped:      # an absent num_batches_tracked
            mapped[key] = torch.zeros(value.shape, dtype=value.dtype)
        elif value.dtype != mapped[key].dtype:
            mapped[key] = mapped[key].to(value.dtype)
    return mapped


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_weights(kind: str, path: str | Path, config: dict[str, Any]) -> dict[str, Any]:
    """Write the training stage of ``kind`` in ``config['run_dir']`` from the released file
    ``path`` (``config`` already has the layout, see :func:`apply_layout`). Returns the stage's
    ``_stage.json`` summary."""

    spec = KINDS[kind]
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file '{path}' does not exist (or is not a file)")
    data = dataset(config, "train_split")
    released = read_state_dict(path)
    check_classes(kind, path, released, data.num_object_classes, f"dataset '{data.name}'")
    network = next(net.kind for net in networks() if net.stage == spec.stage)
    # Built on the meta device: every value is overwritten, so the (seconds of) random
    # initialisation of a 105M-parameter network is skipped.
    with torch.device("meta"):
        model = build_network(network, config, data.num_classes, pretrained=False)
    state = mapped_state(kind, path, released, model)
    model = model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    meta = network_meta(network, config, data.class_names, model.backbone)
    source = {"kind": kind, "file": str(path.resolve()), "sha256": _sha256(path)}
    meta["imported"] = source

    # Outputs made from the weights this stage held before would otherwise count as current
    # (a stage's hash depends on the config, not on the weights). Marked first, so that a kill
    # between here and the end leaves nothing stale marked current.
    stale = []
    for name in descendants(config, spec.stage):
        marker = stage(name).marker(config)
        # Imported weights do not derive from the stages before them.
        if not marker.exists() or imported_kind(config, name):
            continue
        stale.append(name)
        if distributed.is_main():
            write_json(marker, {"stage": name, "schema": SCHEMA, "hash": None, "complete": False,
                                "out_of_date": f"import-weights {kind} replaced {spec.stage}"})
    if stale and distributed.is_main():
        print(f"import-weights: out of date now, redone by the next run: {', '.join(stale)}")

    job = StageRun(config, spec.stage, force=True, check_upstream=False)
    if distributed.is_main():
        save_checkpoint(stage(spec.stage).output("model", config), {"model": model.state_dict(), "meta": meta, "history": []})
    summary = job.finish(imported=source)

    # Another imported stage (psa-aff beside this psa-cam) hashes this stage's keys as upstream,
    # but its weights do not derive from them: while the config keeps its layout, it stays current.
    for other_stage, other in imported_kinds(config).items():
        marker = stage(other_stage).marker(config)
        if other_stage == spec.stage or not all(get(config, k) == v for k, v in KINDS[other].layout):
            continue
        state_json = read_json(marker)
        if state_json.get("complete") is True and distributed.is_main():
            write_json(marker, {**state_json, "hash": stage_hash(config, other_stage)})
    distributed.barrier()
    return summary
