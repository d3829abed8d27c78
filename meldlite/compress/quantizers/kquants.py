"""Jitted K-quant quantizers: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (super-blocks of 256).

A super-block holds sub-blocks of 16 or 32 values, each with an integer scale (and, for
the "affine" types Q2_K/Q4_K/Q5_K, an integer min) times one f16 super-scale d (and dmin):
    affine:    x ~ (d*ls_j) * l - (dmin*lm_j),   l in [0, nmax], ls, lm in [0, qmax]
    symmetric: x ~ (d*ls_j) * l,                 l in [-nmax, nmax-1], ls in [lo, hi]
The levels l are rounded to nearest for the stored scales (optimal for fixed scales), so
the search is over the scales only, minimising sum(w * err^2) with w = 1 or the importance:
1. each sub-block's float scale (and min): `fit_affine` / `fit_symmetric`;
2. d: candidates max_scale/(qmax + 0.1*k) and each sub-block's scale/qmax (affine; then
   dmin likewise), or extreme/(lo + 0.25*k), extreme/(hi - 0.25*k) and each sub-block's
   scale/lo and /hi (symmetric), each scored by the true error of the whole super-block
   with its integer scales rounded to nearest;
3. each sub-block's integer scale (and min) within +-radius of its rounded value;
4. least-squares refit of d (and dmin) for the chosen integers, kept if better; step 3 again.
Each super-block is searched twice: with the sub-block fits of step 1 weighted by w, and
by w * sqrt(2*mean(x^2) + x^2) (ggml's imatrix weighting, which favours large values and
finds a different optimum where a few weights dominate); the lower true error is kept.
ggml's own search (make_qkx2/qkx3_quants, make_qp_quants, make_q3_quants) scores a proxy
(weights |x|, x^2 or av_x+|x| without imatrix) and rounds the sub-block scales once.
"""

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from meldlite.compress.quantizers.search import (
    TIE,
    block_err_affine,
    block_err_symmetric,
    block_weights,
    clamp_round,
    f16_bits,
    f16_value,
    fit_affine,
    fit_symmetric,
    put_f16,
)
from meldlite.kernels._cache import track_sources
from meldlite.kernels.qtypes import QK_K

# ---- affine types (Q2_K, Q4_K, Q5_K) ----------------------------------------------------------


@njit(cache=True)
def _affine_err(x, w, sub, nmax, d, ls, dm, lm):
    err = 0.0
    for j in range(ls.shape[0]):
        lo, hi = sub * j, sub * (j + 1)
        err += block_err_affine(x[lo:hi], w[lo:hi], d * ls[j], dm * lm[j], nmax)
    return err


@njit(cache=True)
def _round_scales(vals, d, lo, hi, out):
    inv = 1.0 / d if d != 0 else 0.0
    for j in range(vals.shape[0]):
        out[j] = clamp_round(vals[j] * inv, lo, hi)


@njit(cache=True)
def _search_super(x, w, sub, nmax, qmax, vals, h_other, ls_other, n_cand, is_min, ls, lm):
    """Best f16 super-scale for `vals` (scales, or mins if is_min) with the other one fixed;
    fills ls (or lm) with the rounded integers. Returns (f16 bits, error).
    Candidates: max/(qmax + 0.1k), |k| <= n_cand, then vals[j]/qmax for each sub-block j
    (the larger values are then clipped at qmax, the smaller ones get finer steps)."""
    vmax = vals.max()
    best_h, best_err = 0, np.inf
    tmp = np.zeros(vals.shape[0], dtype=np.int64)  # (n_sub,)
    n_grid = 2 * n_cand + 1
    for c in range(n_grid + vals.shape[0]):
        v = vmax / (qmax + 0.1 * (c - n_cand)) if c < n_grid else vals[c - n_grid] / qmax
        if (vmax <= 0 and c > 0) or (c >= n_grid and not v > 0):
            continue
        h = f16_bits(np.float32(v)) if vmax > 0 else 0
        _round_scales(vals, f16_value(h), 0, qmax, tmp)
        if is_min:
            err = _affine_err(x, w, sub, nmax, f16_value(h_other), ls_other, f16_value(h), tmp)
        else:
            err = _affine_err(x, w, sub, nmax, f16_value(h), tmp, f16_value(h_other), ls_other)
        if err * TIE < best_err:
            best_h, best_err = h, err
            if is_min:
                lm[:] = tmp
            else:
                ls[:] = tmp
    return best_h, best_err


