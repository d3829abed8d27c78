"""The non-expert half of a transformer layer in one jitted call (`attention_block`).

RMSNorm -> Q/K/V projections -> (bias) -> Q/K norm -> RoPE -> KV cache (float16 bits)
-> causal grouped-query attention -> output projection -> residual -> FFN RMSNorm ->
router -> gating and top-k (`route`). The NumPy versions in `attention_ref` are the references;
the numerics follow them and llama.cpp's CPU path: squares summed in float64, Q and the
softmax probabilities rounded to float16, softmax summed in float64, every projection
through qdot's kernels with its input rounded per the matrix's activation mode (actquant:
as llama.cpp rounds it when the model runs with `llama_numerics`, NONE = float otherwise).

Shape letters: T tokens, E n_embd, H/G query/KV heads, D/Dv head sizes, C context,
R/2 rotated pairs, X experts, k experts used.
"""

import numpy as np
from numba import njit, prange

from meldlite.kernels._cache import track_sources
from meldlite.kernels.actquant import NONE, _f16_round
from meldlite.kernels.qdot import (
    CHUNK,
    PARALLEL_MIN_BYTES,
    _f16_bits_to_f32,
    linear,
    matmul_acts,
    quantize_rows,
    rows_times_tokens,
)
from meldlite.kernels.route import GATE_SOFTMAX, NO_BIAS, route_gated

QK_NONE, QK_HEAD, QK_FULL = 0, 1, 2


@njit(cache=True, nogil=True, error_model="numpy")
def rms_norm_rows(x, w, eps, out):
    """out[t] = x[t] * 1/sqrt(mean(x[t]^2) + eps) * w; squares summed in float64.
    x (T, n) may equal out; w (n,) (or (m,) with n a multiple of m: per-head norm)."""
    n = x.shape[1]
    m = w.shape[0]
    for t in range(x.shape[0]):
        for h in range(n // m):
            s = 0.0
            for i in range(h * m, h * m + m):
                s += np.float64(x[t, i] * x[t, i])
            scale = np.float32(1.0) / np.sqrt(np.float32(s / m) + np.float32(eps))
            for i in range(h * m, h * m + m):
                out[t, i] = (x[t, i] * scale) * w[i - h * m]


@njit(cache=True, nogil=True, error_model="numpy")
def rope_rows(x, n_head, d, cos, sin, pos0, n_rot, neox):
    """Rotate the first n_rot dims of each head of x (T, n_head*d) in place."""
    half = n_rot // 2
    for t in range(x.shape[0]):
        c, s = cos[pos0 + t], sin[pos0 + t]
        for h in range(n_head):
            o = h * d
            for i in range(half):
                if neox:
                    ia, ib = o + i, o + i + half
                else:
                    ia, ib = o + 2 * i, o + 2 * i + 1
                a, b = x[t, ia], x[t, ib]
                x[t, ia] = a * c[i] - b * s[i]
                x[t, ib] = a * s[i] + b * c[i]


@njit(inline="always")
def f32_to_f16_bits(v):
    """float32 -> IEEE half bits (round to nearest even, overflow to inf), as numpy does."""
    r = _f16_round(v)  # an exactly representable half value (or inf / NaN)
    u = np.array([r], np.float32).view(np.uint32)[0]
    sign = np.uint16((u >> np.uint32(16)) & np.uint32(0x8000))
    a = abs(r)
    if a != a:
        return np.uint16(sign | np.uint16(0x7E00))
    if a == np.inf:
        return np.uint16(sign | np.uint16(0x7C00))
    if a < np.float32(2.0**-14):  # subnormal half: multiple of 2^-24
        return np.uint16(sign | np.uint16(np.int32(a * np.float32(2.0**24))))
    e = np.int32((u >> np.uint32(23)) & np.uint32(0xFF)) - 112
    return np.uint16(
        sign | np.uint16((e << 10) | np.int32((u >> np.uint32(13)) & np.uint32(0x3FF)))
    )


@njit(cache=True, nogil=True, error_model="numpy")
def store_kv(k, v, n_head_kv, dk, dv, kc, vc, pos0):
    """Write k (T, G*D), v (T, G*Dv) as float16 bits into kc (C, G, D), vc (C, G, Dv).

    Position p goes to row p % C: a cache of n_ctx rows holds each position at its own
    row, a sliding-window layer's ring of C rows the latest C positions."""
    rows = kc.shape[0]
    for t in range(k.shape[0]):
        r = (pos0 + t) % rows
        for g in range(n_head_kv):
            for i in range(dk):
                kc[r, g, i] = f32_to_f16_bits(k[t, g * dk + i])
            for i in range(dv):
                vc[r, g, i] = f32_to_f16_bits(v[t, g * dv + i])


@njit(cache=True, nogil=True, error_model="numpy")
def scores(qh, kf, first, last, p):
    """p[s] = sum over i in order of qh[i] * kf[s, i] (float32), s in first..last: eight
    positions' serial sums side by side (independent chains instead of one at a time)."""
    d = qh.shape[0]
    s = first
    while s + 8 <= last + 1:
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0.0)
        k0, k1, k2, k3 = kf[s], kf[s + 1], kf[s + 2], kf[s + 3]  # (D,)
        k4, k5, k6, k7 = kf[s + 4], kf[s + 5], kf[s + 6], kf[s + 7]
        for i in range(d):
            qi = qh[i]
            a0 += qi * k0[i]
            a1 += qi * k1[i]
            a2 += qi * k2[i]
            a3 += qi * k3[i]
            a4 += qi * k4[i]
            a5 += qi * k5[i]
            a6 += qi * k6[i]
            a7 += qi * k7[i]
        p[s], p[s + 1], p[s + 2], p[s + 3] = a0, a1, a2, a3
        p[s + 4], p[s + 5], p[s + 6], p[s + 7] = a4, a5, a6, a7
        s += 8
    while s <= last:
        a = np.float32(0.0)
        for i in range(d):
            a += qh[i] * kf[s, i]
        p[s] = a
        s += 1


