"""Plain NumPy references of the jitted quantizers (slow; tests compare the kernels with them).

Written vectorised over blocks, from the algorithm descriptions in search.py,
legacy.py and kquants.py, sharing no code with them; f16 rounding is
NumPy's. Each `*_ref(x, w)` takes x (n_rows, n_cols) float32 and w (n_cols,) float32 or
None and returns (n_rows, row_bytes) uint8.
Shapes: n_rows x n_cols input; nb blocks of 32 per row; B super-blocks of 256 (all rows);
n_sub sub-blocks of `sub` values per super-block; (...) any leading shape.
"""

import numpy as np
from gguf import GGMLQuantizationType as T

EPS = 1e-15
N_STEPS = 9
N_LLOYD = 4
TIE = 1 + 1e-12


def first_best(errs):
    """Index along axis 0 of the best error, a later one winning only if better by TIE."""
    pick = np.zeros(errs.shape[1:], dtype=np.int64)  # errs.shape[1:]
    best = errs[0]
    for i in range(1, errs.shape[0]):
        better = errs[i] * TIE < best
        pick = np.where(better, i, pick)
        best = np.where(better, errs[i], best)
    return pick


def _f16_bytes(d) -> np.ndarray:
    """(...) values -> (..., 2) uint8 of their f16 (nearest even)."""
    with np.errstate(over="ignore"):
        return (
            np.ascontiguousarray(np.asarray(d, dtype=np.float32).astype(np.float16))
            .view(np.uint8)
            .reshape(*np.shape(d), 2)
        )


def _blocks(x, n):
    """x (n_rows, n_cols) -> (n_rows, n_blocks, n)."""
    return x.reshape(x.shape[0], -1, n)


def _block_weights(w, shape, n):
    """Per-element weights (n_rows, n_blocks, n): w per column, ones where a block's are all 0."""
    if w is None:
        return np.ones(shape, dtype=np.float64)
    wb = np.broadcast_to(
        w.astype(np.float64).reshape(1, -1, n), shape
    ).copy()  # (n_rows, n_blocks, n)
    wb[wb.sum(-1) == 0] = 1.0
    return wb


def _signed_absmax(xb):
    """Signed value of the largest |x| per block (first on ties) (...,)."""
    i = np.argmax(np.abs(xb), axis=-1)  # (...)
    return np.take_along_axis(xb, i[..., None], axis=-1)[..., 0]


# ---- ggml's reference quantizers (no importance) --------------------------------------------


def q8_0_ggml_ref(x):
    xb = _blocks(x, 32)  # (n_rows, nb, 32)
    d = np.abs(xb).max(-1) / np.float32(127)  # (n_rows, nb) float32
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(
        np.float32
    )  # (n_rows, nb)
    v = (xb * inv[..., None]).astype(np.float64)  # (n_rows, nb, 32)
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)  # roundf: ties away from zero
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1).reshape(x.shape[0], -1)


def _nibble_levels_ggml(x, nmax):
    xb = _blocks(x, 32)  # (n_rows, nb, 32)
    d = (_signed_absmax(xb) / np.float32(-nmax)).astype(np.float32)  # (n_rows, nb)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(
        np.float32
    )  # (n_rows, nb)
    v = (xb * inv[..., None] + np.float32(nmax + 0.5)).astype(np.float32)  # (n_rows, nb, 32)
    return d, np.minimum(2 * nmax - 1, np.trunc(v)).astype(np.uint8)


def _pack_q4_0(head, levels):
    """head (n_rows, nb, 2 or 4): f16 d (Q4_0) or d, m (Q4_1); levels (n_rows, nb, 32)."""
    qs = levels[..., :16] | (levels[..., 16:] << 4)  # (n_rows, nb, 16)
    return np.concatenate([head, qs], axis=-1).reshape(levels.shape[0], -1)


def _pack_q5_0(head, levels):
    qs = (levels[..., :16] & 0xF) | ((levels[..., 16:] & 0xF) << 4)  # (n_rows, nb, 16)
    bits = (levels >> 4).astype(np.uint64) << np.arange(32, dtype=np.uint64)  # (n_rows, nb, 32)
    qh = bits.sum(-1).astype("<u4")[..., None].view(np.uint8)  # (n_rows, nb, 4)
    return np.concatenate([head, qh, qs], axis=-1).reshape(levels.shape[0], -1)


# ---- importance-weighted symmetric scale search -----------------------------------------------


def _round_clamp(v, lo, hi):
    return np.clip(np.rint(v), lo, hi)


