"""llama.cpp's own quantizer, called per tensor through ctypes (the reference for meldlite's).

llama-cpp-python ships libggml-base.so, which exports
`ggml_quantize_chunk(type, src, dst, start, nrows, n_per_row, imatrix) -> size_t`.
`ggml_quantize` returns the bytes it writes as (rows, row_bytes) uint8, laid out as in a
GGUF file, so gguf-py's `dequantize` reads them. Tests skip when llama_cpp is absent.
"""

import ctypes
import os

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_LIB = None


def libggml():
    """The ctypes handle of llama-cpp-python's libggml-base.so (skips the test without it)."""
    global _LIB
    if _LIB is None:
        llama_cpp = pytest.importorskip("llama_cpp")
        path = os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so")
        if not os.path.exists(path):
            pytest.skip(f"{path} is not here")
        lib = ctypes.CDLL(path)
        lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        lib.ggml_quantize_chunk.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_int64,
            ctypes.c_void_p,
        ]
        lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
        lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
        lib.ggml_quantize_init.restype = None
        lib.ggml_quantize_init.argtypes = [ctypes.c_int]
        _LIB = lib
    return _LIB


def ggml_quantize(x, qtype, importance=None) -> np.ndarray:
    """llama.cpp's quantization of x (rows, cols) float32 -> (rows, row_bytes) uint8.

    `importance` (cols,) is passed as the imatrix (per-column weights), or NULL when None."""
    lib = libggml()
    qtype = GGMLQuantizationType(int(qtype))
    x = np.ascontiguousarray(x, dtype=np.float32)  # (rows, cols)
    rows, cols = x.shape
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    assert cols % elems == 0, (cols, elems)
    out = np.zeros((rows, cols // elems * nbytes), dtype=np.uint8)  # (rows, row_bytes)
    imp = (
        None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    )  # (cols,)
    if imp is None and lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"llama.cpp needs an importance matrix for {qtype.name}")
    lib.ggml_quantize_init(int(qtype))
    written = lib.ggml_quantize_chunk(
        int(qtype),
        x.ctypes.data,
        out.ctypes.data,
        0,
        rows,
        cols,
        None if imp is None else imp.ctypes.data,
    )
    assert written == out.size, (written, out.size)
    return out
