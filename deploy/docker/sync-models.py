"""Fill a shared Triton model repository from a bundled one: the init step of the Triton and gateway pods.

    python sync-models.py /bundle /models

``/bundle`` is the ``model_repository/`` that `python -m serving.convert` wrote, baked into the
``parsimony-models`` image (deploy/docker/models.Dockerfile); ``/models`` is the shared volume that
Triton, the gateway and the TensorRT engine-builder Job use. Standard library only.

- A version folder (``NAME/<number>/``) is copied only when the volume does not have it, into a hidden
  staging folder that is then renamed into place, so Triton and the gateway (both polling) never see
  half a version. Pods starting together may race: renaming onto a version another pod has just
  published fails, and the loser deletes its copy. Versions are never overwritten or deleted.
- The model's top-level files (``config.pbtxt``, label files) are written, atomically, only when the
  bundle's newest version is at least the volume's newest, so a pod still running an older bundle
  during a rollout cannot roll a newer model's config back.
- Models on the volume that are not in the bundle (e.g. a ``*_trt`` model the engine builder
  installed) are left alone. Hidden files and folders of the bundle are skipped.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

STAGING_PREFIX = ".sync-"


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def publish_version(source: Path, target: Path) -> bool:
    """Copy ``source`` to the version folder ``target`` unless it exists; True if this call published it."""
    if target.exists():
        return False
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        os.chmod(staging, 0o755)  # mkdtemp made it 0700: Triton and the gateway may run as other users
        try:
            os.rename(staging, target)
        except OSError:
            if target.exists():  # another pod published the same version meanwhile
                return False
            raise
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_file(source: Path, target: Path) -> bool:
    """Replace ``target`` with ``source`` atomically when their contents differ; True if written."""
    data = source.read_bytes()
    if target.is_file() and target.read_bytes() == data:
        return False
    fd, tmp = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{target.name}-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def sync_model(source: Path, target: Path) -> list[str]:
    """Bring one model folder of the bundle into the volume; returns what changed, for the log."""
    target.mkdir(parents=True, exist_ok=True)
    bundled = versions(source)
    present_before = versions(target)
    changes = [f"{target.name}/{v}" for v in bundled if publish_version(source / str(v), target / str(v))]
    if bundled and (not present_before or bundled[-1] >= present_before[-1]):
        for file in sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith(".")):
            if write_file(file, target / file.name):
                changes.append(f"{target.name}/{file.name}")
    return changes


def sync(bundle: Path, volume: Path) -> list[str]:
    models = sorted(p for p in bundle.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        raise SystemExit(f"error: {bundle} holds no model; build the models image from a repository that "
                         "python -m serving.convert filled")
    changes: list[str] = []
    for model in models:
        changes += sync_model(model, volume / model.name)
    return changes


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: sync-models.py BUNDLE_DIR MODEL_REPOSITORY", file=sys.stderr)
        return 2
    bundle, volume = Path(argv[0]), Path(argv[1])
    if not bundle.is_dir() or not volume.is_dir():
        print(f"error: {bundle} and {volume} must both be folders (the bundle and the mounted volume)",
              file=sys.stderr)
        return 2
    changes = sync(bundle, volume)
    print("model repository: " + (", ".join(changes) + " synced" if changes else "up to date"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
