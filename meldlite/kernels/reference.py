"""Plain NumPy references for the jitted kernels (tests compare against these).

dequantize_ref is gguf-py itself; matmul_ref and moe_ffn_ref dequantize with it and do
the arithmetic in float64, so they share no code with the kernels.
"""

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants


def dequantize_ref(raw, ggml_type) -> np.ndarray:
    """gguf-py's dequantize (..., row_bytes) -> (..., n_cols) float32 (a copy)."""
    qtype = GGMLQuantizationType(int(ggml_type))
    raw = np.asarray(raw)
    if qtype == GGMLQuantizationType.F32 and raw.dtype == np.float32:
        return raw.copy()
    if qtype == GGMLQuantizationType.F16 and raw.dtype == np.float16:
        return raw.astype(np.float32)
    return np.array(gguf_quants.dequantize(raw, qtype), dtype=np.float32)


def matmul_ref(raw, ggml_type, x) -> np.ndarray:
    """float64 W x with W dequantized by gguf-py; x (n_cols,) or (n_tok, n_cols)."""
    w = dequantize_ref(raw, ggml_type).astype(np.float64)  # (n_rows, n_cols)
    return np.asarray(x, dtype=np.float64) @ w.T  # (n_rows,) or (n_tok, n_rows)


def silu_ref(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def moe_ffn_ref(x, ids, weights, mats, types) -> np.ndarray:
    """float64 routed-expert output (n_tok, n_embd), slots added in order."""
    x = np.asarray(x, dtype=np.float64)  # (n_tok, n_embd)
    out = np.zeros_like(x)  # (n_tok, n_embd)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gate, up, down = (np.asarray(mats[3 * e + m]) for m in range(3))
            g = matmul_ref(gate, types[e][0], x[t])  # (n_ff,)
            u = matmul_ref(up, types[e][1], x[t])  # (n_ff,)
            y = matmul_ref(down, types[e][2], silu_ref(g) * u)  # (n_embd,)
            out[t] += float(weights[t, j]) * y
    return out
