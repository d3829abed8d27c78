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


def sum_slots_ref(ids, weights, ys, row_of) -> np.ndarray:
    """out[t] = sum over slots j in order, from 0.0, of weights[t, j] * ys[row_of[t, j]]
    for ids[t, j] >= 0, in float32: one NumPy step per slot for all tokens at once."""
    ids = np.asarray(ids)
    out = np.zeros((ids.shape[0], ys.shape[1]), np.float32)  # (T, E)
    for j in range(ids.shape[1]):
        ok = ids[:, j] >= 0  # (T,)
        out[ok] += weights[ok, j][:, None] * ys[row_of[ok, j]]
    return out


def _with_f16_fields(blocks, values):
    """A copy of (n, block_bytes) blocks with the float16 fields {offset: value} replaced."""
    out = np.array(blocks, dtype=np.uint8)
    for off, value in values.items():
        out[:, off : off + 2] = (
            np.full(out.shape[0], value, np.float16).view(np.uint8).reshape(-1, 2)
        )
    return out


def q4k_sums_ref(blocks, qa, bs):
    """(isum, msum) int64 (n,) of Q4_K super-blocks (n, 144) against Q8_K codes qa (n, 256)
    and per-32 code sums bs (n, 8): isum = sum_j sc_j * (q_j . qa_j), msum = sum_j m_j bs_j.
    From gguf-py's dequantization with d=1, dmin=0 (values sc*q) and d=0, dmin=1 (-m)."""
    qt = GGMLQuantizationType.Q4_K
    scq = dequantize_ref(_with_f16_fields(blocks, {0: 1.0, 2: 0.0}), qt).astype(
        np.int64
    )  # (n, 256)
    mins = -dequantize_ref(_with_f16_fields(blocks, {0: 0.0, 2: 1.0}), qt)[:, ::32].astype(np.int64)
    return (scq * qa).sum(1), (mins * bs).sum(1)


_T = GGMLQuantizationType
# byte offsets of the f16 scale fields of each block (d, dmin / m), in the field order of
# llama.cpp's block structs (ggml/src/ggml-common.h): Q2_K, Q3_K and Q6_K store d (and
# Q2_K dmin) after their quants and sub-block scales, the others first
F16_FIELDS = {
    _T.Q4_0: (0,),
    _T.Q4_1: (0, 2),
    _T.Q5_0: (0,),
    _T.Q5_1: (0, 2),
    _T.Q8_0: (0,),
    _T.Q2_K: (80, 82),
    _T.Q3_K: (108,),
    _T.Q4_K: (0, 2),
    _T.Q5_K: (0, 2),
    _T.Q6_K: (208,),
    _T.IQ4_NL: (0,),
    _T.IQ4_XS: (0,),
}


def int_sums_ref(blocks, qtype, qa):
    """(isum, msum) int64 (n,) of n blocks (n, block_bytes) of `qtype` against int8 codes qa
    (n, block_values): isum = sum of (the block's integer weights with d = 1) * qa, msum =
    sum of (the integer mins per value with dmin = 1) * qa (0 without a min field). From
    gguf-py's dequantization with d=1, dmin=0 (values sc*q) and d=0, dmin=1 (-m)."""
    qtype = GGMLQuantizationType(int(qtype))
    fields = F16_FIELDS.get(qtype, ())
    if qtype == GGMLQuantizationType.MXFP4:  # E8M0 byte 0 halved: 2^(128-128) = 1
        blocks = np.array(blocks, dtype=np.uint8)
        blocks[:, 0] = 128
    w = dequantize_ref(_with_f16_fields(blocks, dict(zip(fields, (1.0, 0.0)))), qtype)
    isum = (w.astype(np.int64) * qa).sum(1)
    if len(fields) < 2:
        return isum, np.zeros_like(isum)
    mins = -dequantize_ref(_with_f16_fields(blocks, dict(zip(fields, (0.0, 1.0)))), qtype)
    return isum, (mins.astype(np.int64) * qa).sum(1)


def q6k_sum_ref(blocks, qa):
    """isum int64 (n,) of Q6_K super-blocks (n, 210) . Q8_K codes qa (n, 256):
    sum_i sc_i * ((q_i - 32) . qa_i), from gguf-py's dequantization with d=1."""
    w = dequantize_ref(_with_f16_fields(blocks, {208: 1.0}), GGMLQuantizationType.Q6_K)
    return (w.astype(np.int64) * qa).sum(1)


def silu_ref(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def act_ref(g, u, act="silu"):
    """The gated activation of the experts: silu(g) u, relu(g) u, or gpt-oss's clamped
    SwiGLU min(g, 7) sigmoid(1.702 min(g, 7)) (clamp(u, -7, 7) + 1)."""
    if act == "silu":
        return silu_ref(g) * u
    if act == "relu":
        return np.maximum(g, 0.0) * u
    alpha, limit = 1.702, 7.0
    x = np.minimum(g, limit)
    return x / (1.0 + np.exp(-alpha * x)) * (np.clip(u, -limit, limit) + 1.0)


def moe_ffn_ref(x, ids, weights, mats, types, act="silu", bias=None) -> np.ndarray:
    """float64 routed-expert output (n_tok, n_embd), slots added in order; bias None or
    (n_expert, 2 n_ff + n_embd) = [gate | up | down] biases added after each matmul."""
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
            n_ff = g.shape[0]
            b = np.zeros(2 * n_ff + x.shape[1]) if bias is None else np.asarray(bias[e], np.float64)
            y = matmul_ref(down, types[e][2], act_ref(g + b[:n_ff], u + b[n_ff : 2 * n_ff], act))
            out[t] += float(weights[t, j]) * (y + b[2 * n_ff :])  # (n_embd,)
    return out
