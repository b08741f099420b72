"""Build: the C core as libhetcomm.so, the cffi binding on top of it, and the
torch shim's sources.

libhetcomm.so is what C programs and other frameworks link (header:
csrc/hetcomm.h); the cffi module ``hetcomm._capi`` links the same library, so
a process never holds two copies of the core. Only the names declared in the
public header are exported.

The C++ torch shim is not compiled here: it must match the exact torch the
user runs, so it is built on first use (see hetcomm/torch/). Its sources
travel inside the package so that a wheel install can build it.
"""
import os
import pathlib
import re
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).parent.resolve()
sys.path.insert(0, str(ROOT / "hetcomm"))
from _build_capi import CFLAGS, CSRC, core_sources, public_header_api  # noqa: E402


class BuildPyWithShimSources(build_py):
    def run(self):
        super().run()
        target = pathlib.Path(self.build_lib) / "hetcomm" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(CSRC / "hetcomm.h", target / "hetcomm.h")
        shutil.copytree(CSRC / "torch", target / "torch", dirs_exist_ok=True)


class BuildExtWithCoreLibrary(build_ext):
    """Builds lib/libhetcomm.so first, then the extension that links it."""

    def run(self):
        from setuptools._distutils.ccompiler import new_compiler
        from setuptools._distutils.sysconfig import customize_compiler

        package = ROOT / "hetcomm" if self.inplace else pathlib.Path(self.build_lib) / "hetcomm"
        libdir = package / "lib"
        libdir.mkdir(parents=True, exist_ok=True)
        cc = new_compiler()
        customize_compiler(cc)
        script = pathlib.Path(self.build_temp) / "libhetcomm.map"
        script.parent.mkdir(parents=True, exist_ok=True)
        names = "".join(f"    {n};\n" for n in public_header_api())
        script.write_text(f"{{\n  global:\n{names}  local: *;\n}};\n")
        objects = cc.compile([str(s) for s in core_sources()], output_dir=self.build_temp,
                             include_dirs=[str(CSRC)], extra_postargs=CFLAGS + ["-fPIC"])
        cc.link_shared_object(objects, str(libdir / "libhetcomm.so"), libraries=["dl", "m"],
                              extra_postargs=["-pthread", f"-Wl,--version-script={script}", "-Wl,-soname,libhetcomm.so"])
        for ext in self.extensions:
            ext.library_dirs.append(str(libdir))
        super().run()


setup(
    cffi_modules=["hetcomm/_build_capi.py:ffibuilder"],
    cmdclass={"build_py": BuildPyWithShimSources, "build_ext": BuildExtWithCoreLibrary},
)
