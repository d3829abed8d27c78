"""Jitted quantizers of the 32-element block types Q8_0, Q4_0, Q5_0, Q4_1 and Q5_1.

Without importance they are ggml's reference quantizers, byte for byte (`quantize_row_*_ref`
in ggml-quants.c; float32 arithmetic in the same order):
- Q8_0: d = amax/127, q = roundf(x/d) (ties away from zero);
- Q4_0 / Q5_0: d = v/-8 (v/-16) with v the signed value of largest |x|,
  q = min(15, trunc(x/d + 8.5)) (min(31, trunc(x/d + 16.5)));
- Q4_1 / Q5_1 (affine, x ~ d*q + m, q in [0, nmax]): m = min, d = (max - min)/nmax
  (nmax = 15, 31), q = trunc((x - min)/d + 0.5) (never above nmax for finite x).
With importance w (per column), the scale is searched (`fit_symmetric`) to minimise
sum(w * err^2) over the block and rounded to f16; of it, its two f16 neighbours and the
f16 scales that map the extreme value to -nmax (ggml's choice) or nmax-1, the best is
kept, with levels rounded to nearest for the stored scale.
Q4_1 / Q5_1 with importance: `fit_offset` fits (d, m) (m of either sign) twice, with the
weights w and with w * sqrt(sigma2 + x^2) (sigma2 = mean x^2 of the row: ggml's imatrix
weighting); of ggml's reference (d, m) and each fit's f16 (d, m) with their f16
neighbours (3 x 3), the lowest true error sum(w * err^2) is kept.

Each kernel fills `out` (n_rows, row_bytes) uint8 from x (n_rows, n_cols) float32, rows
in parallel; `w` (n_cols,) is the importance, ignored when `weighted` is False.
"""

import math

import numpy as np
from numba import njit, prange

from meldlite.compress.quantizers.search import (
    FAST,
    N_LLOYD,
    TIE,
    block_err_affine,
    block_err_symmetric,
    block_weights,
    clamp_round,
    f16_bits,
    f16_value,
    fit_symmetric,
    level_sums,
    put_f16,
)
from meldlite.kernels._cache import track_sources
from meldlite.kernels.qtypes import Q8_0_BYTES, QK  # QK: values per Q8_0 ... Q5_1 block

# Q4_1/Q5_1 search grid: origins min + t*span/nmax, inverse scales (nmax + 0.1k)/span
ORIGINS = np.arange(-4, 9) * 0.25  # t: from one level below the minimum to two above
SCALES = np.arange(-20, 31)  # k: from 2 levels fewer than nmax to 3 more


@njit(cache=True)
def _absmax(xb):
    """(largest |x|, its signed value) of a block, first occurrence on ties (float32)."""
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for v in xb:
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return amax, vmax


@njit(cache=True)
def _q8_0_ref(xb, blk):
    amax, _ = _absmax(xb)
    d = amax / np.float32(127.0)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    put_f16(blk, 0, f16_bits(d))
    for j in range(QK):
        v = np.float64(xb[j] * inv)  # float32 product, then C roundf
        q = int(math.copysign(math.floor(abs(v) + 0.5), v))
        blk[2 + j] = q & 0xFF


@njit(cache=True)
def _nibbles_ref(xb, nmax, levels):
    """ggml's Q4_0/Q5_0 reference levels in [0, 2*nmax): (d as float32, levels)."""
    _, vmax = _absmax(xb)
    d = vmax / np.float32(-nmax)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    half = np.float32(nmax + 0.5)
    for j in range(QK):
        levels[j] = min(2 * nmax - 1, int(xb[j] * inv + half))  # C truncating cast
    return d


@njit(cache=True)
def _f16_step(h, step):
    """The f16 `step` magnitudes away from f16 bits h (same sign, finite, not below 0)."""
    return (h & 0x8000) | max(0, min(0x7BFF, min(h & 0x7FFF, 0x7BFF) + step))


@njit(cache=True)
def _weighted_levels(xb, wb, nmax, levels):
    """Importance-weighted scale search: (f16 bits of d, levels in [0, 2*nmax))."""
    h = f16_bits(np.float32(fit_symmetric(xb, wb, nmax)))
    best_h, best_err = h, np.inf
    _, vmax = _absmax(xb)
    for c in range(5):  # the rounded scale, its f16 neighbours, the extreme -> -nmax, -> nmax-1
        if c < 3:
            cand = _f16_step(h, (0, -1, 1)[c])
        else:
            cand = f16_bits(vmax / np.float32(-nmax if c == 3 else nmax - 1))
        err = block_err_symmetric(xb, wb, f16_value(cand), nmax)
        if err * TIE < best_err:
            best_h, best_err = cand, err
    d = f16_value(best_h)
    inv = 1.0 / d if d != 0 else 0.0
    for j in range(QK):
        levels[j] = clamp_round(xb[j] * inv, -nmax, nmax - 1) + nmax
    return best_h


