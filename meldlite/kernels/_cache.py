"""Make Numba's on-disk cache notice edits to any kernel source file.

Numba keys a cached function on the modification time and size of the file that defines
it only; edits to the decoders it inlines from another file (blocks.py, bits.py) would
load stale machine code. `track_sources` adds a digest of every file of this package
(and the gguf-py version, whose tables are frozen into the code) to that key.
It uses Numba internals; if they change it does nothing and caching works as before.
"""

import functools
import hashlib
import pathlib

import gguf
import numba


@functools.lru_cache(maxsize=1)
def sources_digest() -> str:
    h = hashlib.sha256(f"gguf {getattr(gguf, '__version__', '?')}\n".encode())
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
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
        cache_file._source_stamp = (stamp, numba.__version__, sources_digest())
