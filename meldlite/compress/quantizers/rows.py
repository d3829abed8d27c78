"""quantize_rows: float32 rows -> ggml blocks, meldlite's own quantizers (Numba).

Public API:
- `quantize_rows(x, qtype, importance=None)`: x (..., cols) float -> (..., row_bytes) uint8,
  the bytes laid out exactly as ggml stores them (gguf-py's `dequantize` reads them).
  `importance` (cols,) >= 0 weights each column's squared error (llama.cpp's imatrix).
- `QUANTIZABLE`: the `GGMLQuantizationType`s `quantize_rows` writes.
- `importance_from_activations(X)`: X (n_samples, cols) calibration activations ->
  (cols,) mean of squares, as llama.cpp's imatrix collects it.

Algorithms: legacy.py (Q8_0, Q4_0, Q5_0, Q4_1, Q5_1) and kquants.py (K-quants), built
from search.py; NumPy references in reference.py. F32, F16 and BF16 are plain conversions (importance
is ignored), rounding as ggml does (nearest even; BF16 as `ggml_fp32_to_bf16_row_ref`).
"""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from meldlite.compress.quantizers import kquants as kq
from meldlite.compress.quantizers import legacy
from meldlite.errors import OptionError, UnsupportedError

T = GGMLQuantizationType

_KERNELS = {
    T.Q8_0: legacy.quantize_q8_0,
    T.Q4_0: legacy.quantize_q4_0,
    T.Q5_0: legacy.quantize_q5_0,
    T.Q4_1: legacy.quantize_q4_1,
    T.Q5_1: legacy.quantize_q5_1,
    **kq.KERNELS,
}
_FLOATS = (T.F32, T.F16, T.BF16)
QUANTIZABLE = frozenset(_FLOATS) | frozenset(_KERNELS)

# Largest |value| a block can hold: the f16 maximum times the largest level times the
# largest integer sub-block scale (K-quants); for Q4_1/Q5_1 the f16 maximum (m = min x).
# Beyond it the f16 scales overflow to inf.
_F16_MAX = float(np.finfo(np.float16).max)
_MAX_ABS = {
    T.Q8_0: 127,
    T.Q4_0: 8,
    T.Q5_0: 16,
    T.Q4_1: 1,
    T.Q5_1: 1,
    T.Q2_K: 3 * 15,
    T.Q3_K: 4 * 32,
    T.Q4_K: 15 * 63,
    T.Q5_K: 31 * 63,
    T.Q6_K: 32 * 128,
}


def as_qtype(qtype) -> GGMLQuantizationType:
    """A GGMLQuantizationType from the type, its id or its name; UnsupportedError if
    `quantize_rows` cannot write it."""
    try:
        t = T[qtype.upper()] if isinstance(qtype, str) else T(int(qtype))
    except (KeyError, ValueError, TypeError):
        raise UnsupportedError(f"unknown ggml type {qtype!r}") from None
    if t not in QUANTIZABLE:
        names = ", ".join(sorted(q.name for q in QUANTIZABLE))
        raise UnsupportedError(f"meldlite cannot quantize to {t.name} (it writes {names})")
    return t


def _check_values(x) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f" or x.dtype.itemsize > 8:
        raise OptionError(f"x must be a float array, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim == 0:
        raise OptionError("x must have at least one dimension (the columns)")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise OptionError(f"x has a non-finite value ({x[where]}) at index {where}")
    return x


def _check_importance(importance, n_cols) -> np.ndarray:
    imp = np.asarray(importance)
    if imp.dtype.kind not in "fiu" or imp.shape != (n_cols,):
        raise OptionError(
            f"importance must be {n_cols} real numbers (one per column), "
            f"got shape {imp.shape} of {imp.dtype}"
        )
    imp = np.ascontiguousarray(imp, dtype=np.float32)  # (n_cols,)
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise OptionError("importance must be finite and >= 0")
    return imp


def _floats(x, qtype) -> np.ndarray:
    """F32/F16/BF16 bytes of x (n_rows, n_cols)."""
    if qtype == T.F32:
        return x.view(np.uint8)
    if qtype == T.F16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16).view(np.uint8)
    u = x.view(np.uint32).astype(np.uint64)  # (n_rows, n_cols), finite values only
    bf = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    return bf.view(np.uint8)


def quantize_rows(x, qtype, importance=None) -> np.ndarray:
    """Quantize x (..., n_cols) to `qtype` -> (..., row_bytes) uint8 in ggml's layout.

    n_cols must be a multiple of the type's block size; `importance` (n_cols,) >= 0 makes
    the quantizer minimise sum(importance * err^2) per row instead of the plain squared
    error. Raises OptionError on bad input, UnsupportedError on a type it cannot write."""
    qtype = as_qtype(qtype)
    x = _check_values(x)
    n_cols = x.shape[-1]
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    if n_cols % elems or n_cols == 0:
        raise OptionError(
            f"{n_cols} columns is not a positive multiple of the {qtype.name} block size {elems}"
        )
    imp = None if importance is None else _check_importance(importance, n_cols)
    limit = _F16_MAX * _MAX_ABS.get(qtype, np.inf)
    if x.size and float(np.abs(x).max()) > limit:
        raise OptionError(
            f"x has values up to {float(np.abs(x).max()):g}, beyond the "
            f"{limit:g} that {qtype.name} blocks (f16 scales) can hold"
        )
    rows = x.reshape(-1, n_cols)  # (n_rows, n_cols)
    if qtype in _FLOATS:
        out = _floats(rows, qtype)  # (n_rows, row_bytes)
    else:
        out = np.empty(
            (rows.shape[0], n_cols // elems * nbytes), dtype=np.uint8
        )  # (n_rows, row_bytes)
        w = imp if imp is not None else np.ones(n_cols, dtype=np.float32)  # (n_cols,)
        _KERNELS[qtype](rows, w, imp is not None, out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def importance_from_activations(X) -> np.ndarray:
    """X (n_samples, n_cols) activations entering a weight -> (n_cols,) float32 importance:
    the mean of squares over the samples, as llama.cpp's imatrix accumulates it."""
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.dtype.kind != "f":
        raise OptionError(
            f"activations must be a non-empty (n_samples, n_cols) float array, "
            f"got shape {X.shape} of {X.dtype}"
        )
    X = X.astype(np.float64)  # (n_samples, n_cols)
    if not np.isfinite(X).all():
        raise OptionError("activations have a non-finite value")
    return np.mean(X * X, axis=0).astype(np.float32)  # (n_cols,)
