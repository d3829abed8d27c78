"""Make Numba's on-disk cache notice edits to any kernel source file.

Numba keys a cached function on the modification time and size of the file that defines
it only; edits to the decoders it inlines from another file (blocks.py, bits.py) would
load stale machine code. `track_sources` adds a digest of the files of this package it
may depend on (and the gguf-py version, whose tables are frozen into the code) to that key.
The runtime kernels never import the quantizers (`quantize*.py`), so their digest leaves
those files out: editing a quantizer does not send every forward kernel to the compiler.
It uses Numba internals; if they change it does nothing and caching works as before.
"""

import functools
import hashlib
import pathlib

import gguf
import numba

QUANTIZERS = "quantize"  # file-name prefix of the quantizer modules


@functools.lru_cache(maxsize=2)
def sources_digest(with_quantizers: bool = False) -> str:
    """Digest of the kernel sources: every file, or all but the quantizers."""
    h = hashlib.sha256(f"gguf {getattr(gguf, '__version__', '?')}\n".encode())
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        if with_quantizers or not path.name.startswith(QUANTIZERS):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def track_sources(*dispatchers) -> None:
    """Extend each cached dispatcher's source stamp with the package digest."""
    for dispatcher in dispatchers:
        cache_file = getattr(getattr(dispatcher, "_cache", None), "_cache_file", None)
        stamp = getattr(cache_file, "_source_stamp", None)
        if stamp is None:
            continue
        module = getattr(dispatcher.py_func, "__module__", "") or ""
        quantizer = module.rsplit(".", 1)[-1].startswith(QUANTIZERS)
        cache_file._source_stamp = (stamp, numba.__version__, sources_digest(quantizer))
