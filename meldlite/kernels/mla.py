"""Multi-head latent attention (DeepSeek-V2/V3) as one jitted layer half (`mla_block`).

As llama.cpp's deepseek2 graph with the absorption optimisation:
  q        = Wq h, or Wq_b rmsnorm(Wq_a h)         per head [nope | rope]      (T, H*Dk)
  kv       = Wkv_a_mqa h = [latent | k_pe]                                     (T, R + Dr)
  latent   = rmsnorm(latent) (attn_kv_a_norm), k_pe and q's rope part RoPE'd
  q_abs    = Wk_b[head] q_nope                   per head, absorbed into the latent (T, H, R)
  cache    <- float16 [latent | k_pe]: one shared "KV head" of R + Dr values per token
  o_lat    = MQA of [q_abs | q_pe] over the cache, values = the cached latent  (T, H, R)
  o        = Wv_b[head] o_lat                    per head, decompressed        (T, H*Dv)
then the output projection, residual, FFN norm and router (`attention.finish_block`).
The cache holds R + Dr values per token and layer instead of H * (Dk + Dv).

Numerics as the standard block (see `attention`): every projection through qdot with
its input rounded per the matrix's mode, Q and the probabilities rounded to float16
by `attention_rows`, float64 sums in RMSNorm and softmax. The NumPy reference is
`mla_ref.mla_layer`. Shape letters: T tokens, E n_embd, H heads, Dk = nope + Dr query/key
head size, Dr rotated dims, R kv_lora_rank, Rq q_lora_rank, Dv value head size, C context.
"""

import numpy as np
from numba import njit

from meldlite.kernels._cache import track_sources
from meldlite.kernels.attention import (
    attention_rows,
    finish_block,
    rms_norm_rows,
    rope_segments,
    store_kv,
)
from meldlite.kernels.qdot import linear


@njit(cache=True, nogil=True, error_model="numpy")
def per_head(w, t, mode, src, n_head, d_in, out, d_out):
    """out[:, h*d_out:(h+1)*d_out] = W_h src[:, h*d_in:(h+1)*d_in] for each head h, where
    W_h is rows h*d_out.. of w (a 3-D (H, d_out, d_in) tensor seen as H*d_out rows)."""
    n_tok = src.shape[0]
    xs = np.empty((n_tok, d_in), dtype=np.float32)  # (T, d_in)
    ys = np.empty((n_tok, d_out), dtype=np.float32)  # (T, d_out)
    for h in range(n_head):
        for i in range(n_tok):
            xs[i] = src[i, h * d_in : (h + 1) * d_in]
        linear(w[h * d_out : (h + 1) * d_out], t, mode, xs, ys)
        for i in range(n_tok):
            out[i, h * d_out : (h + 1) * d_out] = ys[i]


@njit(cache=True, nogil=True, error_model="numpy")
def mla_queries(h, wq, tq, mq, wqa, tqa, mqa, q_a_norm, wqb, tqb, mqb, eps):
    """q (T, H*Dk) from the normed input h (T, E): Wq h, or Wq_b rmsnorm(Wq_a h)."""
    n_tok = h.shape[0]
    if wqa.shape[0]:
        qa = np.empty((n_tok, wqa.shape[0]), dtype=np.float32)  # (T, Rq)
        linear(wqa, tqa, mqa, h, qa)
        rms_norm_rows(qa, q_a_norm, eps, qa)
        q = np.empty((n_tok, wqb.shape[0]), dtype=np.float32)  # (T, H*Dk)
        linear(wqb, tqb, mqb, qa, q)
        return q
    q = np.empty((n_tok, wq.shape[0]), dtype=np.float32)  # (T, H*Dk)
    linear(wq, tq, mq, h, q)
    return q


@njit(cache=True, nogil=True, error_model="numpy")
def mla_attend(q_cat, kv, kc, vc, segs, n_head, scale, o_lat):
    """Per segment (seq, pos0, n) of segs (S, 3): store the next n rows of kv (T, R + Dr)
    [latent | k_pe] at positions pos0.. of kc[seq] (C, 1, R + Dr), then attend their
    queries q_cat (T, H*(R+Dr)) over it with the latent as values -> o_lat (T, H*R)."""
    r = o_lat.shape[1] // n_head
    no_v = np.empty((kv.shape[0], 0), dtype=np.float32)  # (T, 0)
    t0 = 0
    for j in range(segs.shape[0]):
        seq, pos0, n = segs[j, 0], segs[j, 1], segs[j, 2]
        t1 = t0 + n
        cache = kc[seq]  # (C, 1, R + Dr)
        store_kv(kv[t0:t1], no_v[t0:t1], 1, kv.shape[1], 0, cache, vc[seq], pos0)
        attention_rows(q_cat[t0:t1], cache, cache[:, :, :r], pos0, n_head, scale, o_lat[t0:t1])
        t0 = t1


