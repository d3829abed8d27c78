"""Make Numba's on-disk cache notice edits to any source file a jitted function uses.

Numba keys a cached function on the modification time and size of the file that defines
it only; edits to the functions it inlines from another file (decode.py, bits.py) would
load stale machine code. `track_sources` adds to that key a digest of every file of the
package (folder) that defines the function, and the gguf-py version, whose tables are
frozen into the code. The runtime kernels (`meldlite/kernels/`) and the quantizers
(`meldlite/compress/quantizers/`) are separate packages that do not import each other's
jitted code, so editing a quantizer does not send every forward kernel to the compiler.
It uses Numba internals; if they change it does nothing and caching works as before.
"""

import functools
import hashlib
import pathlib
import sys

import gguf
import numba

KERNELS = pathlib.Path(__file__).parent  # the runtime kernels' package folder


@functools.lru_cache(maxsize=4)
def sources_digest(folder: pathlib.Path = KERNELS) -> str:
    """Digest of the .py files of one package folder (default: the kernels)."""
    h = hashlib.sha256(f"gguf {getattr(gguf, '__version__', '?')}\n".encode())
    for path in sorted(pathlib.Path(folder).glob("*.py")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def track_sources(*dispatchers) -> None:
    """Extend each cached dispatcher's source stamp with its package's digest."""
    for dispatcher in dispatchers:
        cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
        stamp = getattr(cache_file, "_source_stamp", None)
        module = sys.modules.get(getattr(dispatcher.py_func, "__module__", ""))
        if stamp is None or getattr(module, "__file__", None) is None:
            continue
        folder = pathlib.Path(module.__file__).parent
        cache_file._source_stamp = (stamp, numba.__version__, sources_digest(folder))
