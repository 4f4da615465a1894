"""The README's code runs as printed.

The Python blocks of README.md marked ``<!-- tested: ... -->`` are run in a fresh interpreter from
the repository root, line by line as the interactive prompt takes pasted code (so a block that
works as a script but not at the ``>>>`` prompt fails too), and what they compute is checked
against the posing functions called directly. The variant with a snapshot loads a decoder-only
snapshot written here, the snippet's one edited line being its path.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.io.checkpoint import save_checkpoint
from common.hand.hand_model_source import resolve_hand_model
from common.hand.kinematics import pose_hand

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARK = "<!-- tested:"

# Runs each snippet of a JSON list {"source", "save"} in its own interactive console, the way the
# Python prompt takes pasted lines; any error or syntax error ends the process with code 1. After a
# snippet, the tensors it names in "save" are written to the .pt file given.
CONSOLE = r'''
import code, json, sys, torch

class Console(code.InteractiveConsole):
    def showsyntaxerror(self, filename=None, **kwargs):
        super().showsyntaxerror(filename)
        sys.exit(1)

    def showtraceback(self):
        super().showtraceback()
        sys.exit(1)

for job in json.load(sys.stdin):
    console = Console(locals={"__name__": "__console__"})
    more = False
    for line in job["source"].splitlines():
        more = console.push(line)
    if more:
        console.push("")
    if job["save"]:
        torch.save({name: console.locals[name] for name in job["names"]}, job["save"])
'''


def readme_blocks():
    """The Python code blocks of README.md that follow a ``<!-- tested: ... -->`` line."""
    blocks, lines = [], README.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.startswith(MARK):
            assert lines[i + 1].strip() == "```python", f"README.md:{i + 2}: a tested block must follow its mark"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            blocks.append("\n".join(lines[i + 2:end]) + "\n")
    return blocks


def run_in_console(jobs, timeout=300):
    result = subprocess.run([sys.executable, "-c", CONSOLE], input=json.dumps(jobs), cwd=ROOT,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"the README's code failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def decoder_snapshot(hand, path, seed=0):
    """A snapshot holding only the decoder (identity code, skeleton and skin correctives) with small
    random weights, keys prefixed ``module.`` as the original saves them; returns the weights."""
    g = torch.Generator().manual_seed(seed)
    J, V = hand.joint_num, hand.vertex_num
    shapes = {
        "id_code": (32,),
        "skeleton_refine_net.fc_skeleton.0.weight": (64, 32), "skeleton_refine_net.fc_skeleton.0.bias": (64,),
        "skeleton_refine_net.fc_skeleton.2.weight": (3 * J, 64), "skeleton_refine_net.fc_skeleton.2.bias": (3 * J,),
        "skin_refine_net.fc_pose.0.weight": (256, 3 * J), "skin_refine_net.fc_pose.0.bias": (256,),
        "skin_refine_net.fc_pose.2.weight": (3 * V, 256), "skin_refine_net.fc_pose.2.bias": (3 * V,),
        "skin_refine_net.fc_id.0.weight": (256, 32), "skin_refine_net.fc_id.0.bias": (256,),
        "skin_refine_net.fc_id.2.weight": (3 * V, 256), "skin_refine_net.fc_id.2.bias": (3 * V,),
    }
    # Scaled so that the correctives are a few mm: large enough to see, small enough to stay a hand.
    weights = {k: torch.randn(s, generator=g) * (1.0 if k == "id_code" else 0.3) for k, s in shapes.items()}
    save_checkpoint({"epoch": 3, "network": {"module." + k: v for k, v in weights.items()}}, path)
    return weights


def mlp(weights, prefix, x):
    """``Linear → ReLU → Linear`` from a state dict's ``prefix.0`` and ``prefix.2`` (float64)."""
    w = {k: v.double() for k, v in weights.items()}
    hidden = torch.relu(x @ w[prefix + ".0.weight"].T + w[prefix + ".0.bias"])
    return hidden @ w[prefix + ".2.weight"].T + w[prefix + ".2.bias"]


def test_readme_has_a_tested_block():
    blocks = readme_blocks()
    assert blocks, f"README.md has no code block marked {MARK!r}"
    for block in blocks:
        compile(block, "README.md", "exec")  # also valid as a script


