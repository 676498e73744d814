"""Child processes for the benchmark scripts: a command run until the `with` ends, its
output in a log, healthy before the body starts."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

from strata.health import wait_healthy


@contextlib.contextmanager
def process(command: list[str], log: Path, url: str, cores: str | None = None,
            threads: int | None = None):
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    if cores:
        command = ["taskset", "-c", cores, *command]
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, child, 600)
            yield url
        finally:
            child.terminate()
            child.wait(60)


def serve(model: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "strata.cli", "serve", str(model), "--port", str(port),
            "--served-model-name", "bench", "--disable-uvicorn-access-log",
            "--max-model-len", "2048", *extra]
