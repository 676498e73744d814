"""Cold start: seconds from starting `strata serve` to /health 200 and to a first token,
fresh (torch's extension cache empty, as on a new pod) and warm (the machine's caches as
the last start left them), alternating, --rounds of each.

    .venv/bin/python benchmarks/cold_start.py --model /tmp/tiny-llama
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from harness import commit, comparison_parser, machine, markdown_table, serve

from strata.health import wait_healthy


def start_once(args, env: dict[str, str], log_name: str) -> tuple[float, float]:
    """(to healthy, to the first token) of one start, in seconds."""
    url = f"http://127.0.0.1:{args.port}"
    command = serve(args.model, args.port)
    with open(args.log_dir / log_name, "w") as log:
        started = time.monotonic()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, child, 600)
            healthy = time.monotonic() - started
            response = httpx.post(f"{url}/v1/completions", timeout=60, json={
                "model": "bench", "prompt": "Once upon a time", "max_tokens": 1})
            response.raise_for_status()
            return healthy, time.monotonic() - started
        finally:
            child.terminate()
            child.wait(60)


def main() -> int:
    args = comparison_parser(__doc__, 8750).parse_args()
    print(machine())
    print(commit())
    times: dict[str, list[tuple[float, float]]] = {"fresh": [], "warm": []}
    for round_ in range(args.rounds):
        for setup in times:  # alternating: fresh, warm, fresh, warm...
            env = dict(os.environ)
            with tempfile.TemporaryDirectory() as empty:
                if setup == "fresh":  # no cache of torch's, of Python's, or of ours
                    env |= {"TORCH_EXTENSIONS_DIR": empty, "XDG_CACHE_HOME": empty}
                times[setup].append(start_once(args, env, f"cold-start-{setup}.log"))
            print(f"round {round_ + 1} {setup}: healthy after {times[setup][-1][0]:.2f} s, "
                  f"first token after {times[setup][-1][1]:.2f} s", file=sys.stderr)
    warm = [statistics.median(t[i] for t in times["warm"]) for i in (0, 1)]
    rows = []
    for setup, runs in times.items():
        healthy, first = (statistics.median(t[i] for t in runs) for i in (0, 1))
        rows.append([setup, f"{healthy:.2f} s", f"{first:.2f} s",
                     f"{healthy / warm[0]:.2f}x", f"{first / warm[1]:.2f}x"])
    print(f"\n{args.model.name}, median of {args.rounds} starts each, alternating")
    print(markdown_table(["start", "to /health 200", "to first token", "healthy vs warm",
                          "first token vs warm"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