@njit(cache=True, nogil=True, error_model="numpy")
def attention_rows(q, kc, vc, pos0, n_head, scale, out, window=0, sinks=None):
    """Causal GQA of T tokens at positions pos0.. over the cache; q (T, H*D) -> out (T, H*Dv).

    Per head: scores = f16(q) . K (float32 sums), times `scale` (float32; 1/sqrt(D) in
    most models); softmax summed in float64; probabilities rounded to float16; out = sum
    over positions of p * V. With window > 0 the token at position p sees positions
    p - window + 1 .. p only (llama.cpp's LLAMA_SWA_TYPE_STANDARD mask: masked when
    p - p0 >= window). Position s is read from cache row s % C, in position order; the
    rows must hold every position the T tokens see (checked). sinks (H,) (gpt-oss; None
    or empty: none): head h's sink logit joins the softmax's max and denominator
    (exp(sink - max), as ggml's soft_max with sinks) but attends nothing."""
    if sinks is None:
        sk = np.zeros(0, dtype=np.float32)  # (0,)
    else:
        sk = sinks  # (H,)
    n_tok = q.shape[0]
    rows, n_head_kv, d = kc.shape[0], kc.shape[1], kc.shape[2]
    dv = vc.shape[2]
    scale = np.float32(scale)
    n_s = pos0 + n_tok
    lo = max(0, pos0 - window + 1) if window > 0 else 0  # first position any token sees
    if n_s - lo > rows:
        raise ValueError("attention_rows: the cache rows do not hold the attended positions")
    work = n_tok * n_head * (n_s - lo) * (d + dv)  # multiply-adds of scores and values
    if n_head_kv > 1 and work >= ATTEND_PARALLEL_MIN:
        _groups_parallel(q, kc, vc, pos0, lo, n_head, scale, window, sk, out)
    else:
        for g in range(n_head_kv):
            _attend_group(g, q, kc, vc, pos0, lo, n_head, scale, window, sk, out)


ATTEND_PARALLEL_MIN = 1 << 17  # multiply-adds below which one thread attends all heads


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _groups_parallel(q, kc, vc, pos0, lo, n_head, scale, window, sk, out):
    """_attend_group for every KV head, in parallel (each writes its own heads' columns)."""
    for g in prange(kc.shape[1]):
        _attend_group(g, q, kc, vc, pos0, lo, n_head, scale, window, sk, out)