def fit_symmetric_ref(xb, wb, nmax):
    """(...) best float scales for xb (..., n) ~ s*l, l in [-nmax, nmax-1]."""
    x = xb.astype(np.float64)  # (..., n)
    vmax = _signed_absmax(x)  # (...)
    live = np.abs(vmax) >= EPS  # (...)
    vsafe = np.where(live, vmax, 1.0)  # (...)
    k = np.arange(-N_STEPS, N_STEPS + 1)
    steps = np.concatenate([-(nmax + 0.1 * k), nmax - 1 + 0.1 * k])  # (n_cand,)
    iscales = steps.reshape(-1, *[1] * vsafe.ndim) / vsafe[None]  # (n_cand, ...)
    best_s = np.zeros(vmax.shape)  # (...)
    best_gain = np.zeros(vmax.shape)  # (...)
    for isc in iscales:  # in the kernel's candidate order
        l = _round_clamp(isc[..., None] * x, -nmax, nmax - 1)  # (..., n)
        slx = (wb * x * l).sum(-1)  # (...)
        sl2 = (wb * l * l).sum(-1)  # (...)
        better = (sl2 > 0) & (slx * slx > best_gain * sl2 * TIE)
        best_gain = np.where(better, slx * slx / np.where(sl2 > 0, sl2, 1), best_gain)
        best_s = np.where(better, slx / np.where(sl2 > 0, sl2, 1), best_s)
    active = best_s != 0  # (...)
    for _ in range(N_LLOYD):
        inv = np.where(active, 1 / np.where(best_s != 0, best_s, 1), 0)  # (...)
        l = _round_clamp(inv[..., None] * x, -nmax, nmax - 1)  # (..., n)
        slx = (wb * x * l).sum(-1)  # (...)
        sl2 = (wb * l * l).sum(-1)  # (...)
        active &= (sl2 > 0) & (slx * slx > best_gain * sl2 * TIE)
        safe = np.where(sl2 > 0, sl2, 1)
        best_gain = np.where(active, slx * slx / safe, best_gain)
        best_s = np.where(active, slx / safe, best_s)
    return np.where(live, best_s, 0.0)


def _err_symmetric(x, w, s, nmax):
    """(...) sum w (x - s*l)^2 with l rounded to nearest for scales s (...)."""
    inv = np.where(s != 0, 1 / np.where(s != 0, s, 1), 0)  # (...)
    l = _round_clamp(x * inv[..., None], -nmax, nmax - 1)  # (..., n)
    return (w * (x - s[..., None] * l) ** 2).sum(-1)


def _f16_neighbours(d):
    """(3, ...) float16: d rounded to f16, then the next smaller and larger magnitudes."""
    h = np.asarray(d, dtype=np.float32).astype(np.float16)  # (...)
    mag = np.abs(h).view(np.uint16).astype(np.int32)  # (...)
    sign = np.signbit(h)
    out = []
    for step in (0, -1, 1):
        m = np.clip(np.minimum(mag, 0x7BFF) + step, 0, 0x7BFF).astype(np.uint16).view(np.float16)
        out.append(np.where(sign, -m, m))
    return np.stack(out)


def _weighted_levels(x, w, nmax):
    """(f16 scales (n_rows, nb), levels in [0, 2*nmax) (n_rows, nb, 32))."""
    xb = _blocks(x, 32).astype(np.float64)  # (n_rows, nb, 32)
    wb = _block_weights(w, xb.shape, 32)  # (n_rows, nb, 32)
    vmax = _signed_absmax(_blocks(x, 32))  # (n_rows, nb) float32
    with np.errstate(over="ignore"):
        extremes = np.stack([vmax / np.float32(-nmax), vmax / np.float32(nmax - 1)]).astype(
            np.float16
        )
    cands = np.concatenate(
        [_f16_neighbours(fit_symmetric_ref(xb, wb, nmax)), extremes]
    )  # (5, n_rows, nb)
    errs = np.stack(
        [_err_symmetric(xb, wb, c.astype(np.float64), nmax) for c in cands]
    )  # (5, n_rows, nb)
    pick = first_best(errs)
    d = np.take_along_axis(cands, pick[None], axis=0)[0]  # (n_rows, nb) float16
    df = d.astype(np.float64)  # (n_rows, nb)
    inv = np.where(df != 0, 1 / np.where(df != 0, df, 1), 0)  # (n_rows, nb)
    levels = _round_clamp(xb * inv[..., None], -nmax, nmax - 1) + nmax  # (n_rows, nb, 32)
    return d, levels.astype(np.int64)


