"""The C++ kernels compiled on first use (where the install lacks them): a lock file left
by a process killed inside torch's load() does not make every later start wait forever."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.timeout(60)
def test_a_dead_loaders_lock_file_is_cleared_before_the_next_load(tmp_path, monkeypatch):
    """torch's load() waits while its build directory holds a `lock` file; one killed
    inside it leaves the file. The next loader, holding the kernel's flock (which the
    kernel lets go whoever dies), removes it before it calls load()."""
    import torch
    import torch.utils.cpp_extension

    from strata.model import cpu_kernels

    build_dir = tmp_path / f"strata-torch{torch.__version__}" / "strata_paged_decode"
    build_dir.mkdir(parents=True)
    (build_dir / "lock").touch()  # what a loader killed mid-load leaves
    seen: list[bool] = []

    def load(name, sources, build_directory, **flags):  # torch's, which would compile
        seen.append(Path(build_directory, "lock").exists())
        return name

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    assert cpu_kernels._build("strata_paged_decode", "paged_decode.cpp") == \
        "strata_paged_decode"
    assert seen == [False]
