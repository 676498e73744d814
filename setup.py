"""The C++ CPU kernels, built with the package by torch's build helpers, so that no server
start compiles anything (strata/model/cpu_kernels.py compiles one on first use only where
it is missing, and says so).

They are compiled for the CPU that builds them (-march=native). An image built on one
machine and run on others sets STRATA_CPU_ARCH to the oldest of its nodes' CPUs (e.g.
x86-64-v3), or a node with an older CPU stops on an illegal instruction.
"""

import os
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

KERNELS = sorted(path.stem for path in Path("strata/model/csrc").glob("*.cpp"))
ARCH = os.environ.get("STRATA_CPU_ARCH", "native")

setup(
    ext_modules=[CppExtension(f"strata.model._{name}", [f"strata/model/csrc/{name}.cpp"],
                              extra_compile_args=["-O3", f"-march={ARCH}", "-fopenmp"],
                              extra_link_args=["-fopenmp"])
                 for name in KERNELS],
    cmdclass={"build_ext": BuildExtension},
    options={"build_ext": {"parallel": os.cpu_count()}},  # one kernel per core at a time
)
