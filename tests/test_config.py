"""Run configuration: precedence, validation of unknown keys, flags, resume restrictions."""

import pytest
import yaml

from training.config import ConfigError, resolve_config
from training.run import build_parser, resolve


def test_defaults_then_file_then_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"optim": {"lr": 0.01, "name": "sgd"}, "train": {"epochs": 3}}))
    args = build_parser().parse_args(["--config", str(cfg_file), "--lr", "0.5", "--tasks", "depth,normal"])
    cfg = resolve(args)
    assert cfg.optim.lr == 0.5  # flag beats file
    assert cfg.optim.name == "sgd"  # file beats default
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == 16  # default kept
    assert cfg.tasks == ["depth", "normal"]


def test_unknown_key_rejected_with_its_path(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.learning_rate: unknown key"):
        resolve_config({"optim": {"learning_rate": 0.1}})


def test_invalid_value_named():
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        resolve_config({"train": {"epochs": 0}})


def test_set_overrides_nested_key(tmp_path):
    args = build_parser().parse_args(["--set", "optim.warmup_epochs=2", "--set", "dataset.options={preset: full}"])
    cfg = resolve(args)
    assert cfg.optim.warmup_epochs == 2
    assert cfg.dataset.options == {"preset": "full"}


def test_duplicate_task_rejected():
    with pytest.raises(ConfigError, match="twice"):
        resolve_config({"tasks": ["depth", "depth"]})


def test_resume_rejects_architecture_flags(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"train": {"epochs": 2}}))
    args = build_parser().parse_args(["--resume", str(tmp_path), "--encoder", "resnet18"])
    with pytest.raises(ConfigError, match="only --epochs"):
        resolve(args)
    cfg = resolve(build_parser().parse_args(["--resume", str(tmp_path), "--epochs", "5"]))
    assert cfg.train.epochs == 5 and cfg.out == str(tmp_path)
