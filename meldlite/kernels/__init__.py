"""Numba CPU kernels: ggml block decoding, quantized matmul, the MoE expert step.

Public API:
- `dequantize(raw, ggml_type)`: (..., row_bytes) uint8 -> (..., n_cols) float32,
  bit-identical to `gguf.quants.dequantize`.
- `matmul(raw, ggml_type, x, out=None)`: W x from the blocks, x (n_cols,) or (n_tok, n_cols).
- `moe_ffn(x, ids, weights, mats, types, out=None, act="silu", bias=None)`: one layer's
  routed experts (activation kinds and expert biases: see moe.py).
- `expert_list`, `set_expert` (mats.py: built by cached kernels, so no process compiles
  `numba.typed.List`'s methods), `placeholder`, `check_types`: helpers for `mats`.
- `release_compiler_pages()`, `prepare_target()`, `trim_heap()`: see _memory.py (fixed memory).
- `SUPPORTED_TYPES`, `check_type`: the ggml types the kernels decode.
- `sum_slots(ids, weights, ys, row_of, out=None)`: the slot-order sum of expert outputs
  that every MoE path ends with (one token's experts added in slot order from 0.0).
- `set_threads`, `check_threads`: the parallel loops' thread count.

- `qmatmul(raw, ggml_type, x, out=None)`: W x with x rounded as llama.cpp rounds it, by
  integer dot products against 8-bit activations (qdot.py) where the type has them.

All kernels are compiled with Numba's on-disk cache; NumPy references are in `reference`.

Threads: OpenMP workers spin for a bounded time (about 0.5-1 ms, GOMP_SPINCOUNT=30000)
before they sleep, unless the environment sets OMP_WAIT_POLICY or GOMP_SPINCOUNT itself
(see threads.py: a token's ~50 parallel loops each cost 60-90 us to wake a sleeping
worker, 2-9 us to start a spinning one). On a machine shared with other busy processes,
OMP_WAIT_POLICY=passive is the better choice.
"""

from meldlite.kernels._memory import install, prepare_target, release_compiler_pages, trim_heap
from meldlite.kernels.dequant import dequantize
from meldlite.kernels.matmul import matmul
from meldlite.kernels.mats import expert_list, placeholder, set_expert
from meldlite.kernels.moe import check_types, moe_ffn
from meldlite.kernels.qdot import qmatmul
from meldlite.kernels.qtypes import SUPPORTED_TYPES, check_type
from meldlite.kernels.slots import sum_slots
from meldlite.kernels.threads import bounded_spin, check_threads, set_threads

install()  # before any kernel runs: see _memory.py
bounded_spin()  # before libgomp loads (the first parallel loop): it reads its environment once

__all__ = [
    "SUPPORTED_TYPES",
    "check_threads",
    "check_type",
    "check_types",
    "dequantize",
    "expert_list",
    "matmul",
    "moe_ffn",
    "placeholder",
    "prepare_target",
    "qmatmul",
    "release_compiler_pages",
    "set_expert",
    "set_threads",
    "sum_slots",
    "trim_heap",
]
