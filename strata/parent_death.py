"""A child that goes when its parent goes, however the parent dies (Linux's
PR_SET_PDEATHSIG): what a process group or a signal handler cannot promise for SIGKILL;
and SIGTERM turned into SystemExit, so that a child told to go runs its cleanup."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Loaded at import: a preexec_fn (between fork and exec) should not load libraries.
_libc = ctypes.CDLL(None) if sys.platform == "linux" else None


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """The kernel sends `sig` to this process when the thread that started it ends (its
    parent's main thread, here); exits at once if `parent` is already gone."""
    parent_death_signal(sig)
    if os.getppid() != parent:  # it died before prctl: no signal will come
        os._exit(1)


def parent_death_signal(sig: int) -> None:
    """What the kernel sends this process when its parent goes, from now on."""
    if _libc is not None:
        _libc.prctl(PR_SET_PDEATHSIG, sig)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like an exception (finally blocks and ExitStacks run); a second one
    kills outright."""
    signal.signal(signal.SIGTERM, _exit)


def _exit(signum: int, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise SystemExit(128 + signum)