def q8_0_ref(x, w=None):
    if w is None:
        return q8_0_ggml_ref(x)
    d, levels = _weighted_levels(x, w, 128)
    q = (levels - 128).astype(np.int8).view(np.uint8)  # (n_rows, nb, 32)
    return np.concatenate([_f16_bytes(d), q], axis=-1).reshape(x.shape[0], -1)


def _nibbles_ref(x, w, nmax, pack):
    d, levels = _nibble_levels_ggml(x, nmax) if w is None else _weighted_levels(x, w, nmax)
    return pack(_f16_bytes(d), levels.astype(np.uint8))


def q4_0_ref(x, w=None):
    return _nibbles_ref(x, w, 8, _pack_q4_0)


def q5_0_ref(x, w=None):
    return _nibbles_ref(x, w, 16, _pack_q5_0)


# ---- Q4_1 / Q5_1: x ~ d*l + m, l in [0, nmax] --------------------------------------------------


def _offset_ggml(x, nmax):
    """ggml's reference: (d, min) float32 (n_rows, nb), levels (n_rows, nb, 32)."""
    xb = _blocks(x, 32)  # (n_rows, nb, 32)
    lo = xb.min(-1)  # (n_rows, nb) float32
    d = ((xb.max(-1) - lo) / np.float32(nmax)).astype(np.float32)  # (n_rows, nb)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    v = ((xb - lo[..., None]) * inv[..., None] + np.float32(0.5)).astype(
        np.float32
    )  # (n_rows, nb, 32)
    return d, lo, np.minimum(nmax, np.trunc(v)).astype(np.int64)


def _err_offset(x, w, d, m, nmax):
    """(...) sum w err^2 for f16 values d, m (...) with levels rounded to nearest."""
    return _err_affine(x, w, d.astype(np.float64), -m.astype(np.float64), nmax)


def search_offset_ref(x, w, wf, nmax):
    """f16 (d, m) (...) for x, w, wf (..., 32): the grid of legacy.search_offset."""
    from meldlite.compress.quantizers.legacy import ORIGINS, SCALES

    lo, hi = x.min(-1), x.max(-1)  # (...)
    span = hi - lo
    live = span > 0
    sp = np.where(live, span, 1.0)
    sum_w, sum_x = wf.sum(-1), (wf * x).sum(-1)
    with np.errstate(over="ignore"):
        bd, bm = (
            (span / nmax).astype(np.float32).astype(np.float16),
            lo.astype(np.float32).astype(np.float16),
        )
    be = _err_offset(x, w, bd, bm, nmax)
    last_d, last_m = np.full(lo.shape, np.nan, np.float16), np.full(lo.shape, np.nan, np.float16)
    active = live.copy()
    grid = [(lo + t * sp / nmax, (nmax + 0.1 * k) / sp) for t in ORIGINS for k in SCALES]
    for c in range(len(grid) + N_LLOYD):
        if c < len(grid):
            origin, iscale = grid[c]
        else:
            dd = bd.astype(np.float64)
            active &= dd > 0
            origin, iscale = bm.astype(np.float64), _safe_inv(dd, dd > 0)
        l = _round_clamp(iscale[..., None] * (x - origin[..., None]), 0, nmax)  # (..., 32)
        sl, sl2, sxl = (wf * l).sum(-1), (wf * l * l).sum(-1), (wf * l * x).sum(-1)
        det = sum_w * sl2 - sl * sl
        ok = det > 0
        det = np.where(ok, det, 1)
        with np.errstate(over="ignore"):
            hd = ((sum_w * sxl - sum_x * sl) / det).astype(np.float32).astype(np.float16)
            hm = ((sl2 * sum_x - sl * sxl) / det).astype(np.float32).astype(np.float16)
        new = ok & ~(
            (hd.view(np.uint16) == last_d.view(np.uint16))
            & (hm.view(np.uint16) == last_m.view(np.uint16))
        )
        last_d, last_m = np.where(new, hd, last_d), np.where(new, hm, last_m)
        err = np.where(new, _err_offset(x, w, hd, hm, nmax), np.inf)
        better = active & new & (err * TIE < be)
        bd, bm, be = np.where(better, hd, bd), np.where(better, hm, bm), np.where(better, err, be)
        if c >= len(grid):
            active &= better
    return bd, bm


