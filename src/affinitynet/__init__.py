"""affinitynet: pixel-level labels from image-level tags (Ahn & Kwak, CVPR 2018), and a
segmentation network trained on them."""
__version__ = "0.1.0"

import os

# libgomp reads its wait policy once, when torch loads it, so this must run before torch is
# imported. Its default spins 300000 times at each barrier before sleeping: beside another busy
# process a two-thread training then waits for a descheduled thread at every parallel region.
# 10000 spins cost nothing alone and ran much faster beside a single-threaded training, where
# PASSIVE (no spin) was slower alone: the measurements are in docs/performance.md ("Kept: OpenMP
# threads that spin 10000 times"). A user's own setting of either variable is kept.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

# The datasets declare their own config keys when their package is imported (config.defaults).
from .data import datasets as _datasets  # noqa: E402, F401
from .models.backbones import create_backbone, list_backbones, register_backbone  # noqa: E402
from .ops.random_walk import random_walk  # noqa: E402

__all__ = ["create_backbone", "list_backbones", "random_walk", "register_backbone", "__version__"]
