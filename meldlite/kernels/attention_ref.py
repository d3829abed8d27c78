"""NumPy reference of the attention half of a layer (`kernels.attention` is checked
against it), and of the router.

Numerics follow llama.cpp's CPU path where that is cheap: RMSNorm sums squares in
float64, the KV cache holds float16, attention rounds Q and the softmax probabilities
to float16 as ggml's non-flash path does, softmax sums in float64. The RoPE tables are
the runtime's own (`mathops.rope_tables`).
Shape letters: T tokens in this batch, S positions attended (past + T),
H query heads, G KV heads, D head size, E n_embd, X experts.
"""

import math

import numpy as np

from meldlite.kernels import route_ref

F32 = np.float32
F16 = np.float16


def rms_norm(x, weight, eps):
    """Row-wise RMSNorm: x * 1/sqrt(mean(x^2) + eps) * weight."""
    sq = np.square(x, dtype=F32)  # (T, E)
    mean = (sq.sum(axis=-1, dtype=np.float64) / x.shape[-1]).astype(F32)  # (T,)
    scale = F32(1.0) / np.sqrt(mean + F32(eps))  # (T,)
    return (x * scale[..., None]) * weight  # (T, E)


def softmax(x):
    """Softmax over the last axis, summed in float64 like ggml."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # (..., N)
    return (e * (1.0 / e.sum(axis=-1, dtype=np.float64, keepdims=True))).astype(F32)


def rope(x, cos, sin, n_rot, neox):
    """Rotate the first n_rot dims of each head in place-free fashion.

    x: (T, H, D); cos/sin: (T, n_rot/2) rows for the tokens' positions.
    """
    half = n_rot // 2
    out = x.copy()  # (T, H, D)
    if neox:
        a, b = x[..., :half], x[..., half:n_rot]  # (T, H, R/2)
    else:
        a, b = x[..., 0:n_rot:2], x[..., 1:n_rot:2]  # (T, H, R/2)
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, R/2)
    ra = a * c - b * s
    rb = a * s + b * c
    if neox:
        out[..., :half], out[..., half:n_rot] = ra, rb
    else:
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = ra, rb
    return out


def attention(q, k_cache, v_cache, pos0, scale, window=0, sinks=None):
    """Causal grouped-query attention of T new tokens over S = pos0 + T positions.

    q: (T, H, D) float32; k_cache: (S, G, D) float16; v_cache: (S, G, Dv) float16;
    scale multiplies Q.K (1/sqrt(D) in most models); window > 0: position p sees only
    p - window + 1 .. p (llama.cpp's standard SWA mask); sinks (H,) (gpt-oss): per head
    a logit that joins the softmax (a column of its own) and is dropped after it.
    Returns (T, H * Dv) float32.
    """
    n_tok, n_head, d = q.shape
    n_kv, n_head_kv = k_cache.shape[0], k_cache.shape[1]
    group = n_head // n_head_kv
    qh = q.astype(F16).astype(F32).reshape(n_tok, n_head_kv, group, d)  # (T, G, H/G, D)
    k = k_cache.astype(F32)  # (S, G, D)
    v = v_cache.astype(F32)  # (S, G, Dv)
    scores = np.einsum("tgjd,sgd->gjts", qh, k, optimize=True)  # (G, H/G, T, S)
    scores *= F32(scale)
    dist = (pos0 + np.arange(n_tok))[:, None] - np.arange(n_kv)[None, :]  # (T, S)
    masked = (dist < 0) | ((dist >= window) if window > 0 else False)  # (T, S)
    scores[..., masked] = -np.inf
    if sinks is not None:
        sink = np.broadcast_to(
            np.asarray(sinks, F32).reshape(n_head_kv, group, 1, 1), (*scores.shape[:3], 1)
        )  # (G, H/G, T, 1)
        scores = np.concatenate([scores, sink], axis=-1)  # (G, H/G, T, S+1)
    probs = softmax(scores)[..., :n_kv].astype(F16).astype(F32)  # (G, H/G, T, S)
    out = np.einsum("gjts,sgd->tgjd", probs, v, optimize=True)  # (T, G, H/G, Dv)
    return np.ascontiguousarray(out.reshape(n_tok, -1), dtype=F32)  # (T, H*Dv)


def attention_segments(q, k, v, k_cache, v_cache, segs, scale, window=0, sinks=None):
    """Attention of T tokens that are segments of independent sequences: segs rows
    (seq, pos0, n), the next n tokens at positions pos0.. of sequence seq. Their keys
    k (T, G, D) and values v (T, G, Dv) are written (float16, in place) to rows pos0..
    of k_cache[seq] (C, G, D) and v_cache[seq] (C, G, Dv) of the full-size caches
    (N, C, G, D/Dv), then their queries q (T, H, D) attend over that sequence's
    positions as `attention`. Returns (T, H * Dv) float32."""
    out = []
    t0 = 0
    for seq, pos0, n in segs:
        rows = slice(t0, t0 + n)
        k_cache[seq, pos0 : pos0 + n] = k[rows]
        v_cache[seq, pos0 : pos0 + n] = v[rows]
        kc, vc = k_cache[seq, : pos0 + n], v_cache[seq, : pos0 + n]  # (S, G, D), (S, G, Dv)
        out.append(attention(q[rows], kc, vc, pos0, scale, window, sinks))  # (n, H*Dv)
        t0 += n
    return np.concatenate(out)  # (T, H*Dv)


def route(logits, k, norm_topk):
    """Top-k experts per token from router logits, as llama.cpp's build_moe_ffn with
    softmax gating (the general router's reference is `route_ref.route`).
    Returns ids (T, k) int32 and weights (T, k) float32.
    """
    return route_ref.route(logits, k, norm_topk)


def rope_tables_ref(
    n_pos,
    n_rot,
    base,
    freq_scale=1.0,
    ext_factor=0.0,
    attn_factor=1.0,
    beta_fast=32.0,
    beta_slow=1.0,
    n_ctx_orig=0,
):
    """cos/sin (n_pos, n_rot/2) one angle at a time, as ggml's rope cache: theta starts
    at the position and is multiplied by base^(-2/n_rot) per pair (float32); rope_yarn
    scales it, mixes it back by the ramp between the correction dims and multiplies
    cos/sin by the magnitude factor."""
    f = F32
    log = math.log

    def corr_dim(beta):
        return (
            f(n_rot)
            * f(log(f(n_ctx_orig) / (f(beta) * f(2) * f(math.pi))))
            / (f(2) * f(log(f(base))))
        )

    low = high = f(0)
    if ext_factor != 0.0:
        low = max(f(0), f(math.floor(corr_dim(beta_fast))))
        high = min(f(n_rot - 1), f(math.ceil(corr_dim(beta_slow))))
    theta_scale = f(base) ** f(-2.0 / n_rot)
    cos = np.empty((n_pos, n_rot // 2), F32)  # (P, R/2)
    sin = np.empty((n_pos, n_rot // 2), F32)  # (P, R/2)
    for pos in range(n_pos):
        theta = f(pos)
        for i in range(n_rot // 2):
            interp = f(freq_scale) * theta
            angle, mscale = interp, f(attn_factor)
            if ext_factor != 0.0:
                y = (f(i) - low) / max(f(0.001), high - low)
                mix = (f(1) - min(f(1), max(f(0), y))) * f(ext_factor)
                angle = interp * (f(1) - mix) + theta * mix
                mscale = mscale * (f(1) + f(0.1) * f(log(f(1) / f(freq_scale))))
            cos[pos, i] = f(math.cos(float(angle))) * mscale
            sin[pos, i] = f(math.sin(float(angle))) * mscale
            theta = theta * theta_scale
    return cos, sin