def _offset_ref(x, w, nmax, pack):
    d, lo, levels = _offset_ggml(x, nmax)
    with np.errstate(over="ignore"):
        d, m = d.astype(np.float16), lo.astype(np.float16)  # (n_rows, nb)
    if w is not None:
        xb = _blocks(x, 32).astype(np.float64)  # (n_rows, nb, 32)
        wb = _block_weights(w, xb.shape, 32)  # (n_rows, nb, 32)
        sigma2 = (x.astype(np.float64) ** 2).mean(-1)  # (n_rows,)
        wa = wb * np.sqrt(sigma2[:, None, None] + xb * xb)  # (n_rows, nb, 32)
        cands = [(d, m)]
        for wf in (wb, wa):
            sd, sm = search_offset_ref(xb, wb, wf, nmax)
            cands += [(a, b) for a in _f16_neighbours(sd) for b in _f16_neighbours(sm)]
        errs = np.stack([_err_offset(xb, wb, a, b, nmax) for a, b in cands])  # (19, n_rows, nb)
        pick = first_best(errs)[None]
        d = np.take_along_axis(np.stack([a for a, _ in cands]), pick, axis=0)[0]  # (n_rows, nb)
        m = np.take_along_axis(np.stack([b for _, b in cands]), pick, axis=0)[0]  # (n_rows, nb)
        df, mf = d.astype(np.float64), m.astype(np.float64)
        levels = _round_clamp(
            (xb - mf[..., None]) * _safe_inv(df, df > 0)[..., None], 0, nmax
        ).astype(np.int64)
    return pack(np.concatenate([_f16_bytes(d), _f16_bytes(m)], axis=-1), levels.astype(np.uint8))


def q4_1_ref(x, w=None):
    return _offset_ref(x, w, 15, _pack_q4_0)


def q5_1_ref(x, w=None):
    return _offset_ref(x, w, 31, _pack_q5_0)


# ---- K-quants -----------------------------------------------------------------------------------

QK_K = 256
# as in kquants: (sub, nmax, qmax, fit steps, super candidates, radius) / (nmax, lo, hi, cand, radius)
AFFINE = {
    "Q2_K": (16, 3, 15, 15, 10, 6),
    "Q4_K": (32, 15, 63, 20, 5, 8),
    "Q5_K": (32, 31, 63, 15, 5, 8),
}
SYMMETRIC = {"Q3_K": (4, -32, 31, 6, 8), "Q6_K": (32, -128, 127, 6, 16)}


def _f16(v):
    """Values rounded to f16, as float64."""
    with np.errstate(over="ignore"):
        return np.asarray(v, dtype=np.float32).astype(np.float16).astype(np.float64)


def _safe_inv(v, cond):
    return np.where(cond, 1 / np.where(cond, v, 1), 0.0)


def _update(better, new, old):
    return np.where(better, new, old)


def _err_affine(x, w, s, m, nmax):
    """(...) sum w (x - (s*l - m))^2, l = round((x + m)/s) in [0, nmax]; x, w (..., n); s, m (...)."""
    inv = _safe_inv(s, s > 0)  # (...)
    l = _round_clamp((x + m[..., None]) * inv[..., None], 0, nmax)  # (..., n)
    return (w * (x - (s[..., None] * l - m[..., None])) ** 2).sum(-1)


def _ls_affine(x, w, iscale, lo, nmax, sum_w, sum_x):
    l = _round_clamp(iscale[..., None] * (x - lo[..., None]), 0, nmax)  # (..., n)
    sl, sl2, sxl = (w * l).sum(-1), (w * l * l).sum(-1), (w * l * x).sum(-1)
    det = sum_w * sl2 - sl * sl  # (...)
    ok = det > 0
    det = np.where(ok, det, 1)
    s = (sum_w * sxl - sum_x * sl) / det
    off = (sl2 * sum_x - sl * sxl) / det
    pos = off > 0
    s = np.where(pos, sxl / np.where(sl2 > 0, sl2, 1), s)
    m = -np.where(pos, 0.0, off)
    return s, m, np.where(ok, _err_affine(x, w, s, m, nmax), np.inf)


