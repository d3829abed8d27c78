"""dequantize: raw ggml rows -> float32, bit-identical to `gguf.quants.dequantize`."""

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from meldlite.errors import OptionError
from meldlite.kernels._cache import track_sources
from meldlite.kernels.decode import decode_span
from meldlite.kernels.qtypes import check_type, row_cols

_TYPED_DTYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def dequantize_rows(raw, t, out):
    """raw (n_rows, row_bytes) uint8 of type t -> out (n_rows, n_cols) float32.

    Returns False if `t` is unknown (then `out` is untouched)."""
    n_rows, n_cols = out.shape
    ok = np.ones(n_rows, dtype=np.bool_)  # (n_rows,)
    for r in prange(n_rows):
        ok[r] = decode_span(t, raw[r], 0, n_cols, out[r])
    return n_rows == 0 or ok.all()


def as_raw_bytes(raw, qtype: GGMLQuantizationType) -> np.ndarray:
    """View `raw` as uint8 rows: uint8 as is, or gguf-py's typed F32/F16 arrays."""
    raw = np.asarray(raw)
    if raw.dtype == np.uint8:
        return raw
    if _TYPED_DTYPES.get(qtype) == raw.dtype:
        if raw.ndim == 0:
            raw = raw.reshape(1)
        return np.ascontiguousarray(raw).view(np.uint8)
    raise OptionError(
        f"raw data of type {qtype.name} must be uint8 bytes"
        + (f" or {np.dtype(_TYPED_DTYPES[qtype]).name}" if qtype in _TYPED_DTYPES else "")
        + f", got {raw.dtype}"
    )


def dequantize(raw, ggml_type) -> np.ndarray:
    """Decode `raw` (..., row_bytes) uint8 of `ggml_type` -> (..., n_cols) float32."""
    qtype = check_type(ggml_type)
    raw = as_raw_bytes(raw, qtype)
    if raw.ndim == 0:
        raise OptionError("raw data must have at least one dimension (the row bytes)")
    n_cols = row_cols(qtype, raw.shape[-1])
    rows = np.ascontiguousarray(raw).reshape(-1, raw.shape[-1])  # (n_rows, row_bytes)
    rows = rows.view()
    rows.flags.writeable = False  # one jitted signature for memmaps and in-memory arrays
    out = np.empty((rows.shape[0], n_cols), dtype=np.float32)  # (n_rows, n_cols)
    if not dequantize_rows(rows, int(qtype), out):
        raise AssertionError(
            f"jitted decoder rejected {qtype.name}"
        )  # check_type lets only known types in
    return out.reshape(*raw.shape[:-1], n_cols)


track_sources(dequantize_rows)
