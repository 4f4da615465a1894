"""The fitter's error for bad input (files, arrays, options)."""
from __future__ import annotations

from common.errors import DeepHandMeshError


class FitInputError(DeepHandMeshError, ValueError):
    """Keypoints, cameras or options the fitter cannot use. The message is one line that names the
    file or argument and says what was expected; scripts print it and exit with code 2."""