@njit(cache=True, nogil=True, error_model="numpy")
def mla_block(
    x,
    attn_norm,
    wq,
    tq,
    mq,
    wqa,
    tqa,
    mqa,
    q_a_norm,
    wqb,
    tqb,
    mqb,
    wkva,
    tkva,
    mkva,
    kv_a_norm,
    wkb,
    tkb,
    mkb,
    wvb,
    tvb,
    mvb,
    wo,
    to,
    mo,
    kc,
    vc,
    cos,
    sin,
    segs,
    n_head,
    attn_scale,
    q_scale,
    window,
    n_rot,
    neox,
    eps,
    res_scale,
    ffn,
    k_used,
    h,
    ids,
    weights,
):
    """One MLA layer's attention half, in place on x (T, E), as `attention.attention_block`
    (h, ids, weights, the router arguments, modes m*, the segments segs (S, 3) of
    (seq, pos0, n)). kc (N, C, 1, R + Dr) float16 bits holds [latent | k_pe] per
    sequence and position; vc (N, C, 1, 0) is unused. wq has no rows when
    q_lora_rank > 0 (then wqa/q_a_norm/wqb are used); wkb is Wk_b as H*R rows of nope
    values, wvb Wv_b as H*Dv rows of R values. q_scale and window are the standard
    block's (arguments in the same places); MLA layers have neither (1 and 0)."""
    n_tok = x.shape[0]
    r = kv_a_norm.shape[0]
    dr = n_rot
    rms_norm_rows(x, attn_norm, eps, h)
    q = mla_queries(h, wq, tq, mq, wqa, tqa, mqa, q_a_norm, wqb, tqb, mqb, eps)  # (T, H*Dk)
    dk = q.shape[1] // n_head
    nope = dk - dr
    kv = np.empty((n_tok, r + dr), dtype=np.float32)  # (T, R + Dr) [latent | k_pe]
    linear(wkva, tkva, mkva, h, kv)
    k_pe = np.ascontiguousarray(kv[:, r:])  # (T, Dr)
    rope_segments(k_pe, 1, dr, cos, sin, segs, n_rot, neox)
    lat = np.ascontiguousarray(kv[:, :r])  # (T, R)
    rms_norm_rows(lat, kv_a_norm, eps, lat)
    kv[:, :r] = lat
    kv[:, r:] = k_pe
    q_nope = np.empty((n_tok, n_head * nope), dtype=np.float32)  # (T, H*nope)
    q_pe = np.empty((n_tok, n_head * dr), dtype=np.float32)  # (T, H*Dr)
    for hd in range(n_head):
        q_nope[:, hd * nope : (hd + 1) * nope] = q[:, hd * dk : hd * dk + nope]
        q_pe[:, hd * dr : (hd + 1) * dr] = q[:, hd * dk + nope : (hd + 1) * dk]
    rope_segments(q_pe, n_head, dr, cos, sin, segs, n_rot, neox)
    q_abs = np.empty((n_tok, n_head * r), dtype=np.float32)  # (T, H*R)
    per_head(wkb, tkb, mkb, q_nope, n_head, nope, q_abs, r)
    q_cat = np.empty((n_tok, n_head * (r + dr)), dtype=np.float32)  # (T, H*(R+Dr))
    for hd in range(n_head):
        q_cat[:, hd * (r + dr) : hd * (r + dr) + r] = q_abs[:, hd * r : (hd + 1) * r]
        q_cat[:, hd * (r + dr) + r : (hd + 1) * (r + dr)] = q_pe[:, hd * dr : (hd + 1) * dr]
    o_lat = np.empty((n_tok, n_head * r), dtype=np.float32)  # (T, H*R)
    mla_attend(q_cat, kv, kc, vc, segs, n_head, attn_scale, o_lat)
    dv = wvb.shape[0] // n_head
    a = np.empty((n_tok, n_head * dv), dtype=np.float32)  # (T, H*Dv)
    per_head(wvb, tvb, mvb, o_lat, n_head, r, a, dv)
    no_vec = np.zeros(0, dtype=np.float32)  # (0,) no output bias, no post-norm
    finish_block(
        x,
        a,
        wo,
        to,
        mo,
        no_vec,
        no_vec,
        res_scale,
        eps,
        ffn,
        k_used,
        h,
        ids,
        weights,
    )


track_sources(per_head, mla_queries, mla_attend, mla_block)