def fit_affine_ref(x, w, nmax, n_steps):
    """(s, m) (...) for x, w (..., n): x ~ s*l - m, l in [0, nmax], s, m >= 0."""
    lo = np.minimum(x.min(-1), 0.0)  # (...)
    hi = x.max(-1)  # (...)
    sum_w, sum_x = w.sum(-1), (w * x).sum(-1)
    flat = hi <= lo
    span = np.where(flat, 1.0, hi - lo)  # (...)
    best_s, best_m = span / nmax, -lo
    best_err = _err_affine(x, w, best_s, best_m, nmax)
    for k in range(-n_steps, n_steps + 1):
        s, m, err = _ls_affine(x, w, (nmax + 0.1 * k) / span, lo, nmax, sum_w, sum_x)
        better = err * TIE < best_err
        best_s, best_m, best_err = (
            _update(better, s, best_s),
            _update(better, m, best_m),
            _update(better, err, best_err),
        )
    active = np.ones(lo.shape, dtype=bool)
    for _ in range(N_LLOYD):
        active &= best_s > 0
        s, m, err = _ls_affine(x, w, _safe_inv(best_s, best_s > 0), -best_m, nmax, sum_w, sum_x)
        active &= err * TIE < best_err
        best_s, best_m, best_err = (
            _update(active, s, best_s),
            _update(active, m, best_m),
            _update(active, err, best_err),
        )
    return np.where(flat, 0.0, best_s), np.where(flat, -lo, best_m)


def _round_scales(vals, d, lo, hi):
    """(B, n_sub) integers round(vals/d) in [lo, hi] for super-scales d (B,)."""
    return _round_clamp(vals * _safe_inv(d, d != 0)[:, None], lo, hi)


def _affine_total(x, w, nmax, d, ls, dm, lm):
    """(B,) error of super-blocks x, w (B, n_sub, sub) with scales d*ls, mins dm*lm."""
    return _err_affine(x, w, d[:, None] * ls, dm[:, None] * lm, nmax).sum(-1)


def _search_super_ref(x, w, nmax, qmax, vals, n_cand, score):
    """Best f16 super-scale (B,) and its integers (B, n_sub); score(d, ints) -> (B,) error."""
    vmax = vals.max(-1)  # (B,)
    best_d = np.zeros(vmax.shape)  # (B,)
    best_err = np.full(vmax.shape, np.inf)
    best_l = np.zeros(vals.shape)  # (B, n_sub)
    for k in range(-n_cand, n_cand + 1):
        d = np.where(vmax > 0, _f16(vmax / (qmax + 0.1 * k)), 0.0)  # (B,)
        ints = _round_scales(vals, d, 0, qmax)  # (B, n_sub)
        err = score(d, ints)
        better = (err * TIE < best_err) & ((vmax > 0) | (k == -n_cand))
        best_d, best_err, best_l = (
            _update(better, d, best_d),
            _update(better, err, best_err),
            _update(better[:, None], ints, best_l),
        )
    for j in range(vals.shape[1]):  # sub-block j's value -> qmax
        v = vals[:, j] / qmax  # (B,)
        d = _f16(np.where(v > 0, v, 0))  # (B,)
        ints = _round_scales(vals, d, 0, qmax)  # (B, n_sub)
        err = score(d, ints)
        better = (vmax > 0) & (v > 0) & (err * TIE < best_err)
        best_d, best_err, best_l = (
            _update(better, d, best_d),
            _update(better, err, best_err),
            _update(better[:, None], ints, best_l),
        )
    return best_d, best_l


def _neighbours_affine_ref(x, w, nmax, qmax, radius, d, dm, ls, lm):
    ls, lm = ls.copy(), lm.copy()
    for j in range(ls.shape[1]):
        xj, wj = x[:, j], w[:, j]  # (B, sub)
        l0, m0 = ls[:, j].copy(), lm[:, j].copy()  # (B,)
        best = _err_affine(xj, wj, d * l0, dm * m0, nmax)  # (B,)
        for da in range(-radius, radius + 1):
            for db in range(-radius, radius + 1):
                a, b = l0 + da, m0 + db  # (B,)
                ok = (a >= 0) & (a <= qmax) & (b >= 0) & (b <= qmax)
                err = _err_affine(xj, wj, d * a, dm * b, nmax)
                better = ok & (err * TIE < best)
                best = _update(better, err, best)
                ls[:, j], lm[:, j] = _update(better, a, ls[:, j]), _update(better, b, lm[:, j])
    return ls, lm


def _levels_affine(x, d, ls, dm, lm, nmax):
    sc = (d[:, None] * ls)[..., None]  # (B, n_sub, 1)
    m = (dm[:, None] * lm)[..., None]  # (B, n_sub, 1)
    return np.where(sc > 0, _round_clamp((x + m) / np.where(sc > 0, sc, 1), 0, nmax), 0)


