"""Atomic file writes: a reader (or a resumed run) never sees half a file, and a command that fails
leaves the files it would have replaced as they were."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def readable_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 less the umask). ``mkstemp`` makes 0o600,
    which a serving container running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def staged(path: Path) -> Iterator[Path]:
    """A temporary file next to ``path``, fsynced and renamed onto it only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, readable_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


@contextlib.contextmanager
def staging_dir(parent: Path, name: str) -> Iterator[Path]:
    """A fresh hidden folder in ``parent`` to build several files in; it is on the same file system,
    so renaming them out of it is atomic. Removed afterwards with whatever is left in it."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move the folder ``src`` onto ``dst`` (same file system). The old ``dst`` is renamed aside,
    ``src`` renamed in, then the old one deleted: a reader finds the old folder or the new one (or,
    for the instant between the two renames, none), never a mix of their files."""
    src, dst = Path(src), Path(dst)
    os.chmod(src, 0o777 & ~_umask())  # as mkdir would make it (a staging folder is 0o700)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    with staged(path) as tmp:
        write(tmp)


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(Path(path), lambda p: p.write_text(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")



def append_jsonl(path: Path, record: dict) -> None:
    """Append one line; the line is written with a single write call and fsynced."""
    line = json.dumps(record) + "\n"
    with open(path, "a") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
