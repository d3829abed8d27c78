"""meldlite's own quantizers: float32 rows -> ggml blocks (Numba), used by `compress`.

- `rows.py`: the entry point, `quantize_rows(x, qtype, importance=None)`, `QUANTIZABLE`,
  `importance_from_activations`.
- `legacy.py`: Q8_0, Q4_0, Q5_0, Q4_1, Q5_1; `kquants.py`: Q2_K ... Q6_K.
- `search.py`: f16 encoding and the per-block scale searches both build on.
- `reference.py`: plain NumPy versions of all of them (tests compare against it).

The forward pass never imports this package: the runtime kernels live in `kernels`.
"""

from meldlite.compress.quantizers.rows import (
    QUANTIZABLE,
    importance_from_activations,
    quantize_rows,
)

__all__ = ["QUANTIZABLE", "importance_from_activations", "quantize_rows"]
