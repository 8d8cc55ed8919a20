"""Checkpoints are written atomically and load without pickle."""

import os

import pytest
import torch

from training.checkpoint import CheckpointError, TrainProgress, load_checkpoint, save_checkpoint


def test_round_trip_weights_only(tmp_path):
    path = tmp_path / "ck.pt"
    progress = TrainProgress(epoch=2, batch=5, global_step=17, history=[{"epoch": 0, "val_loss": 1.5}])
    save_checkpoint(path, model_config={"encoder": {"block": "basic"}},
                    states={"model": {"w": torch.arange(4.0)}}, progress=progress)
    ck = load_checkpoint(path)
    assert torch.equal(ck["states"]["model"]["w"], torch.arange(4.0))
    assert TrainProgress.from_dict(ck["progress"]) == progress
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


class Evil:
    """Any non-allowlisted class: loading it would need pickle."""


def test_pickled_object_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a parsimony checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_failed_write_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model_config={}, states={"model": {"w": torch.ones(2)}}, progress=TrainProgress())

    def boom(obj, f):
        open(f, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model_config={}, states={"model": {"w": torch.zeros(2)}}, progress=TrainProgress())
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["states"]["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