def _refit_affine_ref(x, w, nmax, d, ls, dm, lm):
    """Least-squares (d, dmin) (B,) for the current integers, and where it is usable."""
    l = _levels_affine(x, d, ls, dm, lm, nmax)  # (B, n_sub, sub)
    a = ls[..., None] * l  # (B, n_sub, sub)
    b = np.broadcast_to(-lm[..., None], x.shape)  # (B, n_sub, sub)
    saa, sab, sbb = (w * a * a).sum((1, 2)), (w * a * b).sum((1, 2)), (w * b * b).sum((1, 2))
    sxa, sxb = (w * x * a).sum((1, 2)), (w * x * b).sum((1, 2))
    det = saa * sbb - sab * sab  # (B,)
    ok = det > 0
    det = np.where(ok, det, 1)
    d2, dm2 = (sxa * sbb - sxb * sab) / det, (saa * sxb - sab * sxa) / det
    ok &= (d2 >= 0) & (dm2 >= 0)
    return _f16(np.where(ok, d2, 0)), _f16(np.where(ok, dm2, 0)), ok


def affine_super_ref(x, w, wf, sub, nmax, qmax, n_steps, n_cand, radius):
    """x, w, wf (B, 256) -> f16 d, dmin (B,), integer scales, mins (B, n_sub), levels (B, 256),
    error (B,); the sub-block fits use weights wf."""
    B = x.shape[0]
    x, w, wf = (
        x.reshape(B, -1, sub),
        w.reshape(B, -1, sub),
        wf.reshape(B, -1, sub),
    )  # (B, n_sub, sub)
    s, m = fit_affine_ref(x, wf, nmax, n_steps)  # (B, n_sub)
    mmax = m.max(-1)  # (B,)
    dm = np.where(mmax > 0, _f16(mmax / qmax), 0.0)  # (B,)
    lm = _round_scales(m, dm, 0, qmax)  # (B, n_sub)
    d, ls = _search_super_ref(
        x, w, nmax, qmax, s, n_cand, lambda d_, l_: _affine_total(x, w, nmax, d_, l_, dm, lm)
    )
    dm, lm = _search_super_ref(
        x, w, nmax, qmax, m, n_cand, lambda d_, l_: _affine_total(x, w, nmax, d, ls, d_, l_)
    )
    ls, lm = _neighbours_affine_ref(x, w, nmax, qmax, radius, d, dm, ls, lm)
    d2, dm2, ok = _refit_affine_ref(x, w, nmax, d, ls, dm, lm)
    ls2, lm2 = _neighbours_affine_ref(x, w, nmax, qmax, radius, d2, dm2, ls, lm)
    ok &= _affine_total(x, w, nmax, d2, ls2, dm2, lm2) * TIE < _affine_total(
        x, w, nmax, d, ls, dm, lm
    )
    d, dm = _update(ok, d2, d), _update(ok, dm2, dm)
    ls, lm = _update(ok[:, None], ls2, ls), _update(ok[:, None], lm2, lm)
    return (
        d,
        dm,
        ls.astype(np.int64),
        lm.astype(np.int64),
        _levels_affine(x, d, ls, dm, lm, nmax).reshape(B, -1),
        _affine_total(x, w, nmax, d, ls, dm, lm),
    )


def _sym_total(x, w, nmax, d, ls):
    return _err_symmetric(x, w, d[:, None] * ls, nmax).sum(-1)


def _neighbours_sym_ref(x, w, nmax, lo, hi, radius, d, ls):
    ls = ls.copy()
    for j in range(ls.shape[1]):
        l0 = ls[:, j].copy()  # (B,)
        best = _err_symmetric(x[:, j], w[:, j], d * l0, nmax)  # (B,)
        for da in range(-radius, radius + 1):
            a = l0 + da
            err = _err_symmetric(x[:, j], w[:, j], d * a, nmax)
            better = (a >= lo) & (a <= hi) & (err * TIE < best)
            best, ls[:, j] = _update(better, err, best), _update(better, a, ls[:, j])
    return ls


def _levels_sym(x, d, ls, nmax):
    sc = (d[:, None] * ls)[..., None]  # (B, n_sub, 1)
    return np.where(sc != 0, _round_clamp(x / np.where(sc != 0, sc, 1), -nmax, nmax - 1), 0)


