"""affinitynet: pixel-level labels from image-level tags (Ahn & Kwak, CVPR 2018), and a
segmentation network trained on them."""
__version__ = "0.1.0"

from .backbones import create_backbone, list_backbones, register_backbone  # noqa: E402
from .random_walk import random_walk  # noqa: E402

__all__ = ["create_backbone", "list_backbones", "random_walk", "register_backbone", "__version__"]
