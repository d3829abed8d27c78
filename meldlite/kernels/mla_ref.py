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


def mla_layer(x, w, lat_cache, pe_cache, pos0, cos, sin, n_rot, scale, eps):
    """x (T, E) + attention output of one MLA layer; the caches (C, R) and (C, Dr) float16
    get the new tokens' normed latent and RoPE'd key part (in place). w: float32 arrays
    attn_norm (E,), q (H*Dk, E) or q_a (Rq, E) + q_a_norm (Rq,) + q_b (H*Dk, Rq),
    kv_a (R+Dr, E), kv_a_norm (R,), k_b (H, R, nope), v_b (H, Dv, R), out (E, H*Dv)."""
    n_tok = x.shape[0]
    n_head, r, nope = w["k_b"].shape
    h = rms_norm(x, w["attn_norm"], eps)  # (T, E)
    if "q_a" in w:
        q = rms_norm(h @ w["q_a"].T, w["q_a_norm"], eps) @ w["q_b"].T  # (T, H*Dk)
    else:
        q = h @ w["q"].T  # (T, H*Dk)
    q = q.reshape(n_tok, n_head, nope + n_rot)  # (T, H, Dk)
    kv = h @ w["kv_a"].T  # (T, R+Dr)
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
    o = np.einsum("hts,shd->thd", softmax(scores), v).reshape(n_tok, -1)  # (T, H*Dv)
    return x + o.astype(F32) @ w["out"].T  # (T, E)
