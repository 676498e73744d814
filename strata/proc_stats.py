"""A process' CPU time and age from /proc (Linux): for the benchmarks and the tests that hold
a server to its idle cost, and for the server's own start-up durations."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name (which may hold spaces): fields[0] is field 3."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far, all its threads (not its children)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_age_seconds(pid: int | None = None) -> float:
    """Seconds since the process started (this one by default), by the kernel's clock."""
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - int(_stat_fields(pid or os.getpid())[19]) / os.sysconf("SC_CLK_TCK")
