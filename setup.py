"""Build: the C core through cffi (API mode), plus the torch shim's sources.

The C++ torch shim is not compiled here: it must match the exact torch the
user runs, so it is built on first use (see hetcomm/torch/_build.py). Its
sources travel inside the package so that a wheel install can build it.
"""
import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()


class BuildPyWithShimSources(build_py):
    def run(self):
        super().run()
        target = pathlib.Path(self.build_lib) / "hetcomm" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "csrc" / "hetcomm.h", target / "hetcomm.h")
        shutil.copytree(ROOT / "csrc" / "torch", target / "torch", dirs_exist_ok=True)


setup(
    cffi_modules=["hetcomm/_build_capi.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithShimSources},
)
