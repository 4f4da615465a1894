"""Personalisation's error for bad input (frames, scans, options)."""
from __future__ import annotations

from common.errors import DeepHandMeshError


class PersonaliseInputError(DeepHandMeshError, ValueError):
    """Input personalisation cannot use: no frame, a frame without keypoints, a scan without faces
    or with non-finite points. The message is one line naming the file or option and what was
    expected; scripts print it and exit with code 2."""
