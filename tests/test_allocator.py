"""common/utils/allocator.py: glibc keeps freed blocks for reuse, so repeated large temporaries
stop faulting their pages in again."""
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from common.utils import allocator
from tests.conftest import REPO

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A batch-64 decode of the default hand allocates ~40 MB of temporaries; count the page faults
# of ten of them after a warm-up. One thread: with several, which of glibc's per-thread arenas a
# temporary lands in depends on the machine's load, and so does the count.
CHILD = textwrap.dedent("""
    import resource, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {repo!r})
    from common.utils.allocator import retain_freed_memory
    applied = retain_freed_memory()
    from common.hand.default_hand import make_default_hand
    from main.config import Config
    from main.model import get_model
    hand = make_default_hand()
    config = Config()
    config.resnet_type = 18
    torch.manual_seed(0)
    model = get_model("test", hand, config).eval()
    euler = (torch.rand(64, hand.joint_num, 3) - 0.5) * torch.from_numpy(hand.dof_mask)
    with torch.no_grad():
        for _ in range(3):
            model.decode(euler)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            model.decode(euler)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(applied, (after - before) / 10)
""")


def _faults_per_decode(opt_out: bool):
    env = dict(os.environ)
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "DEEPHANDMESH_GLIBC_MALLOC_DEFAULTS"):
        env.pop(name, None)
    if opt_out:
        env["DEEPHANDMESH_GLIBC_MALLOC_DEFAULTS"] = "1"
    done = subprocess.run([sys.executable, "-c", CHILD.format(repo=str(REPO))], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    applied, faults = done.stdout.split()[-2:]
    return applied == "True", float(faults)


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_retained_memory_stops_page_faults_of_repeated_temporaries():
    applied, faults = _faults_per_decode(opt_out=False)
    default_applied, default_faults = _faults_per_decode(opt_out=True)
    assert applied and not default_applied
    # With glibc's defaults this pattern faults thousands of pages back in per decode (measured
    # 2,000-7,000; how many depends on glibc's adaptive thresholds); kept memory, almost none.
    assert faults < 300, f"{faults} page faults per decode with memory kept, {default_faults} without"


def test_environment_wins(monkeypatch):
    monkeypatch.setenv("DEEPHANDMESH_GLIBC_MALLOC_DEFAULTS", "1")
    assert allocator.retain_freed_memory() is False
    monkeypatch.delenv("DEEPHANDMESH_GLIBC_MALLOC_DEFAULTS")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert allocator.retain_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert allocator.retain_freed_memory() is GLIBC
