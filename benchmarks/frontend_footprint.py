"""What torch would cost `strata serve`'s HTTP frontend, which runs without it.

    python benchmarks/frontend_footprint.py [--model DIR] [--rounds 5]

The same `strata serve`, its frontend process started as it is (torch-free) or with
`import torch` first (what every frontend paid before the wire types left the engine's
modules). Per round and setup, the order alternating between rounds: the time to import the
frontend's modules in a fresh interpreter, the time from launch to a 200 on /health (engine
start included), and the frontend's resident memory once healthy. Medians over the rounds.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import commit, machine, markdown_table

from strata.health import wait_healthy

SETUPS = {"with torch imported": "import torch; ", "torch-free (as shipped)": ""}
FRONTEND_MODULES = "import strata.server.app, strata.server.launch"
DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def import_seconds(prefix: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", prefix + FRONTEND_MODULES], check=True)
    return time.perf_counter() - started


def serve_once(prefix: str, model: Path) -> tuple[float, float]:
    """(seconds from launch to healthy, frontend RSS in MiB once healthy)."""
    port = free_port()
    code = (prefix + "import sys; from strata.cli import main; "
            f"sys.exit(main(['serve', {str(model)!r}, '--port', '{port}']))")
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process, 300)
        healthy = time.perf_counter() - started
        status = Path(f"/proc/{process.pid}/status").read_text().splitlines()
        rss_kib = int(next(line for line in status if line.startswith("VmRSS")).split()[1])
        return healthy, rss_kib / 1024
    finally:
        process.terminate()
        process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    figures: dict[str, dict[str, list[float]]] = {
        name: {"import": [], "healthy": [], "rss": []} for name in SETUPS}
    for round_index in range(args.rounds):
        order = list(SETUPS.items())
        for name, prefix in order if round_index % 2 == 0 else order[::-1]:
            figures[name]["import"].append(import_seconds(prefix))
            healthy, rss = serve_once(prefix, args.model)
            figures[name]["healthy"].append(healthy)
            figures[name]["rss"].append(rss)
    print(machine())
    print(commit())
    print(f"{args.model.name}, {args.rounds} alternating rounds, medians\n")
    rows = [[name, *(f"{statistics.median(f[key]):{fmt}}" for key, fmt in
                     (("import", ".2f"), ("healthy", ".2f"), ("rss", ".0f")))]
            for name, f in figures.items()]
    print(markdown_table(["frontend", "import its modules (s)", "launch to /health (s)",
                          "frontend RSS (MiB)"], rows))


if __name__ == "__main__":
    main()
