"""The serving half of `make demo` (`python -m training.demo`) on an exported run: convert, serve as a
real process, call it with both client commands, stop it with SIGTERM."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

from serving.repository import versions
from training import demo


def test_demo_converts_serves_calls_and_stops(exported_run, tmp_path, capfd):
    run = shutil.copytree(exported_run, tmp_path / "run")
    repo = tmp_path / "model_repository"

    assert demo.main(["--run", str(run), "--repository", str(repo), "--name", "scenes", "--load-seconds", "1"]) == 0

    out = capfd.readouterr().out
    assert versions(repo, "scenes") == [1] and (repo / "scenes" / "1" / "model.py").is_file()  # python format
    sample = np.asarray(Image.open(run / "sample.png"))
    manifest = json.loads((run / "manifest.json").read_text())
    assert sample.shape == (*manifest["input"]["size"], 3)
    pictures = sorted(p.name for p in (run / "predictions").iterdir())
    assert pictures == ["sample.depth.png", "sample.normal.png", "sample.segmentation.png"]
    assert "most pixels:" in out and " m)" in out  # the outputs' summary: class shares, depth range
    assert "server ms (median)" in out and "errors 0" in out  # the load run's report
    assert "stopped the gateway (SIGTERM): exit code 0" in out
    assert "ready:" in (run / "gateway.log").read_text()


def test_demo_without_an_export_says_what_to_run(tmp_path, capfd):
    assert demo.main(["--run", str(tmp_path / "nothing")]) == 2
    assert "python -m training.run --config configs/demo.yaml" in capfd.readouterr().err