@njit(cache=True)
def _neighbours_affine(x, w, sub, nmax, qmax, radius, d, dm, ls, lm):
    """Each sub-block's (ls, lm) within +-radius, for fixed d, dm."""
    for j in range(ls.shape[0]):
        xj, wj = x[sub * j : sub * (j + 1)], w[sub * j : sub * (j + 1)]
        l0, m0 = ls[j], lm[j]
        best = block_err_affine(xj, wj, d * l0, dm * m0, nmax)
        for a in range(max(0, l0 - radius), min(qmax, l0 + radius) + 1):
            for b in range(max(0, m0 - radius), min(qmax, m0 + radius) + 1):
                err = block_err_affine(xj, wj, d * a, dm * b, nmax)
                if err * TIE < best:
                    best, ls[j], lm[j] = err, a, b


@njit(cache=True)
def _refit_affine(x, w, sub, nmax, d, ls, dm, lm):
    """Least-squares (d, dmin) for the current integers and levels -> f16 bits, or (-1, -1)."""
    saa = sab = sbb = sxa = sxb = 0.0
    for i in range(x.shape[0]):
        j = i // sub
        s, m = d * ls[j], dm * lm[j]
        l = clamp_round((x[i] + m) / s, 0, nmax) if s > 0 else 0
        a, b = np.float64(ls[j] * l), np.float64(-lm[j])  # x ~ d*a + dmin*b
        wi, xi = np.float64(w[i]), np.float64(x[i])
        saa += wi * a * a
        sab += wi * a * b
        sbb += wi * b * b
        sxa += wi * xi * a
        sxb += wi * xi * b
    det = saa * sbb - sab * sab
    if not det > 0:
        return -1, -1
    d_new = (sxa * sbb - sxb * sab) / det
    dm_new = (saa * sxb - sab * sxa) / det
    if d_new < 0 or dm_new < 0:
        return -1, -1
    return f16_bits(np.float32(d_new)), f16_bits(np.float32(dm_new))


@njit(cache=True)
def quantize_affine_super(x, w, wf, sub, nmax, qmax, n_steps, n_cand, radius, ls, lm, levels):
    """One affine super-block: fills ls, lm (n_sub,) and levels (256,); returns f16 (d, dmin)
    and the error. The sub-block fits use weights wf, everything else w."""
    n_sub = QK_K // sub
    s = np.empty(n_sub)  # (n_sub,) sub-block scales
    m = np.empty(n_sub)  # (n_sub,) sub-block mins
    for j in range(n_sub):
        s[j], m[j] = fit_affine(
            x[sub * j : sub * (j + 1)], wf[sub * j : sub * (j + 1)], nmax, n_steps
        )
    mmax = m.max()
    hm = f16_bits(np.float32(mmax / qmax)) if mmax > 0 else 0
    _round_scales(m, f16_value(hm), 0, qmax, lm)
    hd, _ = _search_super(x, w, sub, nmax, qmax, s, hm, lm, n_cand, False, ls, lm)
    hm, _err = _search_super(x, w, sub, nmax, qmax, m, hd, ls, n_cand, True, ls, lm)
    _neighbours_affine(x, w, sub, nmax, qmax, radius, f16_value(hd), f16_value(hm), ls, lm)
    hd2, hm2 = _refit_affine(x, w, sub, nmax, f16_value(hd), ls, f16_value(hm), lm)
    if hd2 >= 0:
        ls2, lm2 = ls.copy(), lm.copy()  # (n_sub,)
        _neighbours_affine(x, w, sub, nmax, qmax, radius, f16_value(hd2), f16_value(hm2), ls2, lm2)
        if _affine_err(
            x, w, sub, nmax, f16_value(hd2), ls2, f16_value(hm2), lm2
        ) * TIE < _affine_err(x, w, sub, nmax, f16_value(hd), ls, f16_value(hm), lm):
            hd, hm = hd2, hm2
            ls[:] = ls2
            lm[:] = lm2
    d, dm = f16_value(hd), f16_value(hm)
    for i in range(QK_K):
        j = i // sub
        sc = d * ls[j]
        levels[i] = clamp_round((x[i] + dm * lm[j]) / sc, 0, nmax) if sc > 0 else 0
    return hd, hm, _affine_err(x, w, sub, nmax, d, ls, dm, lm)


# ---- symmetric types (Q3_K, Q6_K) -------------------------------------------------------------


@njit(cache=True)
def _sym_err(x, w, sub, nmax, d, ls):
    err = 0.0
    for j in range(ls.shape[0]):
        err += block_err_symmetric(
            x[sub * j : sub * (j + 1)], w[sub * j : sub * (j + 1)], d * ls[j], nmax
        )
    return err


