"""Jitted quantizers of the 32-element block types Q8_0, Q4_0 and Q5_0.

Without importance they are ggml's reference quantizers, byte for byte (`quantize_row_*_ref`
in ggml-quants.c; float32 arithmetic in the same order):
- Q8_0: d = amax/127, q = roundf(x/d) (ties away from zero);
- Q4_0 / Q5_0: d = v/-8 (v/-16) with v the signed value of largest |x|,
  q = min(15, trunc(x/d + 8.5)) (min(31, trunc(x/d + 16.5))).
With importance w (per column), the scale is searched (`fit_symmetric`) to minimise
sum(w * err^2) over the block and rounded to f16; of it, its two f16 neighbours and the
f16 scales that map the extreme value to -nmax (ggml's choice) or nmax-1, the best is
kept, with levels rounded to nearest for the stored scale.

Each kernel fills `out` (n_rows, row_bytes) uint8 from x (n_rows, n_cols) float32, rows
in parallel; `w` (n_cols,) is the importance, ignored when `weighted` is False.
"""

import math

import numpy as np
from numba import njit, prange

from meldlite.kernels._cache import track_sources
from meldlite.kernels.quantize_search import (block_err_symmetric, block_weights, clamp_round, f16_bits,
                                              f16_value, fit_symmetric, put_f16, TIE)

QK = 32  # elements per block of Q8_0, Q4_0, Q5_0


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
        v = np.float64(xb[j] * inv)                    # float32 product, then C roundf
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
        levels[j] = min(2 * nmax - 1, int(xb[j] * inv + half))   # C truncating cast
    return d


@njit(cache=True)
def _weighted_levels(xb, wb, nmax, levels):
    """Importance-weighted scale search: (f16 bits of d, levels in [0, 2*nmax))."""
    h = f16_bits(np.float32(fit_symmetric(xb, wb, nmax)))
    sign, mag = h & 0x8000, min(h & 0x7FFF, 0x7BFF)
    best_h, best_err = h, np.inf
    _, vmax = _absmax(xb)
    for c in range(5):        # the rounded scale, its f16 neighbours, the extreme -> -nmax, -> nmax-1
        if c < 3:
            cand = sign | max(0, min(0x7BFF, mag + (0, -1, 1)[c]))
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
            blk = out[r, 34 * b:34 * (b + 1)]
            xb = x[r, QK * b:QK * (b + 1)]  # (32,)
            if not weighted:
                _q8_0_ref(xb, blk)
                continue
            put_f16(blk, 0, _weighted_levels(xb, block_weights(w, QK * b, QK), 128, levels))
            for j in range(QK):
                blk[2 + j] = (levels[j] - 128) & 0xFF


@njit(cache=True)
def _pack_nibbles(levels, blk):
    """Q4_0 (18-byte block: d, qs) or Q5_0 (22: d, qh as u32, qs) from levels (32,)."""
    qs = blk.shape[0] - 16
    qh = 0
    for j in range(16):
        blk[qs + j] = (levels[j] & 0xF) | ((levels[j + 16] & 0xF) << 4)
        qh |= ((levels[j] >> 4) << j) | ((levels[j + 16] >> 4) << (j + 16))
    if qs == 6:
        for k in range(4):
            blk[2 + k] = (qh >> (8 * k)) & 0xFF


@njit(parallel=True, cache=True)
def _quantize_nibbles(x, w, weighted, out, nmax):
    n_rows, n_cols = x.shape
    nbytes = out.shape[1] // (n_cols // QK)
    for r in prange(n_rows):
        levels = np.empty(QK, dtype=np.int64)  # (32,)
        for b in range(n_cols // QK):
            blk = out[r, nbytes * b:nbytes * (b + 1)]
            xb = x[r, QK * b:QK * (b + 1)]  # (32,)
            if weighted:
                put_f16(blk, 0, _weighted_levels(xb, block_weights(w, QK * b, QK), nmax, levels))
            else:
                put_f16(blk, 0, f16_bits(_nibbles_ref(xb, nmax, levels)))
            _pack_nibbles(levels, blk)


def quantize_q4_0(x, w, weighted, out):
    _quantize_nibbles(x, w, weighted, out, 8)


def quantize_q5_0(x, w, weighted, out):
    _quantize_nibbles(x, w, weighted, out, 16)


track_sources(quantize_q8_0, _quantize_nibbles)
