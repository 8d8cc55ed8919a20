"""`python -m training.sweep` end to end on tiny runs: results files, skipping finished runs,
resuming an interrupted one, ΔMTL columns, sparsity.json handling, bad input, real-data fixtures."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
from format_fixtures import write_celebamask, write_nyuv2

import training.run as run_module
import training.trainer as trainer_module
from training.checkpoint import LAST, load_checkpoint
from training.metrics import delta_mtl
from training.sweep import RunSpec, main
from training.sweep_report import PLOTS, format_lambda
from training.tasks import TaskSpec

TINY = ["--set", "dataset.image_size=[32,48]", "--set", "dataset.train_samples=16",
        "--set", "dataset.val_samples=8", "--set", "train.batch_size=8", "--set", "train.epochs=1",
        "--set", "model.encoder=tiny", "--set", "train.checkpoint_every=1", "--set", "optim.lr=0.003"]
GRID = ["--dataset", "synthetic-scenes", "--tasks", "segmentation,depth", "--lambdas", "1e-3", "--seeds", "0"]
NAMES = ["single-segmentation-lam0-seed0", "single-depth-lam0-seed0", "multi-mtl-lam0-seed0",
         "multi-mtl-lam1e-3-seed0"]


def _sweep(out: Path, *extra: str) -> int:
    return main([*GRID, *TINY, "--out", str(out), *extra])


def _rows(out: Path) -> dict[str, dict]:
    with open(out / "results.csv") as fh:
        return {r["run"]: r for r in csv.DictReader(fh)}


def _metrics(out: Path, name: str) -> dict:
    return json.loads((out / "runs" / name / "metrics.json").read_text())


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One tiny sweep (2 dense single-task, dense multi-task, multi-task at λ = 1e-3), run once."""
    out = tmp_path_factory.mktemp("sweep") / "scenes"
    assert _sweep(out) == 0
    return out


@pytest.fixture
def copy_of(finished, tmp_path) -> Path:
    """A private copy of the finished sweep, for tests that change it."""
    return Path(shutil.copytree(finished, tmp_path / "copy"))


def test_names_and_lambda_labels():
    assert [format_lambda(x) for x in (0, 1e-3, 2.5e-4, 1.0, 10.0)] == ["0", "1e-3", "2.5e-4", "1e0", "1e1"]
    assert RunSpec("multi", ("a", "b"), 1e-4, 2).name == "multi-mtl-lam1e-4-seed2"
    assert RunSpec("single", ("depth",), 0.0, 0).name == "single-depth-lam0-seed0"


