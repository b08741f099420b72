"""cffi builder for ``hetcomm._capi``, a thin binding over lib/libhetcomm.so.

The declarations come straight from csrc/hetcomm.h (the part between the
HC_CDEF markers), so the header stays the single source of the ABI.
"""
import os
import pathlib
import re

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# Portable flags only: SIMD paths are picked at run time (cpuid checks inside
# the kernels), so a wheel runs on any x86-64.
CFLAGS = ["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wextra",
          "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
if os.environ.get("HETCOMM_DEBUG_BUILD"):
    CFLAGS += ["-O0", "-g", "-fsanitize=address,undefined"]


def cdef_from_header() -> str:
    text = (CSRC / "hetcomm.h").read_text()
    begin = text.index("/* HC_CDEF_BEGIN */") + len("/* HC_CDEF_BEGIN */")
    return text[begin:text.index("/* HC_CDEF_END */")]


def public_header_api() -> list[str]:
    """The function names the public header declares (what libhetcomm.so exports)."""
    return sorted(set(re.findall(r"\b(hc_\w+)\s*\(", re.sub(r"\(\*\w+\)", "", cdef_from_header()))))


def core_sources() -> list[pathlib.Path]:
    return [p for sub in ("core", "algo", "kernels", "transport") for p in sorted((CSRC / sub).glob("*.c"))]


ffibuilder = FFI()
ffibuilder.cdef(cdef_from_header())
# The C core logs through this Python callback (see hetcomm/_native.py).
ffibuilder.cdef('extern "Python" void hc_python_log(int, const char *, void *);')
ffibuilder.set_source(
    "hetcomm._capi",
    '#include "hetcomm.h"\n',
    include_dirs=[str(CSRC)],
    libraries=["hetcomm"],
    # library_dirs is added by setup.py once it has built the library.
    extra_link_args=["-Wl,-rpath,$ORIGIN/lib"],
)
