"""Settings that depend on the image size, set from the images themselves.

The paper's crop sizes, inference scales and random-walk length are for PASCAL VOC's ~500x375
photos. Photos of another size need other values, fixed by rules that read only image sizes (never
ground truth); the MSRC-21 config was made with them (docs/results.md, "Results"). A config key set to
``auto`` (the ``folder`` config sets all of them) gets its value from these rules applied to the
typical size of the training images:

- crop size: 0.7 of the long side, a multiple of 32 in [128, 448] (MSRC-21's 320 px: 224);
- ``cam.resize_long``: from the crop size to the long side;
- ``cam.scales`` and ``segmentation.scales``: the paper's scales (Sec. 4.2: 0.5, 1, 1.5, 2;
  A.2: 0.5 .. 1.5) whose feature grid is at least that of VOC's smallest scale, 0.5 x 500x375;
  the largest scale alone when none is (small images);
- ``random_walk.t``: the walk's reach grows with sqrt(t), so t scales with the feature grid's
  area: 256 x grid area / (63 x 47), VOC's grid, rounded to a power of two (MSRC-21: 128).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..config import AUTO, AUTO_KEYS, get, set_value
from ..data.datasets.folder import image_size
from ..errors import InputError
from .run_dir import training_split

# VOC's typical photo (long x short side) and the feature grid the paper's t = 256 was set on.
VOC_SIZE = (500, 375)
VOC_GRID_AREA = 63 * 47
VOC_T = 256
CAM_SCALES = (0.5, 1.0, 1.5, 2.0)                 # Sec. 4.2 (released code)
SEGMENTATION_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)  # Appendix A.2
# Images whose headers are read to find the typical size (an even sample of the split).
SAMPLED_IMAGES = 200


def crop_size(long_side: int) -> int:
    return int(min(448, max(128, 32 * round(0.7 * long_side / 32))))


def kept_scales(candidates, long_side: int, short_side: int) -> list[float]:
    """The scales whose grid is at least the grid of VOC's smallest scale (0.5)."""
    smallest = min(CAM_SCALES)
    kept = [s for s in candidates
            if s * long_side >= smallest * VOC_SIZE[0] and s * short_side >= smallest * VOC_SIZE[1]]
    return [float(s) for s in kept] or [float(max(candidates))]


def walk_length(long_side: int, short_side: int, output_stride: int) -> int:
    area = math.ceil(long_side / output_stride) * math.ceil(short_side / output_stride)
    return int(2 ** max(0, round(math.log2(VOC_T * area / VOC_GRID_AREA))))


def rules(height: int, width: int, output_stride: int = 8) -> dict[str, Any]:
    """Every size-dependent key's value for images of ``height`` x ``width``."""
    long_side, short_side = max(height, width), min(height, width)
    crop = crop_size(long_side)
    return {"cam.crop_size": crop, "cam.resize_long": [crop, max(crop, long_side)],
            "cam.scales": kept_scales(CAM_SCALES, long_side, short_side),
            "affinity.crop_size": crop, "segmentation.crop_size": crop,
            "segmentation.scales": kept_scales(SEGMENTATION_SCALES, long_side, short_side),
            "random_walk.t": walk_length(long_side, short_side, output_stride)}



def typical_size(data) -> tuple[int, int]:
    """Median (height, width) of an even sample of the split's images, from their headers."""
    samples = data.samples[:: max(1, len(data.samples) // SAMPLED_IMAGES)]
    sizes = []
    for sample in samples:
        try:
            sizes.append(image_size(sample.image_path))
        except InputError:
            continue  # reported by the stage that loads it
    if not sizes:
        raise InputError(data.root, f"no readable image in split '{data.split}' to set the 'auto' keys from")
    height, width = np.median(np.asarray(sizes), axis=0)
    return int(height), int(width)


def resolve_auto(config: dict[str, Any]) -> list[str]:
    """Replace every ``auto`` key by its rule's value for the training images; the lines say what
    was chosen (empty when no key is ``auto``)."""
    wanted = [key for key in AUTO_KEYS if get(config, key) == AUTO]
    if not wanted:
        return []
    data = training_split(config)
    height, width = typical_size(data)
    chosen = rules(height, width, config["backbone"]["output_stride"])
    for key in wanted:
        set_value(config, key, chosen[key], "size rules")
    return [f"auto settings for {width}x{height} images (the median of {data.name} '{data.split}'): "
            + ", ".join(f"{key} {chosen[key]}" for key in wanted)]