def symmetric_super_ref(x, w, wf, nmax, lo, hi, n_cand, radius):
    """x, w, wf (B, 256) -> f16 d (B,), integer scales (B, 16), levels (B, 256) in [0, 2*nmax),
    error (B,); the sub-block fits use weights wf."""
    B = x.shape[0]
    x, w, wf = x.reshape(B, -1, 16), w.reshape(B, -1, 16), wf.reshape(B, -1, 16)  # (B, 16, 16)
    s = fit_symmetric_ref(x, wf, nmax)  # (B, 16)
    smax = _signed_absmax(s)  # (B,)
    live = smax != 0  # (B,)
    best_d, best_err, ls = np.zeros(B), np.full(B, np.inf), np.zeros(s.shape)
    for orient in range(2):
        for k in range(n_cand + 1):
            t = (lo + 0.25 * k) if orient == 0 else (hi - 0.25 * k)
            d = _f16(np.where(live, smax, 0) / t)  # (B,)
            ints = _round_scales(s, d, lo, hi)  # (B, 16)
            err = _sym_total(x, w, nmax, d, ints)
            better = live & (err * TIE < best_err)
            best_d, best_err, ls = (
                _update(better, d, best_d),
                _update(better, err, best_err),
                _update(better[:, None], ints, ls),
            )
    for j in range(s.shape[1]):  # sub-block j's scale -> lo or hi
        for t in (lo, hi):
            d = _f16(s[:, j] / t)  # (B,)
            ints = _round_scales(s, d, lo, hi)  # (B, 16)
            err = _sym_total(x, w, nmax, d, ints)
            better = live & (s[:, j] != 0) & (err * TIE < best_err)
            best_d, best_err, ls = (
                _update(better, d, best_d),
                _update(better, err, best_err),
                _update(better[:, None], ints, ls),
            )
    d = best_d
    ls = _neighbours_sym_ref(x, w, nmax, lo, hi, radius, d, ls)
    l = _levels_sym(x, d, ls, nmax)  # (B, 16, 16)
    a = ls[..., None] * l  # (B, n_sub, sub)
    saa, sxa = (w * a * a).sum((1, 2)), (w * x * a).sum((1, 2))
    ok = saa > 0
    d2 = _f16(np.where(ok, sxa / np.where(ok, saa, 1), 0))  # (B,)
    ok &= np.isfinite(d2)
    d2 = np.where(ok, d2, 0)
    ls2 = _neighbours_sym_ref(x, w, nmax, lo, hi, radius, d2, ls)
    ok &= _sym_total(x, w, nmax, d2, ls2) * TIE < _sym_total(x, w, nmax, d, ls)
    d, ls = _update(ok, d2, d), _update(ok[:, None], ls2, ls)
    return (
        d,
        ls.astype(np.int64),
        (_levels_sym(x, d, ls, nmax) + nmax).astype(np.int64).reshape(B, -1),
        _sym_total(x, w, nmax, d, ls),
    )


