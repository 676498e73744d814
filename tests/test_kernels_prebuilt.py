"""The C++ kernels are built with the package: a start compiles nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

LOAD = ("from strata.model import cpu_kernels as k; "
        "print(*[m.__name__ for m in (k.paged_decode_kernel(), k.skinny_linear_kernel(), "
        "k.fused_ops_kernel(), k.decode_step_kernel(), k.kv_blocks_kernel(), "
        "k.shm_collectives_kernel())])")


@pytest.mark.timeout(120)
def test_every_kernel_loads_from_the_install_and_nothing_compiles(tmp_path):
    """With torch's extension cache empty (a fresh machine), each kernel is the module
    built at install: the cache stays empty and nothing is said about compiling."""
    cache = tmp_path / "cache"
    result = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True,
                            env=os.environ | {"TORCH_EXTENSIONS_DIR": str(cache),
                                              "XDG_CACHE_HOME": str(cache)}, timeout=100)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "strata.model._paged_decode", "strata.model._skinny_linear", "strata.model._fused_ops",
        "strata.model._decode_step", "strata.model._kv_blocks", "strata.model._shm_collectives"]
    assert "compiling" not in result.stderr
    assert not cache.exists() or not any(cache.iterdir())
