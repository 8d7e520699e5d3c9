"""Stage ``draft-affinity`` (``affinity.refine_cams``): the first AffinityNet, trained as
``train_affinity`` is without the option, on ``draft_regions``; ``walk_cams`` walks the CAMs with it."""
from __future__ import annotations

from typing import Any

from ..pipeline import Stage, register_stage
from .common import AFFINITY_KEYS, AFFINITY_OPTIONAL_KEYS, train_affinitynet


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    return train_affinitynet(config, force, regions="draft_regions", name=STAGE.name)


STAGE = register_stage(Stage("draft_affinity", "draft-affinity", "affinity.refine_cams: the first AffinityNet, "
                                                                 "on the CAMs' confident regions",
              keys=AFFINITY_KEYS, upstream=("draft_regions",), outputs={"model": "model.pt", "log": "log.csv"},
              run=run, optional_keys=AFFINITY_OPTIONAL_KEYS))
