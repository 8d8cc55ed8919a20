"""The init step of the serving pods (deploy/docker/sync-models.py): copies the bundled model repository
into the shared volume, version by version, atomically, without overwriting, racing pods included.

The bundle is what `serving.convert` writes; the volume is a temporary folder.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from deploy_support import DOCKER

from serving import repository
from serving.convert import convert
from serving.triton_config import ServingOptions

SCRIPT = DOCKER / "sync-models.py"


def sync(bundle: Path, volume: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(bundle), str(volume)], capture_output=True, text=True,
                          timeout=60)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def bundle(tmp_path, exported_run):
    """A repository as serving.convert writes it: scenes versions 1 and 2, with config and labels."""
    repo = tmp_path / "bundle"
    for _ in range(2):
        convert(exported_run, repo, "scenes", ServingOptions(format="onnx"))
    (repo / "README.md").write_text("not a model\n")
    return repo


def test_fills_an_empty_volume_with_what_the_server_reads(bundle, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    done = sync(bundle, volume)
    assert done.returncode == 0, done.stderr
    assert "scenes/1" in done.stdout and "scenes/config.pbtxt" in done.stdout
    assert tree(volume) == {k: v for k, v in tree(bundle).items() if k != "README.md"}
    assert repository.versions(volume, "scenes") == [1, 2]
    assert repository.read_version(volume, "scenes").version == 2
    assert not [p for p in volume.rglob(".sync-*")], "no staging folder is left behind"
    again = sync(bundle, volume)
    assert again.returncode == 0 and "up to date" in again.stdout


def test_adds_new_versions_and_leaves_everything_else_alone(bundle, tmp_path, exported_run):
    volume = tmp_path / "volume"
    volume.mkdir()
    assert sync(bundle, volume).returncode == 0
    (volume / "scenes_trt" / "1").mkdir(parents=True)  # what the engine builder installed
    (volume / "scenes_trt" / "1" / "model.plan").write_bytes(b"engine")
    (volume / "scenes" / "2" / "model.onnx").write_bytes(b"changed on the volume")  # versions are never overwritten
    convert(exported_run, bundle, "scenes", ServingOptions(format="onnx", max_batch=4))  # version 3, new config
    assert sync(bundle, volume).returncode == 0
    assert repository.versions(volume, "scenes") == [1, 2, 3]
    assert (volume / "scenes" / "2" / "model.onnx").read_bytes() == b"changed on the volume"
    assert (volume / "scenes" / "config.pbtxt").read_text() == (bundle / "scenes" / "config.pbtxt").read_text()
    assert "max_batch_size: 4" in (volume / "scenes" / "config.pbtxt").read_text()
    assert (volume / "scenes_trt" / "1" / "model.plan").read_bytes() == b"engine"


def test_an_older_bundle_does_not_roll_a_newer_config_back(bundle, tmp_path, exported_run):
    newer = tmp_path / "newer"
    for _ in range(3):
        convert(exported_run, newer, "scenes", ServingOptions(format="onnx", max_batch=4))
    volume = tmp_path / "volume"
    volume.mkdir()
    assert sync(newer, volume).returncode == 0
    config = (volume / "scenes" / "config.pbtxt").read_bytes()
    assert sync(bundle, volume).returncode == 0  # a pod of the previous rollout restarts
    assert (volume / "scenes" / "config.pbtxt").read_bytes() == config
    assert repository.versions(volume, "scenes") == [1, 2, 3]


def test_pods_starting_together_publish_each_version_once(bundle, tmp_path):
    volume = tmp_path / "volume"
    volume.mkdir()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: sync(bundle, volume), range(6)))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    assert tree(volume) == {k: v for k, v in tree(bundle).items() if k != "README.md"}
    assert sorted(p.name for p in (volume / "scenes").iterdir()) == ["1", "2", "config.pbtxt", "segmentation_labels.txt"]


def test_refuses_an_empty_bundle_or_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "volume").mkdir()
    empty = sync(tmp_path / "empty", tmp_path / "volume")
    assert empty.returncode != 0 and "holds no model" in empty.stderr
    missing = sync(tmp_path / "absent", tmp_path / "volume")
    assert missing.returncode == 2 and "must both be folders" in missing.stderr