@njit(cache=True, nogil=True, error_model="numpy")
def _attend_group(g, q, kc, vc, pos0, lo, n_head, scale, window, sk, out):
    """attention_rows for the query heads of KV head g (its keys and values converted
    from float16 once for all of them)."""
    n_tok = q.shape[0]
    rows, d, dv = kc.shape[0], kc.shape[2], vc.shape[2]
    group = n_head // kc.shape[1]
    n_s = pos0 + n_tok
    kf = np.empty((n_s - lo, d), dtype=np.float32)  # (S, D) keys of KV head g
    vf = np.empty((n_s - lo, dv), dtype=np.float32)  # (S, Dv)
    qh = np.empty(d, dtype=np.float32)  # (D,)
    p = np.empty(n_s - lo, dtype=np.float32)  # (S,)
    acc = np.empty(dv, dtype=np.float32)  # (Dv,)
    for s in range(lo, n_s):
        r = s % rows
        kr, vr, kfr, vfr = kc[r, g], vc[r, g], kf[s - lo], vf[s - lo]  # (D,) (Dv,)
        for i in range(d):
            kfr[i] = _f16_bits_to_f32(np.uint32(kr[i]))
        for i in range(dv):
            vfr[i] = _f16_bits_to_f32(np.uint32(vr[i]))
    for t in range(n_tok):
        last = pos0 + t - lo  # attends to positions first..last (offsets from lo)
        first = max(0, last - window + 1) if window > 0 else 0
        for j in range(group):
            h = g * group + j
            for i in range(d):
                qh[i] = _f16_round(q[t, h * d + i])
            scores(qh, kf, first, last, p)
            mx = -np.inf
            for s in range(first, last + 1):
                a = p[s] * scale
                p[s] = a
                mx = max(mx, a)
            if sk.shape[0]:
                mx = max(mx, sk[h])
            tot = 0.0
            for s in range(first, last + 1):
                e = np.exp(p[s] - mx)
                p[s] = e
                tot += np.float64(e)
            if sk.shape[0]:
                tot += np.float64(np.exp(sk[h] - mx))
            inv = 1.0 / tot
            for i in range(dv):
                acc[i] = 0.0
            for s in range(first, last + 1):
                w = _f16_round(np.float32(p[s] * inv))
                vs = vf[s]  # (Dv,)
                for i in range(dv):
                    acc[i] += w * vs[i]
            for i in range(dv):
                out[t, h * dv + i] = acc[i]


@njit(cache=True, nogil=True, error_model="numpy")
def attend_cached(q, k, v, kc, vc, pos0, n_head, scale, window, out, sinks=None):
    """Store k, v (T, G*D / G*Dv) in the cache and attend q (T, H*D) -> out (T, H*Dv).

    A cache of fewer rows than the positions (a sliding-window ring) takes the tokens in
    chunks of rows - window + 1, so that each chunk's attended positions are all held;
    every token sees the same positions in the same order as with a full cache. sinks:
    the attention sink logits (H,) (None or empty: none)."""
    n_tok = q.shape[0]
    n_head_kv, dk, dv = kc.shape[1], kc.shape[2], vc.shape[2]
    rows = kc.shape[0]
    step = n_tok
    if window > 0 and pos0 + n_tok > rows:
        step = rows - window + 1
    for c0 in range(0, n_tok, step):
        c1 = min(n_tok, c0 + step)
        store_kv(k[c0:c1], v[c0:c1], n_head_kv, dk, dv, kc, vc, pos0 + c0)
        attention_rows(q[c0:c1], kc, vc, pos0 + c0, n_head, scale, out[c0:c1], window, sinks)


@njit(cache=True, nogil=True, error_model="numpy")
def rope_segments(x, n_head, d, cos, sin, segs, n_rot, neox):
    """`rope_rows` on x (T, n_head*d) in place, segment by segment: segs (S, 3) rows
    (seq, pos0, n) say that the next n rows of x are positions pos0.. of their sequence."""
    t0 = 0
    for j in range(segs.shape[0]):
        pos0, n = segs[j, 1], segs[j, 2]
        rope_rows(x[t0 : t0 + n], n_head, d, cos, sin, pos0, n_rot, neox)  # (n, n_head*d)
        t0 += n


@njit(cache=True, nogil=True, error_model="numpy")
def attend_segments(q, k, v, kc, vc, segs, n_head, scale, window, out, sinks=None):
    """`attend_cached` per segment: segs (S, 3) rows (seq, pos0, n) give the next n
    tokens of q (T, H*D), k (T, G*D), v (T, G*Dv) and out (T, H*Dv) to positions pos0..
    of sequence seq, whose cache is kc[seq] (C, G, D), vc[seq] (C, G, Dv) of
    kc (N, C, G, D), vc (N, C, G, Dv) (N sequences)."""
    t0 = 0
    for j in range(segs.shape[0]):
        seq, pos0, n = segs[j, 0], segs[j, 1], segs[j, 2]
        t1 = t0 + n
        attend_cached(
            q[t0:t1],  # (n, H*D)
            k[t0:t1],  # (n, G*D)
            v[t0:t1],  # (n, G*Dv)
            kc[seq],  # (C, G, D)
            vc[seq],  # (C, G, Dv)
            pos0,
            n_head,
            scale,
            window,
            out[t0:t1],  # (n, H*Dv)
            sinks,
        )
        t0 = t1


