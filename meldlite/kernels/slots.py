"""The slot-order sum of expert outputs: the one place that fixes how a token's routed
experts are added.

    out[t] = sum over slots j = 0..k-1 with ids[t, j] >= 0, in slot order, starting
             from 0.0, of weights[t, j] * ys[row_of[t, j]]     (float32 throughout)

The MoE kernels, the expert cache and the coordinator of remote peers all end with this
sum. Because the order of the float additions is fixed by the slots alone (not by which
node or which batch computed a row of `ys`), a layer gives the same bits on one node or
many, under any memory budget. `sum_slots_ref` in `reference` is the NumPy statement of
the same sum.
"""

import numpy as np
from numba import njit, prange

from meldlite.errors import OptionError
from meldlite.kernels._cache import track_sources

PARALLEL_MIN = 1 << 15  # output values below which one thread is faster


@njit(inline="always")
def _sum_token(ids, weights, ys, row_of, out, t):
    out[t, :] = 0.0
    for j in range(ids.shape[1]):
        if ids[t, j] >= 0:
            w = weights[t, j]
            y = ys[row_of[t, j]]
            for c in range(out.shape[1]):
                out[t, c] += w * y[c]


@njit(cache=True, nogil=True, error_model="numpy")
def sum_slots_serial(ids, weights, ys, row_of, out):
    """The slot-order sum on the calling thread. ids (T, k), weights (T, k), ys (P, E),
    row_of (T, k) row of ys holding pair (t, j), out (T, E)."""
    for t in range(ids.shape[0]):
        _sum_token(ids, weights, ys, row_of, out, t)


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def sum_slots_parallel(ids, weights, ys, row_of, out):
    """sum_slots_serial with the tokens spread over threads (the same bits)."""
    for t in prange(ids.shape[0]):
        _sum_token(ids, weights, ys, row_of, out, t)


track_sources(sum_slots_serial, sum_slots_parallel)


def sum_slots(ids, weights, ys, row_of, out=None) -> np.ndarray:
    """out (T, E) float32 = the slot-order sum (module docstring) of ys (P, E) float32.

    ids (T, k) expert per slot (< 0: skipped), weights (T, k) float32, row_of (T, k)
    integer: the row of ys holding pair (t, j)'s output (read only where ids[t, j] >= 0)."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    weights = np.asarray(weights)
    ys = np.asarray(ys)
    row_of = np.ascontiguousarray(row_of, dtype=np.int64)
    if ids.ndim != 2 or weights.shape != ids.shape or row_of.shape != ids.shape:
        raise OptionError(
            f"ids, weights and row_of must share one (T, k) shape, got "
            f"{ids.shape}, {weights.shape}, {row_of.shape}"
        )
    if weights.dtype != np.float32 or ys.dtype != np.float32 or ys.ndim != 2:
        raise OptionError(
            f"weights (T, k) and ys (P, E) must be float32, got {weights.dtype} {weights.shape}, "
            f"{ys.dtype} {ys.shape}"
        )
    valid = ids >= 0
    if valid.any() and (row_of[valid].min() < 0 or row_of[valid].max() >= ys.shape[0]):
        raise OptionError(f"row_of points outside the {ys.shape[0]} rows of ys")
    shape = (ids.shape[0], ys.shape[1])
    if out is None:
        out = np.empty(shape, np.float32)
    elif out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise OptionError(f"out must be a C-contiguous float32 array of shape {shape}")
    args = (ids, np.ascontiguousarray(weights), np.ascontiguousarray(ys), row_of, out)
    if out.size >= PARALLEL_MIN:
        sum_slots_parallel(*args)
    else:
        sum_slots_serial(*args)
    return out
