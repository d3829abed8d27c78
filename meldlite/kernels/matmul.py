"""matmul: y = W x straight from ggml blocks (mat-vec for one token, mat-mat for a batch).

The weight matrix is processed in tiles of ROWS rows (one tile per prange iteration).
For each run of COLS columns the tile's blocks are decoded once into a small transposed
buffer, then every token accumulates from it. Each output (token, row) is one serial
float32 sum over the columns in order, `acc += w[i] * x[i]`, so it does not depend on the
thread count, the tile size or which other tokens are in the batch; the ROWS rows of a
tile sit in SIMD lanes side by side.
"""

import numpy as np
from numba import njit, prange

from meldlite.errors import OptionError
from meldlite.kernels._cache import track_sources
from meldlite.kernels.decode import decode_span
from meldlite.kernels.dequant import as_raw_bytes
from meldlite.kernels.qtypes import BLOCK_ELEMS, check_type, row_cols

ROWS = 64  # rows per tile = float32 lanes of the accumulation
COLS = 256  # columns decoded per step (half for types with blocks of <= 32): a multiple of every block size


@njit
def _accumulate(wbuf, x, acc, cn):
    """acc[r] += sum over i < cn of wbuf[i, r] * x[i], serially in i."""
    for i in range(cn):  # wbuf (COLS, ROWS), x (>= cn,), acc (ROWS,)
        xi = x[i]
        w = wbuf[i]
        for r in range(ROWS):
            acc[r] += w[r] * xi


@njit
def _tile(raw, t, x, out, r0, wbuf, acc):
    """out[:, r0:r0+nr] for one tile of rows; False if `t` is unknown."""
    n_tok, n_cols = x.shape
    nr = min(ROWS, raw.shape[0] - r0)
    if t < 0 or t >= BLOCK_ELEMS.shape[0]:
        return False
    acc[:] = 0.0
    step = COLS if BLOCK_ELEMS[t] == COLS else COLS // 2  # keep the tile in L1 when blocks allow
    for c0 in range(0, n_cols, step):
        cn = min(step, n_cols - c0)
        for r in range(nr):
            if not decode_span(t, raw[r0 + r], c0, cn, wbuf[:, r]):
                return False
        for k in range(n_tok):
            _accumulate(wbuf, x[k, c0:], acc[k], cn)
    for k in range(n_tok):
        out[k, r0 : r0 + nr] = acc[k, :nr]
    return True


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def matmat_rows(raw, t, x, out):
    """raw (n_rows, row_bytes) uint8 of type t, x (n_tok, n_cols) f32 -> out (n_tok, n_rows).

    Returns False if `t` is unknown (then `out` is garbage)."""
    n_tiles = (raw.shape[0] + ROWS - 1) // ROWS
    ok = np.ones(n_tiles, dtype=np.bool_)  # (n_tiles,)
    for tile in prange(n_tiles):
        wbuf = np.zeros((COLS, ROWS), dtype=np.float32)  # (COLS, ROWS) decoded weights, transposed
        acc = np.empty((x.shape[0], ROWS), dtype=np.float32)  # (n_tok, ROWS)
        ok[tile] = _tile(raw, t, x, out, tile * ROWS, wbuf, acc)
    return n_tiles == 0 or ok.all()


def readonly_matrix(raw, qtype):
    """`raw` as a read-only 2-D C-contiguous uint8 view (one jitted signature for all callers)."""
    raw = as_raw_bytes(raw, qtype)
    if raw.ndim != 2:
        raise OptionError(f"weight matrix must be 2-D (n_rows, row_bytes), got shape {raw.shape}")
    if not raw.flags.c_contiguous:
        raise OptionError("weight matrix must be C-contiguous")
    view = raw.view()
    view.flags.writeable = False
    return view


def writable_rows(x, n_cols):
    """`x` as a writeable C-contiguous (n_tok, n_cols) float32 array (a copy only if needed)."""
    x2 = x.reshape(-1, n_cols)
    if not (x2.flags.c_contiguous and x2.flags.writeable):
        x2 = x2.copy()
    return x2


def _check_out(out, shape):
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != shape:
        raise OptionError(f"out must be a float32 array of shape {shape}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise OptionError("out must be C-contiguous and writeable")
    return out


def operands(raw, ggml_type, x, out):
    """Checked arguments of a matmul: (qtype, raw (n_rows, row_bytes) read-only,
    x (n_tok, n_cols) writeable, out as given or new, out (n_tok, n_rows) view of it)."""
    qtype = check_type(ggml_type)
    raw = readonly_matrix(raw, qtype)
    n_rows, n_cols = raw.shape[0], row_cols(qtype, raw.shape[1])
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim not in (1, 2) or x.shape[-1] != n_cols:
        raise OptionError(
            f"x must be float32 (n_cols,) or (n_tok, n_cols) with n_cols={n_cols}, "
            f"got {x.dtype} {x.shape}"
        )
    shape = (*x.shape[:-1], n_rows)
    out = np.empty(shape, dtype=np.float32) if out is None else _check_out(out, shape)
    return qtype, raw, writable_rows(x, n_cols), out, out.reshape(-1, n_rows)


def matmul(raw, ggml_type, x, out=None) -> np.ndarray:
    """W x for W = `raw` (n_rows, row_bytes) of `ggml_type` and x (n_cols,) or (n_tok, n_cols).

    Returns float32 (n_rows,) or (n_tok, n_rows), written into `out` if given."""
    qtype, raw, x2, out, out2 = operands(raw, ggml_type, x, out)
    if not matmat_rows(raw, int(qtype), x2, out2):
        raise AssertionError(
            f"jitted kernel rejected {qtype.name}"
        )  # check_type lets only known types in
    return out


track_sources(matmat_rows)