@njit(cache=True, nogil=True, error_model="numpy")
def route_rows(logits, k, norm_topk, ids, weights):
    """Softmax routing (`route.route_gated` with no bias, groups or scale): the k most
    probable experts (ties: lower id first) in descending order, their probabilities,
    renormalised to sum 1 when norm_topk. A -inf logit (pruned expert) is never chosen."""
    route_gated(logits, k, GATE_SOFTMAX, NO_BIAS, 0, 0, norm_topk, 0.0, ids, weights)


@njit(cache=True, nogil=True, error_model="numpy")
def project(raw, t, mode, src, qa, da, bs, xr, toks, out, quantize):
    """out = W src with src's rounded activations in qa/da/bs/xr (filled when `quantize`)."""
    if quantize:
        quantize_rows(src, mode, qa, da, bs, xr)
    matmul_acts(raw, t, qa, da, bs, xr, toks, out, mode != NONE)


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def qkv_parallel(wq, tq, wk, tk, wv, tv, qa, da, bs, xr, toks, q, k, v, llama_numerics):
    """q, k, v = Wq h, Wk h, Wv h for one set of rounded activations, all three matrices'
    row chunks in one parallel loop (one thread start-up instead of three)."""
    nq = (wq.shape[0] + CHUNK - 1) // CHUNK
    nk = (wk.shape[0] + CHUNK - 1) // CHUNK
    nv = (wv.shape[0] + CHUNK - 1) // CHUNK
    for c in prange(nq + nk + nv):
        if c < nq:
            r0 = c * CHUNK
            rows_times_tokens(
                wq, tq, r0, min(wq.shape[0], r0 + CHUNK), qa, da, bs, xr, toks, q, llama_numerics
            )
        elif c < nq + nk:
            r0 = (c - nq) * CHUNK
            rows_times_tokens(
                wk, tk, r0, min(wk.shape[0], r0 + CHUNK), qa, da, bs, xr, toks, k, llama_numerics
            )
        else:
            r0 = (c - nq - nk) * CHUNK
            rows_times_tokens(
                wv, tv, r0, min(wv.shape[0], r0 + CHUNK), qa, da, bs, xr, toks, v, llama_numerics
            )


