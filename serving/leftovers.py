"""Who wrote a hidden leftover in a model repository, and whether that writer is gone.

Writers (serving.convert, pruning) name their staging folders and temporary files with their owner,
``PID@HOST.``; a later writer deletes a leftover when that process no longer runs on this host, or,
for another host's leftover (whose processes cannot be seen from here), when it is older than
`STALE_AFTER_S`.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

OWNER = re.compile(r"(?P<pid>\d+)@(?P<host>[A-Za-z0-9-]+)\.")
STALE_AFTER_S = 24 * 3600  # a leftover from another host (whose processes we cannot see) this old is dead


def stale_entries(folder: Path, prefixes: tuple[str, ...]) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    return [p for p in entries for prefix in prefixes if p.name.startswith(prefix) and is_stale(p, prefix)]


def is_stale(path: Path, prefix: str) -> bool:
    owner = OWNER.match(path.name, len(prefix))
    if owner and owner["host"] == host():
        return not alive(int(owner["pid"]))
    try:  # another host's (or an older format's): judged by age
        return time.time() - path.lstat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def owner_tag() -> str:
    return f"{os.getpid()}@{host()}."


def host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "host"
