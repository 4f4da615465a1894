"""The project's user-facing errors (common/errors.py): bad input is one line and exit code 2 in
every script; anything else is a bug, with its traceback and exit code 1."""
import importlib
import subprocess
import sys
import textwrap

import pytest

from common.errors import (DeepHandMeshError, FileFormatError, MissingFileError, OptionError, OutputError,
                           exit_code)
from tests.conftest import REPO


def test_exit_code_reports_a_user_error_in_one_line(capsys):
    def bad_input():
        raise FileFormatError("p.yaml:3: joint 'index1': expected three angles")

    assert exit_code(bad_input) == 2
    assert capsys.readouterr().err == "error: p.yaml:3: joint 'index1': expected three angles\n"
    lines = []
    assert exit_code(bad_input, report=lines.append) == 2 and lines == [
        "error: p.yaml:3: joint 'index1': expected three angles"]
    assert exit_code(lambda: 3) == 3 and exit_code(lambda: None) == 0 and exit_code(lambda: REPO) == 0


@pytest.mark.parametrize("bug", [ValueError("a plain ValueError"), KeyError("k"), OSError("disk"), TypeError("t")])
def test_exit_code_lets_a_bug_through(bug):
    def buggy():
        raise bug

    with pytest.raises(type(bug)):
        exit_code(buggy)


def test_every_project_error_is_a_user_error_and_keeps_its_old_base():
    from common.renderer.backend import RendererBackendError
    from common.io.checkpoint import CheckpointError
    from common.utils.distributed import DistributedError
    from common.hand.hand_model import HandModelError
    from common.hand.pose_io import PoseError
    from common.io.safe_pickle import DepthmapError
    from data.dataset import DataFormatError, SampleError
    from demo.editor import EditorError
    from main.config import ConfigError

    old_base = {ConfigError: ValueError, CheckpointError: ValueError, HandModelError: ValueError,
                PoseError: ValueError, DataFormatError: ValueError, DepthmapError: ValueError,
                DistributedError: ValueError, RendererBackendError: ValueError, OptionError: ValueError,
                FileFormatError: ValueError, MissingFileError: FileNotFoundError, OutputError: OSError,
                SampleError: RuntimeError, EditorError: RuntimeError}
    for cls, base in old_base.items():
        assert issubclass(cls, DeepHandMeshError) and issubclass(cls, base), cls


# ------------------------------------------------------------------------------ the scripts
# (module, argv, the function that the planted error replaces); argv gets as far as that function.
SCRIPTS = [
    ("demo.demo", ["--out", "{tmp}"], "decode_pose"),
    ("demo.animate", ["--poses", "open", "fist", "--out", "{tmp}/a.gif"], "render_frames"),
    ("demo.editor", ["--port", "0"], "Editor"),
    ("main.train", ["--data_dir", "{tmp}", "--set", "output_dir={tmp}"], "Trainer"),
    ("main.test", ["--test_epoch", "0", "--data_dir", "{tmp}", "--set", "output_dir={tmp}"], "Tester"),
    ("tools.bench", ["decode", "--hands", "default"], "bench_decode"),
    ("tools.fuzz", ["--cases", "1"], "run_fuzz"),
    ("tools.ablation", ["--data_dir", "{tmp}", "--holdout", "x", "--out", "{tmp}", "--end_epoch", "1"],
     "study_options"),
    ("data.make_synthetic", ["--out", "{tmp}"], "generate"),
    ("data.show_sample", ["--data", "{tmp}", "--out", "{tmp}/s.png"], "show_sample"),
    ("common.hand.default_hand", ["--out", "{tmp}/hand"], "make_default_hand"),
]


def planted(error):
    def function(*args, **kwargs):
        raise error
    return function


@pytest.mark.parametrize("module, argv, target", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_scripts_report_user_errors_and_let_bugs_through(module, argv, target, tmp_path, monkeypatch, capsys):
    script = importlib.import_module(module)
    argv = [a.format(tmp=tmp_path) for a in argv]
    monkeypatch.setattr(script, target, planted(OptionError("--something 3: expected at most 2")))
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert [line.split("error: ", 1)[1] for line in err.splitlines() if "error: " in line] == [
        "--something 3: expected at most 2"] and "Traceback" not in err, err
    for bug in (ValueError("planted: not the user's fault"), KeyError("planted")):
        monkeypatch.setattr(script, target, planted(bug))
        with pytest.raises(type(bug), match="planted"):
            script.main(argv)
        assert "error: " not in capsys.readouterr().err


PLANT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from {module} import {name} as script
    def planted(*args, **kwargs):
        raise {error}
    setattr(script, "{target}", planted)
    sys.exit(script.main(sys.argv[2:]))
""")


@pytest.mark.parametrize("module, argv, target", [SCRIPTS[0], SCRIPTS[3]], ids=["demo", "train"])
def test_a_bug_shows_its_traceback_and_exit_code_1(module, argv, target, tmp_path):
    """Run as a user runs them (a process of their own): the planted bug's traceback and exit code 1;
    the same place raising a user error: one line and exit code 2."""
    package, name = module.split(".")
    argv = [a.format(tmp=tmp_path) for a in argv]

    def run(error):
        code = PLANT.format(module=package, name=name, target=target, error=error)
        return subprocess.run([sys.executable, "-c", code, str(REPO), *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=300)

    bug = run("KeyError('planted bug')")
    assert bug.returncode == 1, bug.stderr[-2000:]
    assert "Traceback (most recent call last)" in bug.stderr and "KeyError: 'planted bug'" in bug.stderr
    assert "error: " not in bug.stderr.replace("KeyError: ", "")
    user = run("__import__('common.errors').errors.OptionError('--pose x: no such file')")
    assert user.returncode == 2, user.stderr[-2000:]
    assert "Traceback" not in user.stderr
    assert [line for line in user.stderr.splitlines() if "error: " in line][-1].endswith("error: --pose x: no such file")


def test_an_output_that_cannot_be_written_is_a_user_error(tmp_path, capsys):
    from demo import demo

    (tmp_path / "file").write_text("a file where the output folder would go")
    assert demo.main(["--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'file' / 'out'}: cannot create the folder" in err and "Traceback" not in err