def _super_inputs(x, w, sub):
    """x (n_rows, n_cols) -> (B, 256) float64 values and weights (ones in all-zero sub-blocks)."""
    xs = x.reshape(-1, QK_K).astype(np.float64)  # (B, 256)
    ws = _block_weights(w, (x.shape[0], x.shape[1] // sub, sub), sub).reshape(-1, QK_K)  # (B, 256)
    return xs, ws


def _pack_2bit(levels):
    """(B, 256) -> (B, 64): byte 32h + l holds levels 128h + l + 32k at bits 2k."""
    q = levels.reshape(-1, 2, 4, 32) & 3  # (B, h, k, l)
    return (q << (2 * np.arange(4))[None, None, :, None]).sum(2).reshape(-1, 64)


def _scales_k4(ls, lm):
    """(B, 8) 6-bit scales and mins -> (B, 12) bytes as get_scale_min_k4 reads them."""
    out = np.zeros((ls.shape[0], 12), dtype=np.int64)  # (B, 12)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _rows(blocks, n_rows):
    return np.ascontiguousarray(blocks.astype(np.uint8)).reshape(n_rows, -1)


def alt_weights_ref(x, w):
    """(B, 256) fit weights of the second start: w * sqrt(2*mean(x^2) + x^2), as float32."""
    sigma2 = 2 * (x * x).sum(-1, keepdims=True) / x.shape[-1]  # (B, 1)
    return (w * np.sqrt(sigma2 + x * x)).astype(np.float32).astype(np.float64)


def _best_of_two(first, second):
    """Per super-block, the second start's results where its error (last item) is lower."""
    better = second[-1] * TIE < first[-1]  # (B,)
    return [np.where(better.reshape(-1, *[1] * (a.ndim - 1)), b, a) for a, b in zip(first, second)]


def _kquant_affine_ref(name, pack):
    def run(x, w=None):
        sub, nmax, qmax, n_steps, n_cand, radius = AFFINE[name]
        xs, ws = _super_inputs(x, w, sub)
        starts = [
            affine_super_ref(xs, ws, wf, sub, nmax, qmax, n_steps, n_cand, radius)
            for wf in (ws, alt_weights_ref(xs, ws))
        ]
        d, dm, ls, lm, levels, _ = _best_of_two(*starts)
        return _rows(
            pack(_f16_bytes(d), _f16_bytes(dm), ls, lm, levels.astype(np.int64)), x.shape[0]
        )

    return run


def _kquant_symmetric_ref(name, pack):
    def run(x, w=None):
        nmax, lo, hi, n_cand, radius = SYMMETRIC[name]
        xs, ws = _super_inputs(x, w, 16)
        starts = [
            symmetric_super_ref(xs, ws, wf, nmax, lo, hi, n_cand, radius)
            for wf in (ws, alt_weights_ref(xs, ws))
        ]
        d, ls, levels, _ = _best_of_two(*starts)
        return _rows(pack(_f16_bytes(d), ls, levels), x.shape[0])

    return run


def _pack_q2_k(d16, dm16, ls, lm, levels):
    return np.concatenate([ls | (lm << 4), _pack_2bit(levels), d16, dm16], axis=1)


def _pack_q4_k(d16, dm16, ls, lm, levels):
    q = levels.reshape(-1, 4, 2, 32)  # (B, chunk, half, l)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)  # (B, 128)
    return np.concatenate([d16, dm16, _scales_k4(ls, lm), qs], axis=1)


def _pack_q5_k(d16, dm16, ls, lm, levels):
    q = levels.reshape(-1, 4, 2, 32)  # (B, chunk, half, l)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(-1, 128)  # (B, 128)
    shift = (2 * np.arange(4)[:, None] + np.arange(2)[None, :])[None, :, :, None]  # bit 2c + half
    qh = ((q >> 4) << shift).sum((1, 2))  # (B, 32)
    return np.concatenate([d16, dm16, _scales_k4(ls, lm), qh, qs], axis=1)


def _pack_q3_k(d16, ls, levels):
    hmask = ((levels.reshape(-1, 8, 32) >> 2) << np.arange(8)[None, :, None]).sum(1)  # (B, 32)
    q = ls + 32  # (B, 16) 6-bit
    sc = np.zeros((ls.shape[0], 12), dtype=np.int64)  # (B, 12)
    sc[:, :8] = (q[:, :8] & 0xF) | ((q[:, 8:] & 0xF) << 4)
    sc[:, 8:] = ((q >> 4).reshape(-1, 4, 4) << (2 * np.arange(4))[None, :, None]).sum(1)
    return np.concatenate([hmask, _pack_2bit(levels), sc, d16], axis=1)


def _pack_q6_k(d16, ls, levels):
    q = levels.reshape(-1, 2, 4, 32)  # (B, half, k, l): level 128h + 32k + l
    ql = np.concatenate(
        [
            (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
            (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4),
        ],
        axis=2,
    ).reshape(-1, 128)  # (B, 128)
    qh = ((q >> 4) << (2 * np.arange(4))[None, None, :, None]).sum(2).reshape(-1, 64)  # (B, 64)
    return np.concatenate([ql, qh, ls.astype(np.int8).view(np.uint8), d16], axis=1)


q2_k_ref = _kquant_affine_ref("Q2_K", _pack_q2_k)
q4_k_ref = _kquant_affine_ref("Q4_K", _pack_q4_k)
q5_k_ref = _kquant_affine_ref("Q5_K", _pack_q5_k)
q3_k_ref = _kquant_symmetric_ref("Q3_K", _pack_q3_k)
q6_k_ref = _kquant_symmetric_ref("Q6_K", _pack_q6_k)

REFS = {
    T.Q8_0: q8_0_ref,
    T.Q4_0: q4_0_ref,
    T.Q5_0: q5_0_ref,
    T.Q4_1: q4_1_ref,
    T.Q5_1: q5_1_ref,
    T.Q2_K: q2_k_ref,
    T.Q3_K: q3_k_ref,
    T.Q4_K: q4_k_ref,
    T.Q5_K: q5_k_ref,
    T.Q6_K: q6_k_ref,
}
