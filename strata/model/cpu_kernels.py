"""The C++ CPU kernels, compiled on first use; None where they cannot be built.

Set STRATA_ATTENTION=torch to run the pure-PyTorch reference path instead.
"""

from __future__ import annotations

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


def _build(name: str, source: str) -> ModuleType | None:
    try:
        from torch.utils.cpp_extension import load

        # Built into torch's extension cache (keyed by source and flags), once per machine.
        return load(name, [str(SOURCES / source)], extra_cflags=["-O3", "-march=native",
                                                                  "-fopenmp"],
                    extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no ninja: the PyTorch path still works
        logger.warning("C++ kernel %s unavailable (%s); using the PyTorch path", name,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
