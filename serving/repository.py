"""A Triton model repository on disk: layout, version numbers, atomic version writes, pruning.

Layout (what Triton loads, and what the gateway reads back)::

    REPO/NAME/config.pbtxt                  generated from Triton's ModelConfig (serving.triton_config)
    REPO/NAME/<task>_labels.txt             one class or attribute name per line (label_filename)
    REPO/NAME/<version>/model.onnx          --format onnx
    REPO/NAME/<version>/model.plan          --format tensorrt
    REPO/NAME/<version>/model.py            --format python (+ model.onnx, which it runs)
    REPO/NAME/<version>/manifest.json       the export manifest: tasks, output semantics, io spec

Versions are positive integers, numbered monotonically (one more than the highest present, and
pruning never removes the highest). A version is written into a hidden staging folder next to the
versions and renamed into place, so a polling Triton never sees half a version; pruned versions are
renamed away before they are deleted, for the same reason.

Readers (the gateway, tests) use:

- ``versions(repo, name) -> list[int]``: the versions present, ascending;
- ``latest_version(repo, name) -> Path``: the folder of the highest version (`RepositoryError` if none);
- ``version_path(repo, name, version) -> Path``: one version's folder, checked to exist;
- ``read_version(repo, name, version=None) -> ModelVersion``: a version's folder, number, manifest
  and tensor spec (``version=None`` is the latest).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from training.export.manifest import load_manifest, manifest_io_spec
from training.export.spec import ModelIOSpec
from training.io import atomic_write_text, readable_mode

CONFIG_FILE = "config.pbtxt"
MANIFEST_FILE = "manifest.json"
LABELS_SUFFIX = "_labels.txt"
_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".pruned-"
# Triton takes the model's folder name as its name and serves it at /v2/models/<name>: keep to
# characters that are safe in a folder name, a URL path segment and a Prometheus label; a leading
# '.' would hide the folder, and Triton ignores a model folder whose name is not its config's name.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class RepositoryError(ValueError):
    """A repository, model or version is missing or malformed; the message says what to do."""


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model as the repository holds it."""

    name: str
    version: int
    path: Path
    manifest: dict
    io_spec: ModelIOSpec

    @property
    def model_dir(self) -> Path:
        return self.path.parent


def validate_model_name(name: str) -> str:
    if not isinstance(name, str) or not MODEL_NAME_PATTERN.fullmatch(name) or name.endswith("."):
        raise RepositoryError(
            f"model name {name!r} would be rejected or mangled by Triton: use 1-128 letters, digits, '_', "
            f"'.' or '-', starting with a letter or digit (pattern {MODEL_NAME_PATTERN.pattern}), e.g. "
            f"'scenes' or 'faces-v2'"
        )
    return name


def model_dir(repo: Path, name: str) -> Path:
    return Path(repo) / validate_model_name(name)


def versions(repo: Path, name: str) -> list[int]:
    """Versions present (folders named by a positive integer), ascending; [] for a new model."""
    directory = model_dir(repo, name)
    if not directory.is_dir():
        return []
    found = (int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())
    return sorted(v for v in found if v > 0)


def next_version(repo: Path, name: str) -> int:
    present = versions(repo, name)
    return present[-1] + 1 if present else 1


def version_path(repo: Path, name: str, version: int) -> Path:
    path = model_dir(repo, name) / str(int(version))
    if not path.is_dir():
        raise RepositoryError(
            f"model {name!r} has no version {version} in {repo} (it has {versions(repo, name) or 'none'}); "
            f"convert a run with `python -m serving.convert RUN_DIR --repository {repo} --name {name}`"
        )
    return path


def latest_version(repo: Path, name: str) -> Path:
    """The folder of the highest version of ``name``."""
    present = versions(repo, name)
    if not present:
        raise RepositoryError(
            f"model {name!r} has no version in {repo}; convert a run first with "
            f"`python -m serving.convert RUN_DIR --repository {repo} --name {name}`"
        )
    return model_dir(repo, name) / str(present[-1])


def read_version(repo: Path, name: str, version: int | None = None) -> ModelVersion:
    path = latest_version(repo, name) if version is None else version_path(repo, name, version)
    manifest = load_manifest(path / MANIFEST_FILE)
    return ModelVersion(name, int(path.name), path, manifest, manifest_io_spec(manifest))


def label_file(task: str) -> str:
    """File name (relative to the model folder, as ``label_filename`` wants it) of a task's labels."""
    return f"{task}{LABELS_SUFFIX}"


def write_model_files(repo: Path, name: str, files: dict[str, str]) -> None:
    """Write files at the model folder's top level (config, label files), each atomically."""
    directory = model_dir(repo, name)
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, text in files.items():
        atomic_write_text(directory / file_name, text)


@dataclass
class StagedVersion:
    """A version being written: fill ``path``; ``final`` is where it was published."""

    path: Path
    final: Path | None = None


@contextlib.contextmanager
def staged_version(repo: Path, name: str) -> Iterator[StagedVersion]:
    """A hidden staging folder for a new version, renamed to the next free number if the block succeeds.

    If the block raises, the staging folder is deleted and nothing is published. Two converters
    writing the same model concurrently get different numbers: renaming onto an existing (non-empty)
    version fails, and the next number is tried.
    """
    directory = model_dir(repo, name)
    directory.mkdir(parents=True, exist_ok=True)
    staged = StagedVersion(Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory)))
    try:
        yield staged
        _make_readable(staged.path)  # mkdtemp makes 0o700; a server running as another user must read it
        staged.final = _publish(staged.path, directory)
    finally:
        shutil.rmtree(staged.path, ignore_errors=True)


def _publish(staging: Path, directory: Path) -> Path:
    for _ in range(100):
        target = directory / str(next_version(directory.parent, directory.name))
        try:
            os.rename(staging, target)
        except OSError:
            if target.exists():  # another writer published this number meanwhile
                continue
            raise
        return target
    raise RepositoryError(f"could not find a free version number in {directory} after 100 attempts")


def _make_readable(root: Path) -> None:
    file_mode = readable_mode()
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # rw-r--r-- -> rwxr-xr-x
    os.chmod(root, dir_mode)
    for path in root.rglob("*"):
        os.chmod(path, dir_mode if path.is_dir() else file_mode)


def prune(repo: Path, name: str, keep: int) -> list[int]:
    """Delete all but the ``keep`` highest versions; return the removed version numbers."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise RepositoryError(f"--keep must be a positive number of versions to keep, got {keep!r}")
    present = versions(repo, name)
    removed = present[:-keep] if len(present) > keep else []
    directory = model_dir(repo, name)
    for version in removed:
        trash = directory / f"{_TRASH_PREFIX}{version}-{os.getpid()}"
        os.rename(directory / str(version), trash)  # Triton sees the version vanish at once
        shutil.rmtree(trash)
    return removed

