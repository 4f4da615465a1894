"""Snapshots in the original layout load; wrong ones fail with a clear message."""

import pytest
import torch
from torch.nn.parallel import DataParallel

from common.io.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from main.model import get_model
from tools.reference import fewer_vertices


def original_snapshot(model, path, epoch=12):
    """What the original's trainer writes: DataParallel keys, Adam state, loss-module buffers."""
    wrapped = DataParallel(model)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-4)
    loss = sum(p.sum() for p in wrapped.parameters())
    loss.backward()
    optimizer.step()
    state = wrapped.state_dict()
    assert all(k.startswith("module.") for k in state)
    V = model.vertex_num
    state["module.penet_loss.segmentation"] = torch.zeros(V)
    state["module.lap_loss.laplacian"] = torch.zeros(3, 3)
    torch.save({"epoch": epoch, "network": state, "optimizer": optimizer.state_dict()}, path)


def test_original_layout_loads_and_decodes(any_hand, small_cfg, tmp_path):
    torch.manual_seed(0)
    source = get_model("train", any_hand, small_cfg)
    with torch.no_grad():
        for p in source.skin_refine_net.parameters():
            p.normal_(0, 0.05)
    path = tmp_path / "snapshot_12.pth.tar"
    original_snapshot(source, path)
    target = get_model("test", any_hand, small_cfg)
    info = load_checkpoint(target, path)
    assert info["epoch"] == 12 and "optimizer" in info
    assert torch.equal(target.id_code, source.id_code)
    euler = torch.zeros(2, any_hand.joint_num, 3)
    euler[:, any_hand.joint_index("index1"), 2] = 1.0
    with torch.no_grad():
        a, b = source.eval().decode(euler), target.eval().decode(euler)
    assert torch.equal(a["mesh_out_refined"], b["mesh_out_refined"])
    assert torch.equal(a["joint_out"], b["joint_out"])


def test_save_checkpoint_atomic_and_plain(any_hand, small_cfg, tmp_path):
    model = get_model("test", any_hand, small_cfg)
    path = tmp_path / "sub" / "snapshot_1.pth.tar"
    save_checkpoint({"epoch": 1, "network": model.state_dict()}, path)
    assert path.is_file() and not (path.parent / (path.name + ".tmp")).exists()
    other = get_model("test", any_hand, small_cfg)
    load_checkpoint(other, path)
    assert torch.equal(other.id_code, model.id_code)


@pytest.mark.parametrize("other", ["makehuman", "1000 vertices"])
def test_vertex_count_mismatch_names_both_counts(other, default_hand, small_cfg, tmp_path, request):
    path = tmp_path / "snap.pth.tar"
    if other == "makehuman":
        state, vertices = get_model("test", request.getfixturevalue("makehuman"), small_cfg).state_dict(), 1622
    else:
        state, vertices = fewer_vertices(get_model("test", default_hand, small_cfg).state_dict(), 1000), 1000
    save_checkpoint({"epoch": 0, "network": state}, path)
    target = get_model("test", default_hand, small_cfg)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(target, path)
    message = str(info.value)
    assert f"{vertices} vertices and 22 joints" in message
    assert f"{default_hand.vertex_num} vertices and 22 joints" in message


def test_backbone_mismatch_is_explained(any_hand, small_cfg, tmp_path):
    path = tmp_path / "snap.pth.tar"
    save_checkpoint({"epoch": 0, "network": get_model("test", any_hand, small_cfg).state_dict()}, path)
    small_cfg.resnet_type = 50
    with pytest.raises(CheckpointError, match="resnet_type"):
        load_checkpoint(get_model("test", any_hand, small_cfg), path)


class Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_untrusted_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth.tar"
    torch.save({"network": {}, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch snapshot"):
        read_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def test_not_a_snapshot(tmp_path):
    path = tmp_path / "junk.pth.tar"
    path.write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="junk.pth.tar"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "absent.pth.tar")
    torch.save({"weights": 1}, tmp_path / "nodict.pth.tar")
    with pytest.raises(CheckpointError, match="'network'"):
        read_checkpoint(tmp_path / "nodict.pth.tar")
