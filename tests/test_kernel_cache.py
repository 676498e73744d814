"""The C++ kernels' build cache survives a process killed inside torch's load(): the lock
file such a process leaves does not make every later start wait forever."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LOAD = ("import sys; from strata.model import cpu_kernels as k; "
        "sys.exit(0 if k.paged_decode_kernel() is not None else 3)")


@pytest.mark.timeout(300)
def test_a_dead_loaders_lock_file_does_not_hang_the_next_load():
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    build_dir = Path(get_default_build_root()) / f"strata-torch{torch.__version__}" / \
        "strata_paged_decode"
    build_dir.mkdir(parents=True, exist_ok=True)
    (build_dir / "lock").touch()  # what a loader killed mid-load leaves
    result = subprocess.run([sys.executable, "-c", LOAD], timeout=240, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (build_dir / "lock").exists()