def test_readme_code_runs_as_printed(tmp_path):
    """The block as printed (no snapshot: the template, correctives zero), and the same block given
    a snapshot; each against the hand posed directly with those correctives."""
    block = readme_blocks()[0]
    assert block.count("snapshot = None") == 1, "the README's snippet names its snapshot in one line"
    hand = resolve_hand_model()
    weights = decoder_snapshot(hand, tmp_path / "snapshot_3.pth.tar")
    with_snapshot = block.replace("snapshot = None", f"snapshot = {str(tmp_path / 'snapshot_3.pth.tar')!r}")
    names = ["euler", "joints", "mesh"]
    out = run_in_console([{"source": block, "save": str(tmp_path / "printed.pt"), "names": names},
                          {"source": with_snapshot, "save": str(tmp_path / "snapshot.pt"), "names": names}])
    # What the README says it prints: the shapes of 3 poses.
    shapes = f"torch.Size([3, {hand.joint_num}, 3]) torch.Size([3, {hand.vertex_num}, 3])"
    assert out.count(shapes) == 2, out

    printed = torch.load(tmp_path / "printed.pt")
    euler = printed["euler"].double()
    index1 = hand.joint_names.index("b_r_index1")
    assert torch.allclose(euler[:, index1, 2], torch.tensor([0.0, 45.0, 90.0], dtype=torch.float64).deg2rad())
    assert torch.count_nonzero(euler) == 2
    # No snapshot: the template posed by those angles, in the wrist's frame.
    joints, mesh = pose_hand(hand, euler)
    assert torch.allclose(printed["joints"].double(), joints, atol=1e-3)
    assert torch.allclose(printed["mesh"].double(), mesh, atol=1e-3)

    # With the snapshot: its skeleton corrective on the local translations, its pose and identity
    # correctives on the rest mesh.
    loaded = torch.load(tmp_path / "snapshot.pt")
    code = weights["id_code"].double()
    skeleton = mlp(weights, "skeleton_refine_net.fc_skeleton", code).view(hand.joint_num, 3)
    rest = (torch.from_numpy(hand.vertices)
            + mlp(weights, "skin_refine_net.fc_pose", euler.reshape(3, -1)).view(3, -1, 3)
            + mlp(weights, "skin_refine_net.fc_id", code).view(1, -1, 3))
    joints_ref, mesh_ref = pose_hand(hand, euler, skeleton_offset=skeleton, rest_vertices=rest)
    assert float((mesh_ref - mesh).norm(dim=-1).mean()) > 1.0  # the correctives move the skin
    assert torch.allclose(loaded["joints"].double(), joints_ref, atol=1e-3)
    assert torch.allclose(loaded["mesh"].double(), mesh_ref, atol=1e-3)


@pytest.mark.parametrize("broken, error", [
    ("with torch.no_grad():\n    identity = model.identity()\nprint(identity)\n", "SyntaxError"),
    ("x = torch.zeros(2)\n", "NameError"),
])
def test_the_console_catches_what_a_prompt_refuses(broken, error):
    """The check itself: a block that needs a blank line after an indented block (a script accepts
    it, the prompt does not), or uses a name it never defines, fails."""
    result = subprocess.run([sys.executable, "-c", CONSOLE], cwd=ROOT, capture_output=True, text=True,
                            input=json.dumps([{"source": broken, "save": "", "names": []}]), timeout=120)
    assert result.returncode == 1 and error in result.stderr, result.stderr
    compile(broken, "script", "exec")  # both are valid scripts


def test_readme_fitting_code_runs_as_printed(tmp_path):
    """The fitting block, run after the first one: the keypoints of the decoded poses are fitted
    back to a fraction of a millimetre, and the angles that moved come back."""
    first, fitting = readme_blocks()[:2]
    assert "fit_keypoints" in fitting
    out = run_in_console([{"source": first + fitting, "save": str(tmp_path / "fit.pt"), "names": ["euler", "keypoints"]}])
    assert f"torch.Size([3, {resolve_hand_model().joint_num}, 3])" in out.splitlines()[-1], out
    residual = float(out.splitlines()[-1].split()[-1])
    assert residual < 0.5, out
