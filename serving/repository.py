"""A Triton model repository on disk: layout, version numbers, atomic version writes, pruning.

Layout (what Triton loads, and what the gateway reads back)::

    REPO/NAME/config.pbtxt                  generated from Triton's ModelConfig (serving.triton_config)
    REPO/NAME/<task>_labels.txt             one class or attribute name per line (label_filename)
    REPO/NAME/<version>/model.onnx          --format onnx
    REPO/NAME/<version>/model.plan          --format tensorrt
    REPO/NAME/<version>/model.py            --format python (+ model.onnx, which it runs)
    REPO/NAME/<version>/manifest.json       the export manifest: tasks, output semantics, io spec

Versions are positive integers, numbered monotonically (one more than the highest present, and
pruning never removes the highest).

Every write is safe at every instant, even when the writer is killed (SIGKILL, power loss): Triton
(strict, or polling with ``--strict-readiness``) and the gateway can load the repository as it is at
any moment.

- A new model (config, label files, version 1) is assembled where neither server looks and appears
  with one rename. Triton takes *every* folder at the repository's top level for a model, hidden
  ones included, so the assembly happens next to the repository (same filesystem), or, where that
  is another filesystem or not writable, in a hidden folder inside an existing model (Triton skips
  a model's non-numeric subfolders). `staged_model` does this.
- A new version of an existing model is written into a hidden folder inside the model and renamed
  to its number (`staged_version`); then the label files, then the config are replaced, each
  atomically (`write_model_files`). The version's tensors match the config already in place (the
  converter refuses a change of tensors), so the old config serves the new version meanwhile.
- Pruned versions are renamed away (hidden) before they are deleted.
- Files are fsynced before they are renamed into place, and folders after.

Hidden leftovers of a killed writer carry its process id and host (``.staging-PID@HOST.xxxx``);
`clean_leftovers` deletes those whose process is gone (or, from another host, that are older than
`serving.leftovers.STALE_AFTER_S`), never those of a writer still running.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from parsimony.io import readable_mode
from parsimony.layout import MANIFEST_FILE, MODEL_CONFIG_FILE, version_numbers
from parsimony.manifest import Manifest
from parsimony.spec import ModelIOSpec
from serving.leftovers import owner_tag, stale_entries

LABELS_SUFFIX = "_labels.txt"
_STAGING_PREFIX = ".staging-"
_TRASH_PREFIX = ".pruned-"
_TMP_PREFIX = ".tmp-"
_LEFTOVER_PREFIXES = (_STAGING_PREFIX, _TRASH_PREFIX, _TMP_PREFIX)
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
    manifest: Manifest
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
    return version_numbers(model_dir(repo, name))


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
    manifest = Manifest.load(path / MANIFEST_FILE)
    return ModelVersion(name, int(path.name), path, manifest, manifest.tensor_spec)


def label_file(task: str) -> str:
    """File name (relative to the model folder, as ``label_filename`` wants it) of a task's labels."""
    return f"{task}{LABELS_SUFFIX}"


def write_model_files(repo: Path, name: str, files: dict[str, str]) -> None:
    """Replace files at the top level of an existing model's folder, each atomically: the label
    files first (a config in place names the same ones), the config last (it makes Triton reload)."""
    directory = model_dir(repo, name)
    write_files(directory, {f: text for f, text in files.items() if f != MODEL_CONFIG_FILE})
    step("labels-written")
    if MODEL_CONFIG_FILE in files:
        write_files(directory, {MODEL_CONFIG_FILE: files[MODEL_CONFIG_FILE]})
        step("config-written")


def write_files(directory: Path, files: dict[str, str]) -> None:
    """Write each file atomically (a temporary file, fsynced, renamed onto it)."""
    directory.mkdir(parents=True, exist_ok=True)
    for file_name, text in files.items():
        _atomic_write(directory / file_name, text)


# --- named steps: where a test may stop a writer to kill it ----------------------------------------------

WRITE_STEPS = ("model-filled", "model-published", "version-filled", "version-published", "labels-written",
               "config-written", "pruning")
_step_hook: Callable[[str], None] | None = None


def on_step(hook: Callable[[str], None] | None) -> None:
    """Call ``hook(step)`` at each of `WRITE_STEPS` as a write reaches it (None: stop calling)."""
    global _step_hook
    _step_hook = hook


def step(name: str) -> None:
    if _step_hook is not None:
        _step_hook(name)


# --- staging and publishing -------------------------------------------------------------------------------


@dataclass
class StagedVersion:
    """A version (or a whole model) being written: fill ``path``; ``final`` is where it was published."""

    path: Path
    final: Path | None = None


def staged_version(repo: Path, name: str) -> contextlib.AbstractContextManager[StagedVersion]:
    """A hidden staging folder inside an existing model, renamed to the next free version number if
    the block succeeds (a new model goes through `staged_model`).

    If the block raises, the staging folder is deleted and nothing is published. Two converters
    writing the same model concurrently get different numbers: renaming onto an existing (non-empty)
    version fails, and the next number is tried.
    """
    directory = model_dir(repo, name)
    directory.mkdir(parents=True, exist_ok=True)
    return _staged(_make_staging(directory, _STAGING_PREFIX), lambda path: _publish(path, directory), "version")


