"""Fitting the hand model to keypoints (3D, or 2D in several calibrated views).

``fit_keypoints(model, keypoints, convention=...) -> FitResult``; see :mod:`common.fitting.solver`
for the method, :mod:`common.fitting.conventions` for the keypoint orders.
"""
from common.fitting.conventions import CONVENTIONS, get_convention
from common.fitting.errors import FitInputError
from common.fitting.solver import FitOptions, FitResult, FitWeights, fit_keypoints
from common.fitting.triangulate import MultiViewKeypoints

__all__ = ["CONVENTIONS", "FitInputError", "FitOptions", "FitResult", "FitWeights", "MultiViewKeypoints",
           "fit_keypoints", "get_convention"]
