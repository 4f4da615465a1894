"""Which hand model a script uses when the user does not say."""
from __future__ import annotations

from pathlib import Path

from common.hand.hand_model import HandModel, is_hand_model_folder, load_hand_model

ROOT = Path(__file__).resolve().parents[2]
DATA_HAND_MODEL = ROOT / "data" / "hand_model"


def resolve_hand_model(folder: str | Path | None = None) -> HandModel:
    """``folder`` when given; else ``data/hand_model`` when it holds the six files (e.g. the released
    model); else the project's built-in default right hand."""
    if folder:
        return load_hand_model(folder)
    if is_hand_model_folder(DATA_HAND_MODEL):
        return load_hand_model(DATA_HAND_MODEL)
    from common.hand.default_hand import make_default_hand

    return make_default_hand()
