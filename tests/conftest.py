"""Shared fixtures. The real MakeHuman hand lives outside the project (../shared); tests that
need it skip with the reason when it is absent."""
import os
from pathlib import Path

import pytest
import torch

from main.config import Config

REPO = Path(__file__).resolve().parents[1]
MAKEHUMAN_DIR = REPO.parent / "shared" / "hand_models" / "makehuman_right"

# Two threads per test process, and per script a test starts (OMP_NUM_THREADS is inherited): under
# pytest-xdist on a many-core machine, every worker and subprocess taking all cores would
# oversubscribe the machine many times over.
torch.set_num_threads(min(2, torch.get_num_threads()))
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def makehuman_dir() -> Path:
    if not (MAKEHUMAN_DIR / "hand.obj").is_file():
        pytest.skip(f"the MakeHuman hand is not available: {MAKEHUMAN_DIR} not found "
                    "(it lives in ../shared beside the repository)")
    return MAKEHUMAN_DIR


@pytest.fixture(scope="session")
def makehuman(makehuman_dir):
    from common.hand.hand_model import load_hand_model

    return load_hand_model(makehuman_dir)


@pytest.fixture(scope="session")
def default_hand():
    from common.hand.default_hand import make_default_hand

    return make_default_hand()


@pytest.fixture(params=["default", "makehuman"])
def any_hand(request):
    """Each test using it runs on the project's default hand and on the MakeHuman hand."""
    return request.getfixturevalue("default_hand" if request.param == "default" else "makehuman")


@pytest.fixture(scope="session")
def default_hand_dir(tmp_path_factory, default_hand) -> Path:
    """The default hand written out as a hand-model folder (the six files)."""
    from common.hand.hand_model import save_hand_model

    folder = tmp_path_factory.mktemp("default_hand_model")
    save_hand_model(default_hand, folder)
    return folder


@pytest.fixture(params=["default", "makehuman"])
def any_hand_dir(request) -> Path:
    """A hand-model folder: the default hand's files, and MakeHuman's (skipped without ../shared)."""
    return request.getfixturevalue("default_hand_dir" if request.param == "default" else "makehuman_dir")


@pytest.fixture
def small_cfg() -> Config:
    config = Config()
    config.resnet_type = 18
    return config


def make_tiny_set(tmp_path_factory, hand, name: str, seed: int = 0, cameras: int = 3):
    """A synthetic set of 1 sequence x 2 frames x ``cameras`` cameras, 64x42 images, 32x21 depth maps."""
    from data.make_synthetic import generate

    out = tmp_path_factory.mktemp(name)
    generate(out, hand, seed=seed, sequences=1, frames=2, cameras=cameras, image_hw=(64, 42), depth_hw=(32, 21),
             progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_set(tmp_path_factory, default_hand):
    """1 sequence x 2 frames x 3 cameras (:func:`make_tiny_set`)."""
    return make_tiny_set(tmp_path_factory, default_hand, "tiny_set")
