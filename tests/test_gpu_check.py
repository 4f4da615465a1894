"""tools/gpu_check.sh, rehearsed on the CPU: every step of the GPU check runs its real command with
its real options (at the smallest sizes, the renderer's kernel in Triton's interpreter) and the
summary shows each table, so that a lent GPU's minutes are not spent on a broken script."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from common.renderer.triton_rasterizer import triton_available
from tests.conftest import REPO

STEPS = ["environment", "cuda_tests", "kernel", "renderer", "synthetic", "train_b2", "personalise", "suite"]


@pytest.mark.skipif(not triton_available(), reason="Triton does not import here (it ships with PyTorch's CUDA "
                    "wheels): the rehearsal runs the renderer's kernel in Triton's interpreter")
@pytest.mark.skipif(shutil.which("timeout") is None, reason="the script needs coreutils' timeout")
def test_the_gpu_check_rehearsed_on_the_cpu(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "logs")}
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--rehearsal"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    summary = done.stdout
    assert done.returncode == 0, done.stderr
    steps = (tmp_path / "logs" / "steps.log").read_text()
    assert re.findall(r"^(\w+): exit 0 in", steps, re.M) == STEPS, steps
    for shown in ["python 3.", "installed: {'triton': True",                            # environment
                  "deselected",                                                         # the CUDA tests
                  "tile  8x8  16 faces 4 warps:",                                       # the kernel's table
                  "nat/tri |", "nat/ten |",                                             # the renderer's table
                  "forward: rendering", "of which rendering", "samples/s: ",             # the stage table
                  "channels_last=true encoder_bf16=true",                               # the variants
                  "residual per frame (depth error, mm)",                               # personalisation
                  "5 passed", "slowest 15 durations"]:                                  # the suite
        assert shown in summary, (shown, summary)
    # The training step rendered with the GPU's renderer (the kernel; its interpreter here), not the CPU's.
    assert "native_rasteriser=triton" in (REPO / "tools" / "gpu_check.sh").read_text()
    table = summary[summary.index("forward: rendering"):]
    assert float(table.split()[2]) > 100  # ms: the interpreter, not the tensor path's few ms


def test_the_gpu_check_refuses_an_unknown_option():
    done = subprocess.run(["bash", "tools/gpu_check.sh", "--fast"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "unknown option --fast (expected --no-train, --no-suite, --rehearsal)" in done.stdout


def test_kernel_settings_are_powers_of_two():
    import argparse

    from tools.bench import kernel_setting

    assert kernel_setting("8x16x4x2") == (8, 16, 4, 2) and kernel_setting("16X16X1X4") == (16, 16, 1, 4)
    for text in ("8x8x3x4", "8x8x16", "8x8x16x4x1", "0x8x16x4", "axbxcxd", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected HxWxSTEPxWARPS like 8x8x16x4, each a power of two"):
            kernel_setting(text)