def staged_model(repo: Path, name: str) -> contextlib.AbstractContextManager[StagedVersion]:
    """A hidden folder for a whole new model (fill in its config, label files and ``1/``), on the
    repository's filesystem where neither Triton nor the gateway looks, renamed to ``REPO/NAME`` if
    the block succeeds. If a model of that name appears meanwhile, nothing replaces it
    (`RepositoryError`); if the block raises, nothing is published."""
    repo = Path(repo)
    target = model_dir(repo, name)
    repo.mkdir(parents=True, exist_ok=True)
    return _staged(_new_model_staging(repo, name), lambda path: _publish_model(path, target), "model")


@contextlib.contextmanager
def _staged(path: Path, publish: Callable[[Path], Path], what: str) -> Iterator[StagedVersion]:
    """Yield ``path`` to be filled, then make it readable, fsync it and ``publish`` it (steps
    ``WHAT-filled`` and ``WHAT-published``); delete it if anything fails."""
    staged = StagedVersion(path)
    try:
        yield staged
        _seal(path)
        step(f"{what}-filled")
        staged.final = publish(path)
        step(f"{what}-published")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _publish_model(staging: Path, target: Path) -> Path:
    try:
        os.rename(staging, target)  # replaces at most an empty folder
    except OSError as exc:
        if target.exists():
            raise RepositoryError(
                f"{target} appeared while model {target.name!r} was being written (another convert?); nothing "
                f"was replaced: run the conversion again to add a version to it"
            ) from exc
        raise
    _fsync(target.parent)
    _fsync(staging.parent)
    return target


def _new_model_staging(repo: Path, name: str) -> Path:
    """A staging folder on the repository's filesystem outside its top level (Triton takes every
    folder there for a model, hidden ones too): next to the repository, else inside a model."""
    real = Path(os.path.realpath(repo))
    device = os.stat(real).st_dev
    places = [(real.parent, _sibling_prefix(real))] if real.parent != real else []
    places += [(folder, _STAGING_PREFIX) for folder in _model_folders(real)]
    for parent, prefix in places:
        with contextlib.suppress(OSError):
            if os.stat(parent).st_dev == device:
                return _make_staging(parent, prefix)
    raise RepositoryError(
        f"cannot assemble model {name!r} where Triton does not look: {real.parent} is on another filesystem "
        f"than {repo} or not writable, and {repo} holds no model yet to stage inside (Triton takes every "
        f"folder at a repository's top level for a model); use a repository one level down on that volume "
        f"(e.g. --repository {repo / 'models'}, and point Triton at it)"
    )


def _sibling_prefix(real_repo: Path) -> str:
    return f".{real_repo.name}{_STAGING_PREFIX}"


def _model_folders(real_repo: Path) -> list[Path]:
    return sorted(p for p in real_repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def _make_staging(parent: Path, prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}", dir=parent))


def _publish(staging: Path, directory: Path) -> Path:
    for _ in range(100):
        target = directory / str(next_version(directory.parent, directory.name))
        try:
            os.rename(staging, target)
        except OSError:
            if target.exists():  # another writer published this number meanwhile
                continue
            raise
        _fsync(directory)
        return target
    raise RepositoryError(f"could not find a free version number in {directory} after 100 attempts")


def _seal(root: Path) -> None:
    """Readable by a server running as another user (mkdtemp makes 0o700), and on disk."""
    file_mode = readable_mode()
    dir_mode = file_mode | ((file_mode & 0o444) >> 2)  # rw-r--r-- -> rwxr-xr-x
    for path in sorted(root.rglob("*"), reverse=True):  # children before their folders
        os.chmod(path, dir_mode if path.is_dir() else file_mode)
        _fsync(path)
    os.chmod(root, dir_mode)
    _fsync(root)


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{owner_tag()}", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    """fsync a file, or a folder's entries (some filesystems refuse that for folders: then skipped)."""
    is_dir = path.is_dir()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if is_dir:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not is_dir:
            raise
    finally:
        os.close(fd)


def prune(repo: Path, name: str, keep: int) -> list[int]:
    """Delete all but the ``keep`` highest versions; return the removed version numbers."""
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise RepositoryError(f"--keep must be a positive number of versions to keep, got {keep!r}")
    present = versions(repo, name)
    removed = present[:-keep] if len(present) > keep else []
    directory = model_dir(repo, name)
    for version in removed:
        trash = directory / f"{_TRASH_PREFIX}{owner_tag()}{version}"
        os.rename(directory / str(version), trash)  # Triton sees the version vanish at once
        step("pruning")
        shutil.rmtree(trash)
    return removed


# --- leftovers of killed writers ---------------------------------------------------------------------------


def clean_leftovers(repo: Path) -> list[Path]:
    """Delete what killed writers left behind (staging folders, versions being pruned, temporary
    files) and return it; a writer still running keeps its own."""
    real = Path(os.path.realpath(repo))
    if not real.is_dir():
        return []
    stale = stale_entries(real.parent, (_sibling_prefix(real),)) if real.parent != real else []
    for folder in _model_folders(real):
        stale += stale_entries(folder, _LEFTOVER_PREFIXES)
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