@njit(parallel=True, cache=True)
def quantize_q8_0(x, w, weighted, out):
    n_rows, n_cols = x.shape
    for r in prange(n_rows):
        levels = np.empty(QK, dtype=np.int64)  # (32,)
        for b in range(n_cols // QK):
            blk = out[r, Q8_0_BYTES * b : Q8_0_BYTES * (b + 1)]
            xb = x[r, QK * b : QK * (b + 1)]  # (32,)
            if not weighted:
                _q8_0_ref(xb, blk)
                continue
            put_f16(blk, 0, _weighted_levels(xb, block_weights(w, QK * b, QK), 128, levels))
            for j in range(QK):
                blk[2 + j] = (levels[j] - 128) & 0xFF


@njit(cache=True)
def _pack_nibbles(levels, blk, head):
    """The levels (32,) of a block after its `head` bytes of f16 scales (d; d, m):
    4 bits (Q4_0, Q4_1: qs) or 5 (Q5_0, Q5_1: qh as u32, then qs)."""
    qs = blk.shape[0] - 16
    qh = 0
    for j in range(16):
        blk[qs + j] = (levels[j] & 0xF) | ((levels[j + 16] & 0xF) << 4)
        qh |= ((levels[j] >> 4) << j) | ((levels[j + 16] >> 4) << (j + 16))
    if qs > head:
        for k in range(4):
            blk[head + k] = (qh >> (8 * k)) & 0xFF


@njit(parallel=True, cache=True)
def _quantize_nibbles(x, w, weighted, out, nmax):
    n_rows, n_cols = x.shape
    nbytes = out.shape[1] // (n_cols // QK)
    for r in prange(n_rows):
        levels = np.empty(QK, dtype=np.int64)  # (32,)
        for b in range(n_cols // QK):
            blk = out[r, nbytes * b : nbytes * (b + 1)]
            xb = x[r, QK * b : QK * (b + 1)]  # (32,)
            if weighted:
                put_f16(blk, 0, _weighted_levels(xb, block_weights(w, QK * b, QK), nmax, levels))
            else:
                put_f16(blk, 0, f16_bits(_nibbles_ref(xb, nmax, levels)))
            _pack_nibbles(levels, blk, 2)


def quantize_q4_0(x, w, weighted, out):
    _quantize_nibbles(x, w, weighted, out, 8)


def quantize_q5_0(x, w, weighted, out):
    _quantize_nibbles(x, w, weighted, out, 16)


# ---- affine blocks: Q4_1, Q5_1 (x ~ d*q + m) ------------------------------------------------


@njit(cache=True)
def _offset_ref(xb, nmax, levels):
    """ggml's Q4_1/Q5_1 reference levels in [0, nmax]: (d, min) as float32."""
    lo = xb[0]
    hi = xb[0]
    for v in xb:  # first of equal values, as ggml (0.0 / -0.0 sets m's sign)
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    d = (hi - lo) / np.float32(nmax)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    for j in range(QK):
        levels[j] = min(nmax, int((xb[j] - lo) * inv + np.float32(0.5)))  # C truncating cast
    return d, lo


@njit(cache=True, fastmath=FAST)
def _ls_offset(x, w, iscale, origin, nmax, sum_w, sum_x):
    """Levels l = round(iscale*(x - origin)) in [0, nmax]; the weighted least-squares
    (d, m) of x ~ d*l + m for them, and whether they exist (not all levels equal)."""
    sum_l, sum_l2, sum_xl = level_sums(x, w, iscale, origin, nmax)
    det = sum_w * sum_l2 - sum_l * sum_l
    if det <= 0:
        return 0.0, 0.0, False
    return (sum_w * sum_xl - sum_x * sum_l) / det, (sum_l2 * sum_x - sum_l * sum_xl) / det, True


@njit(cache=True)
def _offset_err(xb, wb, hd, hm, nmax):
    """sum w err^2 of the f16 (d, m) (bits), levels rounded to nearest."""
    return block_err_affine(xb, wb, f16_value(hd), -f16_value(hm), nmax)


@njit(cache=True)
def search_offset(xb, wb, wf, nmax):
    """f16 bits (d, m) of x ~ d*l + m, l in [0, nmax], m of either sign, for the least
    sum(wb * err^2) over a grid of level assignments: origins o = min + t*span/nmax,
    t in ORIGINS, times inverse scales (nmax + 0.1k)/span, k in SCALES, levels
    round(iscale*(x - o)); each followed by the least squares (d, m) for those levels
    weighted by wf, scored with (d, m) rounded to f16; then up to N_LLOYD rounds of
    re-rounding and least squares."""
    lo = np.float64(xb[0])
    hi = lo
    sum_w = 0.0
    sum_x = 0.0
    for i in range(QK):
        xi = np.float64(xb[i])
        lo = min(lo, xi)
        hi = max(hi, xi)
        sum_w += np.float64(wf[i])
        sum_x += np.float64(wf[i]) * xi
    span = hi - lo
    best_d, best_m = f16_bits(np.float32(span / nmax)), f16_bits(np.float32(lo))
    best_err = _offset_err(xb, wb, best_d, best_m, nmax)
    if span <= 0:
        return best_d, best_m
    n_grid = len(ORIGINS) * len(SCALES)
    last_d, last_m = -1, -1  # neighbouring grid points often give the same fit
    for c in range(n_grid + N_LLOYD):
        if c < n_grid:
            origin = lo + ORIGINS[c // len(SCALES)] * span / nmax
            iscale = (nmax + 0.1 * SCALES[c % len(SCALES)]) / span
        else:  # Lloyd: the levels of the best so far
            d = f16_value(best_d)
            if d <= 0:
                break
            origin, iscale = f16_value(best_m), 1.0 / d
        d, m, ok = _ls_offset(xb, wf, iscale, origin, nmax, sum_w, sum_x)
        better = False
        hd, hm = f16_bits(np.float32(d)), f16_bits(np.float32(m))
        if ok and (hd != last_d or hm != last_m):
            last_d, last_m = hd, hm
            err = _offset_err(xb, wb, hd, hm, nmax)
            better = err * TIE < best_err
            if better:
                best_d, best_m, best_err = hd, hm, err
        if c >= n_grid and not better:
            break
    return best_d, best_m


@njit(cache=True)
def _weighted_offset(xb, wb, wa, nmax, levels):
    """Importance-weighted (d, m) of a Q4_1/Q5_1 block: (f16 bits of d, of m), levels in
    [0, nmax]. wa (32,): the second fit's weights."""
    d0, m0 = _offset_ref(xb, nmax, levels)
    best_d, best_m = f16_bits(d0), f16_bits(m0)
    best_err = _offset_err(xb, wb, best_d, best_m, nmax)
    for k in range(2):
        hd, hm = search_offset(xb, wb, wb if k == 0 else wa, nmax)
        for a in range(3):  # the search's (d, m) and their f16 neighbours
            cd = _f16_step(hd, (0, -1, 1)[a])
            for b in range(3):
                cm = _f16_step(hm, (0, -1, 1)[b])
                err = _offset_err(xb, wb, cd, cm, nmax)
                if err * TIE < best_err:
                    best_d, best_m, best_err = cd, cm, err
    d, m = f16_value(best_d), f16_value(best_m)
    inv = 1.0 / d if d > 0 else 0.0
    for j in range(QK):
        levels[j] = clamp_round((xb[j] - m) * inv, 0, nmax)
    return best_d, best_m


@njit(parallel=True, cache=True)
def _quantize_offset(x, w, weighted, out, nmax):
    n_rows, n_cols = x.shape
    nbytes = out.shape[1] // (n_cols // QK)
    for r in prange(n_rows):
        levels = np.empty(QK, dtype=np.int64)  # (32,)
        wb = np.empty(QK, dtype=np.float64)  # (32,) the block's importance
        wa = np.empty(QK, dtype=np.float64)  # (32,) ggml's imatrix weighting of it
        sigma2 = 0.0
        for v in x[r]:
            sigma2 += np.float64(v) * v
        sigma2 /= n_cols
        for b in range(n_cols // QK):
            blk = out[r, nbytes * b : nbytes * (b + 1)]
            xb = x[r, QK * b : QK * (b + 1)]  # (32,)
            if weighted:
                wb[:] = block_weights(w, QK * b, QK)
                for j in range(QK):
                    wa[j] = wb[j] * math.sqrt(sigma2 + np.float64(xb[j]) * xb[j])
                hd, hm = _weighted_offset(xb, wb, wa, nmax, levels)
            else:
                d, lo = _offset_ref(xb, nmax, levels)
                hd, hm = f16_bits(d), f16_bits(lo)
            put_f16(blk, 0, hd)
            put_f16(blk, 2, hm)
            _pack_nibbles(levels, blk, 4)


def quantize_q4_1(x, w, weighted, out):
    _quantize_offset(x, w, weighted, out, 15)


def quantize_q5_1(x, w, weighted, out):
    _quantize_offset(x, w, weighted, out, 31)


track_sources(quantize_q8_0, _quantize_nibbles, _quantize_offset)
