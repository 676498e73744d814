"""The C++ CPU kernels, built with the package by torch's build helpers, so that no server
start compiles anything (strata/model/cpu_kernels.py compiles one on first use only where
it is missing, and says so).

They are compiled for the CPU that builds them (-march=native). An image built on one
machine and run on others sets STRATA_CPU_ARCH to the oldest of its nodes' CPUs (e.g.
x86-64-v3), or a node with an older CPU stops on an illegal instruction.
"""

import os
import threading
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

KERNELS = sorted(path.stem for path in Path("strata/model/csrc").glob("*.cpp"))
# Kernels share code through headers (decode_step.cpp runs the others' loops): a changed
# header rebuilds every module, or setuptools would call a module up to date by its .cpp.
HEADERS = sorted(str(path) for path in Path("strata/model/csrc").glob("*.h"))
ARCH = os.environ.get("STRATA_CPU_ARCH", "native")


class BuildEachApart(BuildExtension):
    """torch's ninja build writes one build.ninja into the shared temporary folder for
    whichever extension it compiles, so two kernels built at once rewrite it under each
    other (seen: ninja compiled one kernel's object while the other's link then found none).
    Each kernel compiles in a folder of its own."""

    _wrapping = threading.Lock()

    def build_extension(self, ext) -> None:
        with self._wrapping:  # the threads share one compiler: wrap its compile once
            if not getattr(self.compiler, "strata_apart", False):
                compile_in = self.compiler.compile

                def compile_apart(sources, output_dir=None, **kwargs):
                    folder = os.path.join(output_dir or ".", Path(sources[0]).stem)
                    return compile_in(sources, output_dir=folder, **kwargs)

                self.compiler.compile, self.compiler.strata_apart = compile_apart, True
        super().build_extension(ext)

setup(
    ext_modules=[CppExtension(f"strata.model._{name}", [f"strata/model/csrc/{name}.cpp"],
                              depends=HEADERS,
                              extra_compile_args=["-O3", f"-march={ARCH}", "-fopenmp"],
                              extra_link_args=["-fopenmp"])
                 for name in KERNELS],
    cmdclass={"build_ext": BuildEachApart},
    options={"build_ext": {"parallel": os.cpu_count()}},  # one kernel per core at a time
)