@njit(cache=True, nogil=True, error_model="numpy")
def attention_block(
    x,
    attn_norm,
    wq,
    tq,
    mq,
    wk,
    tk,
    mk,
    wv,
    tv,
    mv,
    wo,
    to,
    mo,
    bq,
    bk,
    bv,
    bo,
    q_norm,
    k_norm,
    qk_norm,
    post_norm,
    sinks,
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
    """One layer's attention half, in place on x (T, E); h (T, E) <- FFN-normed x;
    ids/weights (T, k) <- routing. ffn = (ffn_norm, router wr/tr/mr, rbias, sel_bias,
    gating, n_group, n_group_used, norm_topk, w_scale): routing runs when wr has rows;
    rbias (X,), when not empty, is added to the router logits (-inf masks a pruned
    expert); the rest is the gating of `route.route_gated`. Modes m* say how
    each projection's input is rounded (actquant; NONE = float). attn_scale multiplies
    Q.K, q_scale Q after RoPE (skipped when 1). The T tokens are segments of independent
    sequences: segs (S, 3) int64 rows (seq, pos0, n), the next n tokens at positions
    pos0.. of sequence seq, whose keys and values are kc[seq] (C, G, D), vc[seq]
    (C, G, Dv) of kc/vc (N, C, G, D/Dv); projections, norms and the router take all T
    tokens at once, RoPE, the cache and attention go per segment (`attend_segments`).
    window > 0: sliding-window attention, kc/vc may be rings of C >= window rows
    (`attend_cached`); n_rot 0:
    no RoPE. post_norm (E,), when not empty, RMS-normalises the attention output before
    the residual add; res_scale multiplies it (skipped when 1); sinks (H,) the attention
    sink logits (empty: none)."""
    n_tok, n_embd = x.shape
    n_head_kv, dk, dv = kc.shape[2], kc.shape[3], vc.shape[3]
    toks = np.arange(n_tok)
    rms_norm_rows(x, attn_norm, eps, h)
    n = n_embd
    nb = max(1, n // 32)
    qa = np.empty((n_tok, n), dtype=np.int8)
    da = np.empty((n_tok, nb), dtype=np.float32)
    bs = np.empty((n_tok, nb), dtype=np.int32)
    xr = np.empty((n_tok, n), dtype=np.float32)
    q = np.empty((n_tok, wq.shape[0]), dtype=np.float32)  # (T, H*D)
    k = np.empty((n_tok, wk.shape[0]), dtype=np.float32)  # (T, G*D)
    v = np.empty((n_tok, wv.shape[0]), dtype=np.float32)  # (T, G*Dv)
    work = (wq.size + wk.size + wv.size) * n_tok
    if mq == mk and mk == mv and work >= PARALLEL_MIN_BYTES:
        quantize_rows(h, mq, qa, da, bs, xr)
        qkv_parallel(wq, tq, wk, tk, wv, tv, qa, da, bs, xr, toks, q, k, v, mq != NONE)
    else:
        project(wq, tq, mq, h, qa, da, bs, xr, toks, q, True)
        project(wk, tk, mk, h, qa, da, bs, xr, toks, k, mk != mq)
        project(wv, tv, mv, h, qa, da, bs, xr, toks, v, mv != mk)
    if bq.shape[0]:
        for t in range(n_tok):
            q[t] += bq
            k[t] += bk
            v[t] += bv
    if qk_norm == QK_FULL or qk_norm == QK_HEAD:
        rms_norm_rows(q, q_norm, eps, q)
        rms_norm_rows(k, k_norm, eps, k)
    rope_segments(q, n_head, dk, cos, sin, segs, n_rot, neox)  # (T, H*D)
    rope_segments(k, n_head_kv, dk, cos, sin, segs, n_rot, neox)  # (T, G*D)
    if q_scale != 1.0:
        q *= np.float32(q_scale)
    a = np.empty((n_tok, n_head * dv), dtype=np.float32)  # (T, H*Dv)
    attend_segments(q, k, v, kc, vc, segs, n_head, attn_scale, window, a, sinks)
    finish_block(x, a, wo, to, mo, bo, post_norm, res_scale, eps, ffn, k_used, h, ids, weights)


@njit(cache=True, nogil=True, error_model="numpy")
def finish_block(x, a, wo, to, mo, bo, post_norm, res_scale, eps, ffn, k_used, h, ids, weights):
    """The end of every attention half: x (T, E) += res_scale * post_norm(Wo a + bo) for
    the attention output a (T, n) (post_norm (E,) empty: none); h <- FFN-normed x; the
    router's ids/weights (T, k) when the router has rows (ffn: see `attention_block`)."""
    ffn_norm, wr, tr, mr, rbias, sel_bias, gating, n_group, n_group_used, norm_topk, w_scale = ffn
    n_tok, n_embd = x.shape
    o = np.empty((n_tok, n_embd), dtype=np.float32)  # (T, E)
    linear(wo, to, mo, a, o)
    add_bias = bo.shape[0] > 0
    if post_norm.shape[0]:
        if add_bias:
            for t in range(n_tok):
                o[t] += bo
        rms_norm_rows(o, post_norm, eps, o)
        add_bias = False
    rs = np.float32(res_scale)
    for t in range(n_tok):
        for i in range(n_embd):
            ob = o[t, i] + bo[i] if add_bias else o[t, i]
            if res_scale != 1.0:
                ob = ob * rs
            x[t, i] = x[t, i] + ob
    rms_norm_rows(x, ffn_norm, eps, h)
    if wr.shape[0]:
        logits = np.empty((n_tok, wr.shape[0]), dtype=np.float32)  # (T, X)
        linear(wr, tr, mr, h, logits)
        if rbias.shape[0]:
            for t in range(n_tok):
                logits[t] += rbias
        route_gated(
            logits,
            k_used,
            gating,
            sel_bias,
            n_group,
            n_group_used,
            norm_topk,
            w_scale,
            ids,
            weights,
        )


track_sources(
    rms_norm_rows,
    rope_rows,
    store_kv,
    scores,
    _attend_group,
    _groups_parallel,
    attention_rows,
    attend_cached,
    rope_segments,
    attend_segments,
    route_rows,
    project,
    qkv_parallel,
    attention_block,
    finish_block,
)
