"""cffi builder for the C core (module ``hetcomm._capi``).

The declarations come straight from csrc/hetcomm.h (the part between the
HC_CDEF markers), so the header stays the single source of the ABI.
"""
import os
import pathlib
import platform

from cffi import FFI

ROOT = pathlib.Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def _cdef_from_header() -> str:
    text = (CSRC / "hetcomm.h").read_text()
    begin = text.index("/* HC_CDEF_BEGIN */") + len("/* HC_CDEF_BEGIN */")
    end = text.index("/* HC_CDEF_END */")
    return text[begin:end]


def _core_sources() -> list[str]:
    sources = []
    for sub in ("core", "algo", "kernels", "transport"):
        sources += sorted(str(p.relative_to(ROOT)) for p in (CSRC / sub).glob("*.c"))
    return sources


# Portable flags only: SIMD paths are picked at run time (target_clones and
# cpuid checks inside the kernels), so a wheel runs on any x86-64.
_cflags = ["-O3", "-std=gnu11", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wextra",
           "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
if os.environ.get("HETCOMM_DEBUG_BUILD"):
    _cflags += ["-O0", "-g", "-fsanitize=address,undefined"]

ffibuilder = FFI()
ffibuilder.cdef(_cdef_from_header())
# The C core logs through this Python callback (see hetcomm/_native.py).
ffibuilder.cdef('extern "Python" void hc_python_log(int, const char *, void *);')
ffibuilder.set_source(
    "hetcomm._capi",
    '#include "hetcomm.h"\n',
    sources=_core_sources(),
    include_dirs=[str(CSRC)],
    extra_compile_args=_cflags,
    extra_link_args=["-pthread"] + (["-fsanitize=address,undefined"] if os.environ.get("HETCOMM_DEBUG_BUILD") else []),
    libraries=["dl", "m"] if platform.system() == "Linux" else ["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
