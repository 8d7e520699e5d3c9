"""Stage ``confident-regions``: confident object / background / neutral label maps from the CAMs
with low and high alpha, each refined by the dense CRF (3.2.1, Fig. 4a); or, with
``affinity.confidence: threshold``, irn's: constant foreground and background thresholds, each
argmax refined by irn's label dCRF. With ``affinity.refine_cams`` the CAMs are first walked with
a first AffinityNet (``walk_cams``)."""
from __future__ import annotations

from typing import Any

from ..pipeline import Stage, register_stage, stage
from .common import REGION_KEYS, REGION_OPTIONAL_KEYS, cut_confident_regions


def cams_stage(config: dict[str, Any]) -> str:
    """The stage whose ``cams`` the regions are cut from."""
    return "walk_cams" if config["affinity"]["refine_cams"] else "infer_cam"


def run(config: dict[str, Any], force: bool = False) -> dict[str, Any]:
    return cut_confident_regions(config, force, STAGE.name, stage(cams_stage(config)))


STAGE = register_stage(Stage("confident_regions", "confident-regions",
              "confident object/background regions from low/high alpha + dCRF (3.2.1)",
              keys=REGION_KEYS, upstream=lambda config: (cams_stage(config),),
              outputs={"labels": "labels"}, run=run, optional_keys=REGION_OPTIONAL_KEYS))
