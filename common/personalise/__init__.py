"""Personalisation: a person's identity (skeleton and identity correctives) and the poses of a few
frames, fitted to depth maps or to scans of the hand (docs/personalise.md).

``personalise(model, euler, root, depth=... | scans=..., regularisers=...) -> PersonaliseResult``
(:mod:`.optimise`); the data terms and the training's regularisers in :mod:`.objectives`, the
differentiable point-to-surface distance in :mod:`.surface`, scans in :mod:`.scans`, the
before-and-after picture in :mod:`.picture`. ``main/personalise.py`` is the script.
"""
from common.personalise.errors import PersonaliseInputError
from common.personalise.objectives import DepthObjective, DepthTargets, Regularisers, ScanObjective
from common.personalise.optimise import PersonaliseOptions, PersonaliseResult, measure, personalise
from common.personalise.surface import ScanSurface

__all__ = ["DepthObjective", "DepthTargets", "PersonaliseInputError", "PersonaliseOptions", "PersonaliseResult",
           "Regularisers", "ScanObjective", "ScanSurface", "measure", "personalise"]
