"""Stage ``train-affinity``: AffinityNet trained on affinity labels drawn from the confident
regions (3.2.2, Eq. 4-10). Its backbone starts from ImageNet, not from the CAM network."""
from __future__ import annotations

from typing import Any

from ..pipeline import Stage, register_stage
from .common import AFFINITY_KEYS, AFFINITY_OPTIONAL_KEYS, train_affinitynet


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    return train_affinitynet(config, force)


STAGE = register_stage(Stage("train_affinity", "train-affinity", "train AffinityNet on the affinity labels (3.2.2, Eq. 7-10)",
              keys=AFFINITY_KEYS, upstream=("confident_regions",), outputs={"model": "model.pt", "log": "log.csv"},
              run=run, optional_keys=AFFINITY_OPTIONAL_KEYS))