@njit(cache=True)
def _neighbours_sym(x, w, sub, nmax, lo, hi, radius, d, ls):
    for j in range(ls.shape[0]):
        xj, wj = x[sub * j : sub * (j + 1)], w[sub * j : sub * (j + 1)]
        l0 = ls[j]
        best = block_err_symmetric(xj, wj, d * l0, nmax)
        for a in range(max(lo, l0 - radius), min(hi, l0 + radius) + 1):
            err = block_err_symmetric(xj, wj, d * a, nmax)
            if err * TIE < best:
                best, ls[j] = err, a


@njit(cache=True)
def _refit_sym(x, w, sub, nmax, d, ls):
    saa = sxa = 0.0
    for i in range(x.shape[0]):
        s = d * ls[i // sub]
        l = clamp_round(x[i] / s, -nmax, nmax - 1) if s != 0 else 0
        a = np.float64(ls[i // sub] * l)
        saa += np.float64(w[i]) * a * a
        sxa += np.float64(w[i]) * np.float64(x[i]) * a
    if not saa > 0:
        return -1
    return f16_bits(np.float32(sxa / saa))


@njit(cache=True)
def quantize_symmetric_super(x, w, wf, sub, nmax, lo, hi, n_cand, radius, ls, levels):
    """One symmetric super-block: fills ls (n_sub,) and levels (256,) in [0, 2*nmax); returns
    f16 d and the error. The sub-block fits use weights wf, everything else w."""
    n_sub = QK_K // sub
    s = np.empty(n_sub)  # (n_sub,) sub-block scales
    for j in range(n_sub):
        s[j] = fit_symmetric(x[sub * j : sub * (j + 1)], wf[sub * j : sub * (j + 1)], nmax)
    smax = 0.0
    for v in s:
        if abs(v) > abs(smax):
            smax = v
    best_h, best_err = 0, np.inf
    tmp = np.zeros(n_sub, dtype=np.int64)  # (n_sub,)
    ls[:] = 0
    if smax != 0:
        for c in range(2 * (n_cand + 1) + 2 * n_sub):
            if c < 2 * (n_cand + 1):  # the extreme scale -> lo + 0.25k or hi - 0.25k
                k = c % (n_cand + 1)
                v = smax / (lo + 0.25 * k) if c <= n_cand else smax / (hi - 0.25 * k)
            else:  # sub-block j's scale -> lo or hi
                j = (c - 2 * (n_cand + 1)) // 2
                v = s[j] / (lo if c % 2 == 0 else hi)
                if s[j] == 0:
                    continue
            h = f16_bits(np.float32(v))
            _round_scales(s, f16_value(h), lo, hi, tmp)
            err = _sym_err(x, w, sub, nmax, f16_value(h), tmp)
            if err * TIE < best_err:
                best_h, best_err = h, err
                ls[:] = tmp
    _neighbours_sym(x, w, sub, nmax, lo, hi, radius, f16_value(best_h), ls)
    h2 = _refit_sym(x, w, sub, nmax, f16_value(best_h), ls)
    if h2 >= 0 and (h2 & 0x7C00) != 0x7C00:
        ls2 = ls.copy()  # (16,)
        _neighbours_sym(x, w, sub, nmax, lo, hi, radius, f16_value(h2), ls2)
        if _sym_err(x, w, sub, nmax, f16_value(h2), ls2) * TIE < _sym_err(
            x, w, sub, nmax, f16_value(best_h), ls
        ):
            best_h = h2
            ls[:] = ls2
    d = f16_value(best_h)
    for i in range(QK_K):
        sc = d * ls[i // sub]
        levels[i] = (clamp_round(x[i] / sc, -nmax, nmax - 1) if sc != 0 else 0) + nmax
    return best_h, _sym_err(x, w, sub, nmax, d, ls)


# ---- packing, as ggml lays the blocks out ------------------------------------------------------


@njit(cache=True)
def _pack_scales_k4(ls, lm, dst):
    """Q4_K/Q5_K 12-byte 6-bit scales and mins (get_scale_min_k4's inverse)."""
    for j in range(4):
        dst[j] = ls[j] & 63
        dst[j + 4] = lm[j] & 63
    for j in range(4, 8):
        dst[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
        dst[j - 4] |= (ls[j] >> 4) << 6
        dst[j] |= (lm[j] >> 4) << 6


@njit(cache=True)
def _pack_2bit(levels, dst):
    """Low 2 bits of 256 levels: byte 32*h + l holds levels 128h + l + 32k at bits 2k."""
    for h in range(2):
        for l in range(32):
            v = 0
            for k in range(4):
                v |= (levels[128 * h + l + 32 * k] & 3) << (2 * k)
            dst[32 * h + l] = v


@njit(cache=True)
def _pack_q2_k(hd, hm, ls, lm, levels, blk):  # scales[16], qs[64], d, dmin
    for j in range(16):
        blk[j] = ls[j] | (lm[j] << 4)
    _pack_2bit(levels, blk[16:80])
    put_f16(blk, 80, hd)
    put_f16(blk, 82, hm)


@njit(cache=True)
def _pack_q4_k(hd, hm, ls, lm, levels, blk):  # d, dmin, scales[12], qs[128]
    put_f16(blk, 0, hd)
    put_f16(blk, 2, hm)
    _pack_scales_k4(ls, lm, blk[4:16])
    for c in range(4):
        for l in range(32):
            blk[16 + 32 * c + l] = levels[64 * c + l] | (levels[64 * c + 32 + l] << 4)


@njit(cache=True)
def _pack_q5_k(hd, hm, ls, lm, levels, blk):  # d, dmin, scales[12], qh[32], qs[128]
    put_f16(blk, 0, hd)
    put_f16(blk, 2, hm)
    _pack_scales_k4(ls, lm, blk[4:16])
    for l in range(32):
        v = 0
        for c in range(4):
            v |= ((levels[64 * c + l] >> 4) << (2 * c)) | (
                (levels[64 * c + 32 + l] >> 4) << (2 * c + 1)
            )
        blk[16 + l] = v
    for c in range(4):
        for l in range(32):
            blk[48 + 32 * c + l] = (levels[64 * c + l] & 0xF) | (
                (levels[64 * c + 32 + l] & 0xF) << 4
            )


@njit(cache=True)
def _pack_q3_k(hd, ls, levels, blk):  # hmask[32], qs[64], scales[12], d
    for m in range(32):
        v = 0
        for k in range(8):
            v |= (levels[32 * k + m] >> 2) << k
        blk[m] = v
    _pack_2bit(levels, blk[32:96])
    sc = blk[96:108]
    sc[:] = 0
    for j in range(16):
        q = ls[j] + 32
        if j < 8:
            sc[j] = q & 0xF
        else:
            sc[j - 8] |= (q & 0xF) << 4
        sc[8 + j % 4] |= (q >> 4) << (2 * (j // 4))
    put_f16(blk, 108, hd)


@njit(cache=True)
def _pack_q6_k(hd, ls, levels, blk):  # ql[128], qh[64], scales[16] int8, d
    for h in range(2):
        for l in range(32):
            q = levels[128 * h + l : 128 * h + l + 97 : 32]  # the 4 levels l, +32, +64, +96
            blk[64 * h + l] = (q[0] & 0xF) | ((q[2] & 0xF) << 4)
            blk[64 * h + l + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4)
            blk[128 + 32 * h + l] = (
                (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6)
            )
    for j in range(16):
        blk[192 + j] = ls[j] & 0xFF
    put_f16(blk, 208, hd)


@njit(cache=True)
def alt_weights(x, w):
    """w * sqrt(sigma2 + x^2), sigma2 = 2*mean(x^2): fit weights that favour large values,
    as ggml's imatrix path uses; the second start of each super-block fits with them."""
    sigma2 = 0.0
    for v in x:
        sigma2 += np.float64(v) * np.float64(v)
    sigma2 = 2 * sigma2 / x.shape[0]
    out = np.empty(x.shape[0], dtype=np.float32)  # (256,)
    for i in range(x.shape[0]):
        out[i] = np.float64(w[i]) * np.sqrt(sigma2 + np.float64(x[i]) * np.float64(x[i]))
    return out


# ---- row kernels ------------------------------------------------------------------------------


@njit(cache=True)
def _weights(w, c0, sub):
    """The super-block's weights, each all-zero sub-block replaced by ones."""
    out = np.empty(QK_K, dtype=np.float32)  # (256,)
    for j in range(QK_K // sub):
        out[sub * j : sub * (j + 1)] = block_weights(w, c0 + sub * j, sub)
    return out


@njit(parallel=True, cache=True)
def _affine_rows(x, w, out, kind, sub, nmax, qmax, n_steps, n_cand, radius):
    n_rows, n_cols = x.shape
    nb = n_cols // QK_K
    nbytes = out.shape[1] // nb
    for r in prange(n_rows):
        ls = np.zeros(QK_K // sub, dtype=np.int64)  # (n_sub,)
        lm = np.zeros(QK_K // sub, dtype=np.int64)  # (n_sub,)
        levels = np.zeros(QK_K, dtype=np.int64)  # (256,)
        ls2, lm2, levels2 = ls.copy(), lm.copy(), levels.copy()  # (n_sub,), (n_sub,), (256,)
        for b in range(nb):
            xs = x[r, QK_K * b : QK_K * (b + 1)]  # (256,)
            ws = _weights(w, QK_K * b, sub)  # (256,)
            hd, hm, err = quantize_affine_super(
                xs, ws, ws, sub, nmax, qmax, n_steps, n_cand, radius, ls, lm, levels
            )
            hd2, hm2, err2 = quantize_affine_super(
                xs,
                ws,
                alt_weights(xs, ws),
                sub,
                nmax,
                qmax,
                n_steps,
                n_cand,
                radius,
                ls2,
                lm2,
                levels2,
            )
            if err2 * TIE < err:
                hd, hm = hd2, hm2
                ls[:] = ls2
                lm[:] = lm2
                levels[:] = levels2
            blk = out[r, nbytes * b : nbytes * (b + 1)]
            if kind == 2:
                _pack_q2_k(hd, hm, ls, lm, levels, blk)
            elif kind == 4:
                _pack_q4_k(hd, hm, ls, lm, levels, blk)
            else:
                _pack_q5_k(hd, hm, ls, lm, levels, blk)


@njit(parallel=True, cache=True)
def _symmetric_rows(x, w, out, kind, nmax, lo, hi, n_cand, radius):
    n_rows, n_cols = x.shape
    nb = n_cols // QK_K
    nbytes = out.shape[1] // nb
    for r in prange(n_rows):
        ls = np.zeros(QK_K // 16, dtype=np.int64)  # (16,)
        levels = np.zeros(QK_K, dtype=np.int64)  # (256,)
        ls2, levels2 = ls.copy(), levels.copy()  # (16,), (256,)
        for b in range(nb):
            xs = x[r, QK_K * b : QK_K * (b + 1)]  # (256,)
            ws = _weights(w, QK_K * b, 16)  # (256,)
            hd, err = quantize_symmetric_super(
                xs, ws, ws, 16, nmax, lo, hi, n_cand, radius, ls, levels
            )
            hd2, err2 = quantize_symmetric_super(
                xs, ws, alt_weights(xs, ws), 16, nmax, lo, hi, n_cand, radius, ls2, levels2
            )
            if err2 * TIE < err:
                hd = hd2
                ls[:] = ls2
                levels[:] = levels2
            blk = out[r, nbytes * b : nbytes * (b + 1)]
            if kind == 3:
                _pack_q3_k(hd, ls, levels, blk)
            else:
                _pack_q6_k(hd, ls, levels, blk)


# (sub-block size, nmax, scale levels, fit steps, super-scale candidates, neighbour radius)
AFFINE = {
    "Q2_K": (16, 3, 15, 15, 10, 6),
    "Q4_K": (32, 15, 63, 20, 5, 8),
    "Q5_K": (32, 31, 63, 15, 5, 8),
}
# (nmax, lowest and highest sub-block scale, super-scale candidates, neighbour radius)
SYMMETRIC = {"Q3_K": (4, -32, 31, 6, 8), "Q6_K": (32, -128, 127, 6, 16)}


def quantize_q2_k(x, w, weighted, out):
    _affine_rows(x, w, out, 2, *AFFINE["Q2_K"])


def quantize_q4_k(x, w, weighted, out):
    _affine_rows(x, w, out, 4, *AFFINE["Q4_K"])


def quantize_q5_k(x, w, weighted, out):
    _affine_rows(x, w, out, 5, *AFFINE["Q5_K"])


def quantize_q3_k(x, w, weighted, out):
    _symmetric_rows(x, w, out, 3, *SYMMETRIC["Q3_K"])


def quantize_q6_k(x, w, weighted, out):
    _symmetric_rows(x, w, out, 6, *SYMMETRIC["Q6_K"])


KERNELS = {
    T.Q2_K: quantize_q2_k,
    T.Q3_K: quantize_q3_k,
    T.Q4_K: quantize_q4_k,
    T.Q5_K: quantize_q5_k,
    T.Q6_K: quantize_q6_k,
}

track_sources(_affine_rows, _symmetric_rows)
