"""Snapshot retention (keep_last, keep_every) and the warning of a new run over an earlier one's
snapshots (docs/training.md, section Snapshots)."""
import pytest
import torch

import common.io.checkpoint as checkpoint_module
from common.io.checkpoint import read_checkpoint, snapshots_to_delete
from main import train as train_script
from tests.test_train import tiny_args

ONE_ITERATION = ["--set", "train_batch_size=6"]  # the tiny set's 6 samples: one iteration per epoch


def kept_after(end_epoch, keep_last, keep_every):
    """Run retention after every epoch of a run, as the trainer does; the epochs left."""
    folder = []
    for written in range(end_epoch):
        folder.append(written)
        for epoch in snapshots_to_delete(folder, written, keep_last, keep_every):
            folder.remove(epoch)
    return folder


@pytest.mark.parametrize("end, keep_last, keep_every", [(10, 2, 3), (10, 1, 0), (40, 2, 10), (5, 3, 1), (7, 1, 7)])
def test_keep_the_last_n_and_every_kth(end, keep_last, keep_every):
    expected = [e for e in range(end) if e >= end - keep_last or (keep_every and (e + 1) % keep_every == 0)]
    assert kept_after(end, keep_last, keep_every) == expected


def test_defaults_keep_every_snapshot():
    assert kept_after(12, 0, 0) == list(range(12))
    assert kept_after(12, 0, 5) == list(range(12))  # keep_every alone changes nothing


def test_an_earlier_runs_later_snapshots_are_not_this_runs_to_delete():
    assert snapshots_to_delete([0, 1, 2, 3, 4, 5], written=1, keep_last=1, keep_every=0) == [0]
    assert snapshots_to_delete([3, 4], written=0, keep_last=1, keep_every=0) == []


def snapshot_names(out):
    return sorted(p.name for p in (out / "model_dump" / "subject_4").iterdir())


def test_training_keeps_what_the_options_say(tiny_set, tmp_path):
    out = tmp_path / "out"
    args = tiny_args(tiny_set, out) + ONE_ITERATION + ["--set", "keep_last=1", "--set", "keep_every=2",
                                                       "--end_epoch", "4"]
    assert train_script.main(args) == 0
    # (e + 1) % 2 == 0: epochs 1 and 3; the last: 3
    assert snapshot_names(out) == ["snapshot_1.pth.tar", "snapshot_3.pth.tar"]
    log = (out / "log" / "train_logs.txt").read_text()
    assert "snapshots: keeping the last 1 and one every 2 epochs" in log
    assert "deleted snapshot(s) of epoch(s) 0 (keep_last=1, keep_every=2)" in log


def test_a_failed_write_never_costs_the_snapshot_a_resume_needs(tiny_set, tmp_path, monkeypatch, capsys):
    """The disk fills while epoch 1's snapshot is written: with keep_last=1, epoch 0's stays whole
    (retention runs only after a snapshot is safely in place), the run ends with one line and exit
    code 2, and --continue resumes from epoch 0."""
    out = tmp_path / "out"
    args = tiny_args(tiny_set, out) + ONE_ITERATION + ["--set", "keep_last=1", "--end_epoch", "2"]
    real_save = torch.save
    calls = []

    def disk_full_at_epoch_1(obj, fp, *a, **k):
        calls.append(obj["epoch"])
        if obj["epoch"] == 1:
            fp.write(b"half a snapshot")
            raise OSError(28, "No space left on device")
        return real_save(obj, fp, *a, **k)

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full_at_epoch_1)
    assert train_script.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if " error: " in line]
    assert len(lines) == 1 and lines[0].endswith("snapshot_1.pth.tar: cannot write (No space left on device)"), err
    assert calls == [0, 1] and snapshot_names(out) == ["snapshot_0.pth.tar"]  # no .tmp left either
    assert read_checkpoint(out / "model_dump" / "subject_4" / "snapshot_0.pth.tar")["epoch"] == 0

    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    assert train_script.main(args + ["--continue"]) == 0
    assert snapshot_names(out) == ["snapshot_1.pth.tar"]  # written, then epoch 0's deleted
    assert "snapshot_0.pth.tar" in (out / "log" / "train_logs.txt").read_text().split("--continue")[-1]


def test_a_new_run_over_an_earlier_runs_snapshots_warns(tiny_set, tmp_path):
    out = tmp_path / "out"
    args = tiny_args(tiny_set, out) + ONE_ITERATION + ["--end_epoch", "1"]
    assert train_script.main(args) == 0
    assert "earlier run" not in (out / "log" / "train_logs.txt").read_text()
    assert train_script.main(args) == 0
    log = (out / "log" / "train_logs.txt").read_text().split("train.py")[-1]
    folder = out / "model_dump" / "subject_4"
    assert (f"WARNING deephandmesh: {folder} already holds 1 snapshot(s) of an earlier run (epochs 0 to 0). "
            "This new run (no --continue) writes over them") in log
    assert "--set output_dir=" in log and "add --continue" in log
    assert train_script.main(args[:-1] + ["2", "--continue"]) == 0  # resuming it: no warning
    assert "earlier run" not in (out / "log" / "train_logs.txt").read_text().split("train.py")[-1]
