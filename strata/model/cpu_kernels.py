"""The C++ CPU kernels: built with the package (setup.py: `pip install` compiles them for
this machine's CPU), so that no start compiles anything. One that is missing (a source
checkout not installed, a build that failed) is compiled on first use instead, into
torch's extension cache, and said in the log; None where it cannot be built at all.

Set STRATA_ATTENTION=torch (or STRATA_LINEAR=torch, STRATA_FUSED_OPS=torch,
STRATA_KV_BLOCKS=torch) to run the pure-PyTorch reference path instead,
STRATA_DECODE_STEP=torch for decode steps' layers one Python call at a time, and
STRATA_COLLECTIVES=torch for torch.distributed's collectives between the tensor-parallel
ranks of one machine; STRATA_KERNEL_BUILD=jit compiles them on first use even where the
install has them (one built for another CPU, say).
"""

from __future__ import annotations

import fcntl
import functools
import importlib
import logging
import os
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)
SOURCES = Path(__file__).parent / "csrc"


@functools.cache
def paged_decode_kernel() -> ModuleType | None:
    return _load("paged_decode", switch="STRATA_ATTENTION")


@functools.cache
def skinny_linear_kernel() -> ModuleType | None:
    return _load("skinny_linear", switch="STRATA_LINEAR")


@functools.cache
def fused_ops_kernel() -> ModuleType | None:
    return _load("fused_ops", switch="STRATA_FUSED_OPS")


@functools.cache
def decode_step_kernel() -> ModuleType | None:
    return _load("decode_step", switch="STRATA_DECODE_STEP")


@functools.cache
def kv_blocks_kernel() -> ModuleType | None:
    return _load("kv_blocks", switch="STRATA_KV_BLOCKS")


@functools.cache
def shm_collectives_kernel() -> ModuleType | None:
    return _load("shm_collectives", switch="STRATA_COLLECTIVES")


def _load(name: str, switch: str) -> ModuleType | None:
    """The kernel built at install (strata.model._NAME), else compiled now; None where the
    environment variable `switch` asks for the PyTorch path (=torch)."""
    if os.environ.get(switch, "auto") == "torch":
        return None
    import torch  # noqa: F401 (an extension module needs torch's symbols loaded first)

    if os.environ.get("STRATA_KERNEL_BUILD", "install") != "jit":
        try:
            return importlib.import_module(f"strata.model._{name}")
        except ImportError as exc:
            logger.warning("C++ kernel %s was not built at install (%s): compiling it now, "
                           "once per machine (`pip install -e .` builds it with the package)",
                           name, exc)
    return _build(f"strata_{name}", f"{name}.cpp")


def _build(name: str, source: str) -> ModuleType | None:
    try:
        import torch
        from torch.utils.cpp_extension import get_default_build_root, load

        # Built into torch's extension cache (keyed by source and flags), once per machine.
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
        build_dir = Path(root) / f"strata-torch{torch.__version__}" / name
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


if __name__ == "__main__":  # says which kernels load, and compiles any that are missing
    logging.basicConfig(level=logging.INFO)
    kernels = (paged_decode_kernel, skinny_linear_kernel, fused_ops_kernel, decode_step_kernel,
               kv_blocks_kernel, shm_collectives_kernel)
    built = [kernel() is not None for kernel in kernels]
    logger.info("C++ kernels available: %d of %d", sum(built), len(built))