def test_end_to_end_writes_results(finished):
    rows = _rows(finished)
    assert sorted(rows) == sorted(NAMES)
    assert {r["kind"] for r in rows.values()} == {"single", "multi"}
    mt = rows["multi-mtl-lam1e-3-seed0"]
    assert mt["tasks"] == "segmentation+depth" and float(mt["lambda"]) == 1e-3 and mt["seed"] == "0"
    for column in ("segmentation/miou", "depth/abs_err", "trivial/depth/abs_err", "dense_macs", "compact_macs"):
        assert math.isfinite(float(mt[column])), column
    md = (finished / "results.md").read_text()
    assert "| kind | tasks | λ | n |" in md and "ΔMTL vs ST (%)" in md
    assert "**Quality collapse** — defined as" in md and "**Acceptance**" in md
    for name in PLOTS.values():
        assert (finished / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in NAMES:
        assert (finished / "runs" / name / "train.log").stat().st_size > 0


def test_second_invocation_skips_everything(finished, monkeypatch, capsys):
    stamps = {n: (finished / "runs" / n / "metrics.json").stat().st_mtime_ns for n in NAMES}

    def must_not_train(argv):
        raise AssertionError(f"training.run.main called with {argv}")

    monkeypatch.setattr(run_module, "main", must_not_train)
    assert _sweep(finished) == 0
    out = capsys.readouterr().out
    assert "4 runs: 0 to start, 0 to resume, 4 complete (skipped)" in out
    assert stamps == {n: (finished / "runs" / n / "metrics.json").stat().st_mtime_ns for n in NAMES}
    assert len(_rows(finished)) == 4


def test_delta_columns_equal_recomputed_delta_mtl(finished):
    rows = _rows(finished)
    specs = [TaskSpec.from_dict(d) for d in _metrics(finished, "multi-mtl-lam0-seed0")["task_specs"]]
    single = {t: _metrics(finished, f"single-{t}-lam0-seed0")["tasks"][t] for t in ("segmentation", "depth")}
    dense = _metrics(finished, "multi-mtl-lam0-seed0")["tasks"]
    for name in ("multi-mtl-lam0-seed0", "multi-mtl-lam1e-3-seed0"):
        tasks = _metrics(finished, name)["tasks"]
        assert float(rows[name]["delta_vs_single"]) == pytest.approx(delta_mtl(tasks, single, specs), abs=1e-9)
        assert float(rows[name]["delta_vs_dense"]) == pytest.approx(delta_mtl(tasks, dense, specs), abs=1e-9)
    assert float(rows["multi-mtl-lam0-seed0"]["delta_vs_dense"]) == 0.0
    assert float(rows["single-depth-lam0-seed0"]["delta_vs_single"]) == 0.0


def test_sparsity_json_is_used_and_its_absence_tolerated(copy_of, capsys):
    runs = copy_of / "runs"
    metrics = _metrics(copy_of, "multi-mtl-lam1e-3-seed0")
    fake = {"mode": "channel", "lambda": 1e-3, "groups_total": 200, "groups_zero": 140, "pct_zero_groups": 70.0,
            "encoder_weights": 1000, "zero_weights": 750, "pct_zero_weights": 75.0,
            "dense_parameters": metrics["parameters"], "compact_parameters": 12345,
            "dense_macs": metrics["macs"], "compact_macs": 678900, "alive_channels": 60, "total_channels": 200,
            "layers": []}
    (runs / "multi-mtl-lam1e-3-seed0" / "sparsity.json").write_text(json.dumps(fake))
    (runs / "multi-mtl-lam0-seed0" / "sparsity.json").unlink(missing_ok=True)
    assert _sweep(copy_of) == 0  # nothing to train: re-collects only
    rows = _rows(copy_of)
    sparse, dense = rows["multi-mtl-lam1e-3-seed0"], rows["multi-mtl-lam0-seed0"]
    assert sparse["has_sparsity"] == "True" and float(sparse["pct_zero_groups"]) == 70.0
    assert int(sparse["compact_parameters"]) == 12345 and int(sparse["compact_macs"]) == 678900
    assert dense["has_sparsity"] == "False" and math.isnan(float(dense["pct_zero_groups"]))
    assert math.isnan(float(dense["compact_macs"]))
    assert int(dense["dense_parameters"]) == _metrics(copy_of, "multi-mtl-lam0-seed0")["parameters"]
    md = (copy_of / "results.md").read_text()
    assert "| 70 | 75 | 0.01235 | 0.6789 |" in md
    assert "70.0 % zero groups" in md.split("**Acceptance**")[1]


class _Interrupted(Exception):
    pass


def test_interrupted_run_is_resumed_not_restarted(copy_of, monkeypatch, capsys):
    name = "multi-mtl-lam1e-3-seed0"
    run_dir = copy_of / "runs" / name
    shutil.rmtree(run_dir)

    def interrupt(step: int) -> None:
        if step == 2:  # after the mid-epoch checkpoint of step 1, before the epoch's end
            raise _Interrupted

    monkeypatch.setattr(trainer_module, "_maybe_inject_kill", interrupt)
    assert _sweep(copy_of) == 1  # the run failed; the other three were skipped
    assert "1 to start, 0 to resume, 3 complete" in capsys.readouterr().out
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.json").exists()
    progress = load_checkpoint(run_dir / LAST)["progress"]
    assert (progress["epoch"], progress["batch"]) == (0, 1)
    monkeypatch.undo()

    assert _sweep(copy_of) == 0
    assert "0 to start, 1 to resume, 3 complete" in capsys.readouterr().out
    log = (run_dir / "train.log").read_text()
    assert "--resume" in log and "at epoch 0, batch 1" in log
    assert load_checkpoint(run_dir / LAST)["progress"]["global_step"] == 2  # 2 batches in all, not 1 + 2
    assert name in _rows(copy_of)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "segmentation,colour"], "unknown task"),
    (["--tasks", "depth"], "at least two tasks"),
    (["--lambdas", "1e-3", "-0.01"], "must be finite and >= 0"),
    (["--lambdas", "nan"], "must be finite"),
    (["--set", "train.epochz=3"], "train.epochz"),
    (["--set", "train.epochs"], "KEY=VALUE"),
    (["--dataset", "nyuv2", "--data-root", "/nonexistent/nyu"], "/nonexistent/nyu"),
])
def test_bad_input_exits_2(tmp_path, capsys, argv, message):
    assert main([*GRID, *TINY, *argv, "--out", str(tmp_path / "s")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("lambdas", [[], ["-1e-2"]])  # argparse reads "-1e-2" as an unknown option
def test_empty_or_unparsable_lambda_list_is_a_usage_error(tmp_path, capsys, lambdas):
    with pytest.raises(SystemExit) as exc:
        main(["--lambdas", *lambdas, "--out", str(tmp_path / "s")])
    assert exc.value.code == 2
    assert "--lambdas" in capsys.readouterr().err or "-1e-2" in lambdas


def test_changed_settings_are_refused_for_existing_runs(finished, capsys):
    assert _sweep(finished, "--set", "train.epochs=2") == 2
    err = capsys.readouterr().err
    assert "train.epochs: 1 in the run, 2 in the sweep" in err and "new --out" in err


def test_dry_run_prints_the_plan_only(tmp_path, capsys):
    out = tmp_path / "s"
    assert main([*GRID, *TINY, "--seeds", "0", "1", "--single-task-grid", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # per seed: 2 dense single-task, dense + 1 multi-task, 2 single-task at λ = 1e-3
    assert "12 runs: 12 to start, 0 to resume, 0 complete" in printed
    assert "single-depth-lam1e-3-seed1" in printed
    assert not out.exists()


@pytest.mark.slow  # two sweeps on real-data fixtures; the loaders have fast tests
@pytest.mark.parametrize("dataset", ["nyuv2", "celebamask-hq"])
def test_same_command_runs_on_real_data_fixtures(tmp_path, dataset):
    root = tmp_path / "data"
    if dataset == "nyuv2":
        write_nyuv2(root, n_train=4, n_val=3, size=(24, 32))
        tasks = "segmentation,depth"
    else:
        write_celebamask(root, n=6, size=64)  # 2 samples per split
        tasks = "segmentation,attributes"
    out = tmp_path / "sweep"
    argv = ["--dataset", dataset, "--data-root", str(root), "--tasks", tasks, "--lambdas", "1e-2",
            "--set", "dataset.image_size=[32,32]", "--set", "train.epochs=1", "--set", "train.batch_size=2",
            "--set", "model.encoder=tiny", "--out", str(out)]
    assert main(argv) == 0
    rows = _rows(out)
    assert len(rows) == 4 and {r["kind"] for r in rows.values()} == {"single", "multi"}
    multi = rows["multi-mtl-lam1e-2-seed0"]
    assert math.isfinite(float(multi["segmentation/miou"]))
    assert "| multi |" in (out / "results.md").read_text()


def test_the_lambda_acceptance_line_ignores_target_runs():
    """A targets sweep has no λ to accept: a 0.6 target frozen just below 60 % must not make the
    line pick (and fail) another target's run."""
    from training.sweep_report import Setting, acceptance

    rows = [{"pct_zero_groups": 74.8, "delta_vs_dense": -1.34}]
    targets = [Setting("multi", ("a", "b"), 0.0, [{"pct_zero_groups": 0.0, "delta_vs_dense": 0.0}]),
               Setting("multi", ("a", "b"), 2e-3, rows, target="zero_groups=0.75")]
    assert "not applicable" in acceptance(targets)
    lam = [*targets, Setting("multi", ("a", "b"), 0.1, rows)]
    assert "FAIL" in acceptance(lam) and "74.8 %" in acceptance(lam)
