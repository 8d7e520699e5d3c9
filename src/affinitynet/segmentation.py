"""The segmentation network trained on the synthesized labels (paper 3.4, 4.2, Fig. 7d), its
multi-scale + flip inference (Appendix A.2), and ``affinitynet predict`` for image files.

Heads (``head=``):

- ``"resnet38"`` ("Ours-ResNet38", 4.2 and A.1, following Wu et al. [38]): two 3x3 atrous
  convolutions with dilation 12 on top of the backbone, 512 channels then one channel per class,
  a ReLU between them, and bilinear upsampling of the logits to the input size.
- ``"deeplab_largefov"`` ("Ours-DeepLab" of Table 2): DeepLab-LargeFOV's fc6 (3x3, dilation 12,
  1024 channels) and fc7 (1x1, 1024 channels) belong to the ``vgg16`` backbone, so only its fc8
  is left for the head: a 1x1 classifier, followed by the same bilinear upsampling. It runs on any
  backbone but is meant for ``vgg16``.

Score averaging (A.2 "score maps ... aggregated by pixel-wise average-pooling"): we average the
*softmax probabilities* of the 10 versions (5 scales x flip), not the logits. Probabilities are
bounded, so one scale with unusually large logits (objects near the training scale give sharper
outputs) cannot outvote the others, and the averaged map is already the input the dense CRF takes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .multiscale import multiscale_maps

HEADS = ("resnet38", "deeplab_largefov")
CHECKPOINT_KIND = "segmentation"
# What a segmentation model.pt's meta must hold so that inference needs no config.
META_KEYS = ("class_names", "mean", "std", "backbone", "output_stride", "head", "num_classes")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
OVERLAY_ALPHA = 0.5


class SegmentationNet(nn.Module):
    """Backbone + segmentation head; ``forward`` returns logits (N, C, H, W) at the input size.

    ``head_channels`` and ``dilation`` are the 512 and 12 of 4.2 (``resnet38`` head only).
    ``dropout`` (default off; the paper mentions none) is applied to the features entering each
    conv of the head during training.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, head: str = "resnet38",
                 head_channels: int = 512, dilation: int = 12, dropout: float = 0.0):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"unknown segmentation head '{head}' (choose from {', '.join(HEADS)})")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + objects), got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.head_name = head
        channels = backbone.out_channels[-1]
        if head == "resnet38":
            self.head = nn.Sequential(
                nn.Dropout2d(dropout) if dropout else nn.Identity(),
                nn.Conv2d(channels, head_channels, 3, padding=dilation, dilation=dilation),
                nn.ReLU(inplace=True),
                nn.Dropout2d(dropout) if dropout else nn.Identity(),
                nn.Conv2d(head_channels, num_classes, 3, padding=dilation, dilation=dilation),
            )
            nn.init.kaiming_normal_(self.head[1].weight, nonlinearity="relu")
            nn.init.zeros_(self.head[1].bias)
        else:
            self.head = nn.Sequential(
                nn.Dropout2d(dropout) if dropout else nn.Identity(),
                nn.Conv2d(channels, num_classes, 1),
            )
        # A small classifier init keeps the first softmax near uniform, so early Adam steps
        # are not spent undoing a random preference for some class.
        classifier = self.head[-1]
        nn.init.normal_(classifier.weight, std=0.01)
        nn.init.zeros_(classifier.bias)

    def scores(self, images: torch.Tensor) -> torch.Tensor:
        """Logits at the backbone's output stride (N, C, h, w)."""
        return self.head(self.backbone(images)[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits bilinearly upsampled to the input size (A.1, Fig. 7d); any size, odd included."""
        logits = self.scores(images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def new_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())


def build_segmentation_model(backbone_name: str, output_stride: int, num_classes: int,
                             head: str = "resnet38", pretrained: bool | str = True,
                             atrous: bool = True) -> SegmentationNet:
    """A backbone from the registry (``pretrained``: True, False or a weight file; ``atrous``:
    see ``create_backbone``) + the head."""
    from .backbones import create_backbone

    backbone = create_backbone(backbone_name, output_stride=output_stride, pretrained=pretrained, atrous=atrous)
    return SegmentationNet(backbone, num_classes, head)


def model_from_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu"
                          ) -> tuple[SegmentationNet, dict[str, Any]]:
    """(model in eval mode on ``device``, meta) from a ``train_seg/model.pt``, loaded with
    ``weights_only=True``; anything else raises a one-line :class:`TrainingError`."""
    from .training import TrainingError, load_checkpoint

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
        model = build_segmentation_model(meta["backbone"], int(meta["output_stride"]), int(meta["num_classes"]),
                                         meta["head"], pretrained=False, atrous=bool(meta.get("atrous", True)))
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else error.__class__.__name__
        raise TrainingError(f"{path}: weights do not fit a {meta['backbone']}/{meta['head']} "
                            f"segmentation model ({first[:160]})") from None
    return model.to(device).eval(), meta


@torch.no_grad()
def predict_scores(model: nn.Module, image: torch.Tensor, scales: Sequence[float] = (1.0,),
                   flip: bool = False) -> torch.Tensor:
    """Class probabilities (C, H, W) of one normalised image (3, H, W): the mean over scales x
    flips of the softmax of the network's output, each resized to the image (A.2)."""
    maps = multiscale_maps(lambda batch: torch.softmax(model(batch), dim=1), image, scales, flip)
    return torch.stack(maps).mean(0)


def predict_labels(model: nn.Module, image: np.ndarray, mean: Sequence[float], std: Sequence[float],
                   scales: Sequence[float] = (1.0,), flip: bool = False,
                   crf: Mapping[str, Any] | None = None) -> np.ndarray:
    """Label map uint8 (H, W) of an RGB uint8 image: argmax of :func:`predict_scores`, refined by
    the dense CRF first when ``crf`` (a config ``crf`` section, ``{}`` for the defaults) is given."""
    from .transforms import normalize

    device = next(model.parameters()).device
    probs = predict_scores(model, normalize(image, mean, std).to(device), scales, flip)
    if crf is not None:
        from .crf import dense_crf_with

        refined = dense_crf_with(image, probs.cpu().numpy(), crf)
        return refined.argmax(0).astype(np.uint8)
    return probs.argmax(0).to(torch.uint8).cpu().numpy()


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with every non-background pixel blended with its class's VOC colour."""
    from .io import VOC_PALETTE

    colours = VOC_PALETTE[labels].astype(np.float32)
    blended = image.astype(np.float32) * (1.0 - alpha) + colours * alpha
    # Background stays untouched so the scene remains readable around the objects.
    out = np.where((labels == 0)[..., None], image.astype(np.float32), blended)
    return (out + 0.5).astype(np.uint8)


def legend_image(class_names: Sequence[str], row: int = 18, width: int = 220) -> np.ndarray:
    """A swatch and name per class in the VOC palette, for reading the masks and overlays."""
    from PIL import Image, ImageDraw

    from .io import VOC_PALETTE

    canvas = Image.new("RGB", (width, row * len(class_names) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for index, name in enumerate(class_names):
        top = 2 + index * row
        draw.rectangle([4, top + 2, 4 + row, top + row - 2], fill=tuple(int(v) for v in VOC_PALETTE[index]),
                       outline=(0, 0, 0))
        draw.text((row + 12, top + 3), f"{index:3d} {name}", fill=(0, 0, 0))
    return np.asarray(canvas)


def find_images(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[str]]:
    """Files named directly (whatever their extension) and image files under folders, recursively
    and sorted; plus one line per input that does not exist."""
    files: list[Path] = []
    missing: list[str] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*")
                                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")))
        elif path.exists():
            files.append(path)
        else:
            missing.append(f"{path}: file not found")
    seen: set[Path] = set()
    unique = []
    for path in files:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique, missing


def _output_stems(files: Sequence[Path]) -> list[str]:
    """``<stem>`` per file; a stem already taken (a.jpg next to a.png, or one name in two
    folders) gets its extension and then a counter, so no mask overwrites another."""
    taken: set[str] = set()
    stems = []
    for path in files:
        stem = path.stem
        if stem in taken:
            stem = f"{path.stem}_{path.suffix.lstrip('.').lower()}" if path.suffix else path.stem
            counter = 2
            base = stem
            while stem in taken:
                stem = f"{base}_{counter}"
                counter += 1
        taken.add(stem)
        stems.append(stem)
    return stems


def predict_files(checkpoint: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                  scales: Sequence[float] = (1.0,), flip: bool = True, crf: bool = False,
                  device: str = "auto", strict: bool = False) -> int:
    """Segment image files and folders with a trained ``train_seg/model.pt`` alone (no config, no
    dataset): ``<out>/<stem>.png`` (VOC-palette index mask), ``<out>/<stem>_overlay.png`` and
    ``<out>/legend.png``.

    Bad images are skipped with one line naming the file and counted; with ``strict`` the first
    one stops the run. Returns 0 if at least one image was segmented and (not ``strict`` or none
    was skipped), else 2. An unusable checkpoint raises :class:`TrainingError` (one line; the CLI
    prints it and exits with 2). ``crf`` uses the default dense-CRF parameters (5.1).
    """
    from .io import InputError, load_image, save_label_png, save_rgb_png
    from .training import resolve_device

    model, meta = model_from_checkpoint(checkpoint, resolve_device(device))
    files, missing = find_images(inputs)
    out = Path(out_dir)
    skipped: list[str] = []
    done = 0

    def skip(line: str) -> None:
        skipped.append(line)
        print(f"skipped: {line}", file=sys.stderr)

    for line in missing:
        skip(line)
    if strict and skipped:
        print("predict: stopped at the first bad input (--strict); 0 images segmented", file=sys.stderr)
        return 2
    if not files:
        print("predict: no image files found in the inputs", file=sys.stderr)
        return 2
    save_rgb_png(out / "legend.png", legend_image(meta["class_names"]))
    for path, stem in zip(files, _output_stems(files)):
        try:
            image = load_image(path)
        except InputError as error:
            skip(str(error))
            if strict:
                print(f"predict: stopped at the first bad input (--strict); {done} images segmented",
                      file=sys.stderr)
                return 2
            continue
        labels = predict_labels(model, image, meta["mean"], meta["std"], scales, flip, {} if crf else None)
        save_label_png(out / f"{stem}.png", labels)
        save_rgb_png(out / f"{stem}_overlay.png", overlay(image, labels))
        done += 1
    print(f"predict: {done} images segmented into {out}, {len(skipped)} skipped")
    if done == 0 or (strict and skipped):
        return 2
    return 0
