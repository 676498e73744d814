"""Uvicorn's server as `strata serve` and `strata route` run it.

Imports neither torch nor the engine: the router runs in a small pod without them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn

DEFAULT_DRAIN_TIMEOUT = 5.0


def add_drain_timeout_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--drain-timeout", type=float, default=DEFAULT_DRAIN_TIMEOUT,
                        help="on SIGTERM, seconds to let in-flight requests finish before they "
                             "are cut (a client that stops reading cannot hold the server up); "
                             "set it to the pod's terminationGracePeriodSeconds less a margin")


class Server(uvicorn.Server):
    """Uvicorn's server, minus re-raising SIGTERM after the drain: that would kill the process
    before it finishes its own shutdown (`strata serve` stops its engine), and turn a clean
    drain into exit code 143."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
