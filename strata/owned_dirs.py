"""Temporary folders owned by a process (its pid in the name), and the sweep of those whose
process is gone: a process killed with SIGKILL cannot remove its own, so the next start
does it."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "strata-"  # then the owner's pid, a dash, what it is for


def owned_temp_dir(purpose: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{purpose}-"))


def remove_orphaned_dirs() -> None:
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        pid = path.name.removeprefix(PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
