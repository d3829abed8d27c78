"""The typed List of expert matrices that `moe_ffn` takes, built and updated by cached code.

`numba.typed.List`'s own methods (`empty_list`, `append`, `__setitem__`) are jitted
without Numba's on-disk cache, so every process that builds a List from Python compiles
them: 0.3 s (0.4 s more for `__setitem__` and `len`) and the compiler's working set
(50 MiB of LLVM pages, 8 MiB of heap; docs/speed.md "Fixed memory"). The functions here
do the same inside `cache=True` kernels, which later processes load instead of compiling.

- `expert_list(arrays)`: the List of [gate_0, up_0, down_0, gate_1, ...] (None: not loaded).
- `set_expert(mats, e, gate, up, down)`: replace expert e's three matrices.
- `placeholder()`: the (0, 0) matrix of an expert that is not loaded.
"""

import numpy as np
from numba import njit
from numba import types as nbtypes
from numba.typed import List

from meldlite.errors import OptionError
from meldlite.kernels._cache import track_sources

KINDS = ("gate", "up", "down")
MATRIX_TYPE = nbtypes.Array(nbtypes.uint8, 2, "C", readonly=True)  # each entry of `mats`


def placeholder() -> np.ndarray:
    """A (0, 0) read-only uint8 array for experts that are not loaded."""
    arr = np.zeros((0, 0), dtype=np.uint8)
    arr.flags.writeable = False
    return arr


def _as_matrix(arr, what) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 2 or not arr.flags.c_contiguous:
        raise OptionError(
            f"{what} must be a 2-D C-contiguous uint8 array, got {arr.dtype} {arr.shape}"
        )
    view = arr.view()
    view.flags.writeable = False
    return view


@njit(cache=True, nogil=True)
def _filled_list(n, fill):  # pragma: no cover - jitted
    mats = List.empty_list(MATRIX_TYPE)
    for _ in range(n):
        mats.append(fill)
    return mats


@njit(cache=True, nogil=True)
def _set_matrix(mats, i, mat):  # pragma: no cover - jitted
    mats[i] = mat


track_sources(_filled_list, _set_matrix)


def expert_list(arrays) -> List:
    """typed List for `moe_ffn` from a flat sequence [gate_0, up_0, down_0, gate_1, ...] of
    2-D C-contiguous uint8 arrays (None for a matrix that is not loaded). No copies."""
    arrays = list(arrays)
    mats = _filled_list(len(arrays), placeholder())
    for i, arr in enumerate(arrays):
        if arr is not None:
            _set_matrix(mats, i, _as_matrix(arr, f"expert {i // 3} {KINDS[i % 3]} matrix"))
    return mats


def set_expert(mats: List, e: int, gate=None, up=None, down=None) -> None:
    """Replace expert e's three matrices (None = placeholder, e.g. when it leaves a cache)."""
    for m, arr in enumerate((gate, up, down)):
        mat = placeholder() if arr is None else _as_matrix(arr, f"expert {e}")
        _set_matrix(mats, 3 * e + m, mat)
