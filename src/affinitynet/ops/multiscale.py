"""Multi-scale + flip inference shared by the CAM network (4.2 of the released code: scales 1.0,
0.5, 1.5, 2.0) and the segmentation network (Appendix A.2: 0.5, 0.75, 1, 1.25, 1.5)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    return max(1, round(height * scale)), max(1, round(width * scale))


@torch.no_grad()
def multiscale_maps(forward: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                    scales: Sequence[float], flip: bool) -> list[torch.Tensor]:
    """Score maps of ``image`` (3, H, W) at every scale, and flipped back if ``flip``, each
    resized bilinearly to (H, W). ``forward`` maps a batch (N, 3, h, w) to (N, C, h', w').

    The image and its mirror go through the network as one batch of two.
    """
    height, width = image.shape[-2:]
    maps: list[torch.Tensor] = []
    for scale in scales:
        size = scaled_size(height, width, scale)
        scaled = image[None] if size == (height, width) else F.interpolate(
            image[None], size=size, mode="bilinear", align_corners=False)
        batch = torch.cat([scaled, scaled.flip(-1)]) if flip else scaled
        output = forward(batch)
        output = F.interpolate(output, size=(height, width), mode="bilinear", align_corners=False)
        maps.append(output[0])
        if flip:
            maps.append(output[1].flip(-1))
    return maps
