"""NumPy reference of multi-head latent attention (`kernels.mla.mla_block` is checked
against it), for float32 weights, written as the model is defined (the latent decompressed
per head) rather than as the kernel computes it: both give the same attention up to
rounding because Wk_b is absorbed into the query and Wv_b applied after the sum.

Shape letters: T tokens, S positions attended, E n_embd, H heads, Dk = nope + Dr query/key
head size, Dr rotated dims, R kv_lora_rank, Dv value head size.
"""

import numpy as np

from meldlite.kernels.attention_ref import rms_norm, rope, softmax

F32 = np.float32


def mla_layer(x, w, lat_cache, pe_cache, segs, cos, sin, n_rot, scale, eps):
    """x (T, E) + attention output of one MLA layer. The T tokens are segments of
    independent sequences: segs rows (seq, pos0, n), the next n tokens at positions pos0..
    of sequence seq, whose caches lat_cache[seq] (C, R) and pe_cache[seq] (C, Dr) float16
    get their normed latent and RoPE'd key part (in place). w: float32 arrays attn_norm
    (E,), q (H*Dk, E) or q_a (Rq, E) + q_a_norm (Rq,) + q_b (H*Dk, Rq), kv_a (R+Dr, E),
    kv_a_norm (R,), k_b (H, R, nope), v_b (H, Dv, R), out (E, H*Dv)."""
    n_tok = x.shape[0]
    n_head, _, nope = w["k_b"].shape
    h = rms_norm(x, w["attn_norm"], eps)  # (T, E)
    if "q_a" in w:
        q = rms_norm(h @ w["q_a"].T, w["q_a_norm"], eps) @ w["q_b"].T  # (T, H*Dk)
    else:
        q = h @ w["q"].T  # (T, H*Dk)
    q = q.reshape(n_tok, n_head, nope + n_rot)  # (T, H, Dk)
    kv = h @ w["kv_a"].T  # (T, R+Dr)
    o = np.empty((n_tok, n_head * w["v_b"].shape[1]), F32)  # (T, H*Dv)
    t0 = 0
    for seq, pos0, n in segs:
        rows = slice(t0, t0 + n)
        lat, pe = lat_cache[seq], pe_cache[seq]  # (C, R), (C, Dr)
        o[rows] = mla_attention(q[rows], kv[rows], w, lat, pe, pos0, cos, sin, n_rot, scale, eps)
        t0 += n
    return x + o @ w["out"].T  # (T, E)


def mla_attention(q, kv, w, lat_cache, pe_cache, pos0, cos, sin, n_rot, scale, eps):
    """One sequence's attention output (T, H*Dv) of queries q (T, H, Dk) and new
    [latent | k_pe] rows kv (T, R+Dr) at positions pos0.., written to its caches."""
    n_tok, n_head, _ = q.shape
    r, nope = w["k_b"].shape[1:]
    c, s = cos[pos0 : pos0 + n_tok], sin[pos0 : pos0 + n_tok]  # (T, Dr/2)
    lat_cache[pos0 : pos0 + n_tok] = rms_norm(kv[:, :r], w["kv_a_norm"], eps)
    pe_cache[pos0 : pos0 + n_tok] = rope(kv[:, None, r:], c, s, n_rot, False)[:, 0]
    q_pe = rope(q[..., nope:], c, s, n_rot, False)  # (T, H, Dr)
    lat = lat_cache[: pos0 + n_tok].astype(F32)  # (S, R)
    k_nope = np.einsum("hrn,sr->shn", w["k_b"], lat)  # (S, H, nope)
    pe = np.broadcast_to(pe_cache[: pos0 + n_tok].astype(F32)[:, None], (len(lat), n_head, n_rot))
    k = np.concatenate([k_nope, pe], axis=-1)  # (S, H, Dk)
    v = np.einsum("hdr,sr->shd", w["v_b"], lat)  # (S, H, Dv)
    qf = np.concatenate([q[..., :nope], q_pe], axis=-1)  # (T, H, Dk)
    scores = np.einsum("thd,shd->hts", qf, k) * F32(scale)  # (H, T, S)
    future = np.arange(len(lat))[None, :] > (pos0 + np.arange(n_tok))[:, None]  # (T, S)
    scores[:, future] = -np.inf
    return np.einsum("hts,shd->thd", softmax(scores), v).reshape(n_tok, -1)  # (T, H*Dv)
