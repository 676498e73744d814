"""The C++ CPU kernels, compiled on first use; None where they cannot be built.

Set STRATA_ATTENTION=torch (or STRATA_LINEAR=torch) to run the pure-PyTorch reference path
instead, and STRATA_COLLECTIVES=torch for torch.distributed's collectives between the
tensor-parallel ranks of one machine.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
SOURCES = Path(__file__).parent / "csrc"


@functools.cache
def paged_decode_kernel() -> ModuleType | None:
    if os.environ.get("STRATA_ATTENTION", "auto") == "torch":
        return None
    return _build("strata_paged_decode", "paged_decode.cpp")


@functools.cache
def skinny_linear_kernel() -> ModuleType | None:
    if os.environ.get("STRATA_LINEAR", "auto") == "torch":
        return None
    return _build("strata_skinny_linear", "skinny_linear.cpp")


@functools.cache
def shm_collectives_kernel() -> ModuleType | None:
    if os.environ.get("STRATA_COLLECTIVES", "auto") == "torch":
        return None
    return _build("strata_shm_collectives", "shm_collectives.cpp")


def _build(name: str, source: str) -> ModuleType | None:
    try:
        import torch
        from torch.utils.cpp_extension import get_default_build_root, load

        # Built into torch's extension cache (keyed by source and flags), once per machine.
        build_dir = Path(get_default_build_root()) / f"strata-torch{torch.__version__}" / name
        build_dir.mkdir(parents=True, exist_ok=True)
        # torch guards a build with a lock file that a process killed inside load() (even
        # with nothing to compile) leaves behind, and every later load waits on it forever.
        # A flock is let go by the kernel however its holder dies: whoever holds it is the
        # only loader, so a lock file it finds is a dead one's.
        with open(build_dir.parent / f"{name}.flock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
            return load(name, [str(SOURCES / source)], build_directory=str(build_dir),
                        extra_cflags=["-O3", "-march=native", "-fopenmp"],
                        extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no ninja: the PyTorch path still works
        logger.warning("C++ kernel %s unavailable (%s); using the PyTorch path", name,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


if __name__ == "__main__":  # `make install` builds them, so no server start compiles (or
    # is killed mid-compile, leaving torch's lock file for every later start to wait on)
    logging.basicConfig(level=logging.INFO)
    kernels = (paged_decode_kernel, skinny_linear_kernel, shm_collectives_kernel)
    built = [kernel() is not None for kernel in kernels]
    logger.info("C++ kernels built: %d of %d", sum(built), len(built))
