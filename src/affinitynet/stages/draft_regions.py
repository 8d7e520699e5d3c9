"""Stage ``draft-regions`` (``affinity.refine_cams``): the confident regions of Eq. 1's CAMs, cut
as ``confident_regions`` cuts them without the option, for the first AffinityNet."""
from __future__ import annotations

from typing import Any

from ..pipeline import Stage, register_stage, stage
from .common import REGION_KEYS, REGION_OPTIONAL_KEYS, cut_confident_regions


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    return cut_confident_regions(config, force, STAGE.name, stage("infer_cam"))


STAGE = register_stage(Stage("draft_regions", "draft-regions", "affinity.refine_cams: the confident regions of "
                                                               "the CAMs, for the first AffinityNet",
              keys=REGION_KEYS, upstream=("infer_cam",), outputs={"labels": "labels"}, run=run,
              optional_keys=REGION_OPTIONAL_KEYS))
