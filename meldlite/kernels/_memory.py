"""Keep the fixed memory of a process that runs cached kernels small.

A `meldlite run` compiles nothing when Numba's on-disk cache is warm, yet Numba sets
itself up as for compiling (docs/speed.md, "Fixed memory", has the measurements):

- `lazy_linking_modules`: loading a cached kernel also parses its LLVM bitcode into a
  module kept only in case a later compilation inlines the kernel into new code
  (8 MiB of heap for attention_block, 21 MiB for the six kernels a run loads). The
  bitcode bytes are kept instead (1.5 MiB) and parsed when a compilation asks for them.
- `light_blas_probe`: Numba's target setup imports `scipy.linalg` (when SciPy is
  installed) only to learn whether `np.dot` can be compiled; that import is 19 MiB of
  modules and a second OpenBLAS. The probe here checks that SciPy's BLAS module is
  installed without importing it; compiling `np.dot` still imports and checks it.
- `prepare_target`: set Numba's target up (at `Model` load) between two releases.
- `release_compiler_pages`: the compiler's machine code (LLVM in libllvmlite.so, 170 MB
  on disk) is mapped page by page as Numba sets up; once set up, a run executes little
  of it. The clean, read-only mappings of that library are dropped from this process
  (they fault back in from the page cache if a compilation happens), and Linux's page
  reclaim no longer protects them as executable code in use.
- `trim_heap`: glibc keeps freed heap pages (the parsed linking modules, 5 MiB after a
  run's first forward pass); malloc_trim returns them.
- `install`: the first two, before Numba's target is set up (`meldlite.kernels` import).

Each uses Numba internals; where they differ from what is expected it does nothing.
"""

import contextlib
import ctypes
import functools
import importlib.util
import pathlib
import re
import sys

import llvmlite.binding as ll
from numba.core import codegen

MADV_DONTNEED = 4
_LLVM_LIBRARY = "libllvmlite"


def lazy_linking_modules() -> None:
    """Cached kernels keep their linking bitcode as bytes, parsed on first use."""
    cls = getattr(codegen, "CPUCodeLibrary", None)
    if cls is None or getattr(cls, "_meldlite_lazy", False):
        return
    if not all(hasattr(cls, a) for a in ("_unserialize", "_get_module_for_linking")):
        return
    unserialize, for_linking = cls._unserialize.__func__, cls._get_module_for_linking

    def _unserialize(klass, cg, state):
        library = unserialize(klass, cg, state)
        _, kind, data = state
        if kind == "object" and getattr(library, "_shared_module", None) is not None:
            library._meldlite_bitcode = data[1]
            library._shared_module = None  # frees the parsed module
        return library

    def _get_module_for_linking(self):
        bitcode = getattr(self, "_meldlite_bitcode", None)
        if self._shared_module is None and bitcode is not None:
            self._shared_module = ll.parse_bitcode(bitcode)
        return for_linking(self)

    cls._unserialize = classmethod(_unserialize)
    cls._get_module_for_linking = _get_module_for_linking
    cls._meldlite_lazy = True


def _scipy_blas_installed() -> None:
    """Raise ImportError unless scipy.linalg.cython_blas is installed (imports nothing)."""
    spec = importlib.util.find_spec("scipy")
    for folder in (spec and spec.submodule_search_locations) or ():
        if any((pathlib.Path(folder) / "linalg").glob("cython_blas.*")):
            return
    raise ImportError("scipy.linalg.cython_blas is not installed")


@contextlib.contextmanager
def light_blas_probe():
    """Within: importing numba.np.arraymath probes BLAS without importing scipy.linalg."""
    if "numba.np.arraymath" in sys.modules:
        yield
        return
    from numba.np import linalg

    ensure_blas = getattr(linalg, "ensure_blas", None)
    if ensure_blas is None:
        yield
        return
    linalg.ensure_blas = _scipy_blas_installed
    try:
        yield
    finally:
        linalg.ensure_blas = ensure_blas


def install() -> None:
    """The lazy linking modules and Numba's BLAS probe (before Numba's target is set up)."""
    lazy_linking_modules()
    with light_blas_probe():
        import numba.np.arraymath  # noqa: F401  (the probe runs at its import)


def prepare_target() -> None:
    """Set up Numba's CPU target now (its registries and runtime: a small compilation),
    dropping the compiler's pages before and after, so that the import's pages and the
    setup's are not resident together."""
    from numba.core.registry import cpu_target

    install()
    release_compiler_pages()
    cpu_target.target_context.refresh()
    release_compiler_pages()


@functools.cache
def _clean_readonly_mappings(name):
    """(start, end) of this process's mappings of files named like `name` that are not
    writable and hold no private dirty page (the relocated ones are left alone). Read
    once: a loaded library's mappings and their protection do not change."""
    out, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split(None, 5)
                current = None
                if len(fields) > 5 and name in fields[5] and "w" not in fields[1]:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    current = [start, end, 0]
                    out.append(current)
            elif current is not None and line.startswith("Private_Dirty:"):
                current[2] = int(line.split()[1])
    return tuple((start, end) for start, end, dirty in out if dirty == 0)


def release_compiler_pages() -> int:
    """Unmap the resident pages of LLVM's clean read-only mappings; returns the bytes
    the mappings span (0 where /proc or madvise are missing)."""
    try:
        ranges = _clean_readonly_mappings(_LLVM_LIBRARY)
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return sum(
        end - start for start, end in ranges if madvise(start, end - start, MADV_DONTNEED) == 0
    )


def trim_heap() -> None:
    """Return the C heap's free pages to the system (glibc's malloc_trim; elsewhere nothing),
    e.g. those of the linking modules parsed and freed while kernels loaded."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
