"""The training stages, one module each, and the registry that turns a config's ``stage: NAME`` into its object.

``Stage.named(name)`` (what the config reader calls) finds a stage by the name it
registered when its module was imported below; a new stage is one module that
defines and creates it, imported here, plus its recipe in configs/.
"""

from mmdist.stages.align import ALIGN, AlignStage
from mmdist.stages.base import Batch, Measure, Stage
from mmdist.stages.fuse import FUSE, FuseStage

__all__ = ["ALIGN", "FUSE", "AlignStage", "Batch", "FuseStage", "Measure", "Stage", "manifest_stage"]


def manifest_stage(manifest: dict) -> Stage | None:
    """The stage an export's manifest names (its ``stage`` key), or None for a name no stage here has."""
    try:
        return Stage.named(manifest.get("stage"))
    except (KeyError, TypeError):
        return None
