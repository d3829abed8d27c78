"""Jitted building blocks of the quantizers: f16 encoding and the per-block scale searches.

All searches minimise a weighted squared error sum(w * (x - x_hat)^2) over one block,
with w = 1 (plain RMSE) or the caller's per-column importance. They work in float64.

- `fit_symmetric(x, w, nmax)`: x ~ s*l, l integer in [-nmax, nmax-1]. Candidate inverse
  scales map the largest |x| to -nmax or to nmax-1 (19 steps of 0.1 level around each),
  each followed by the least-squares scale for its levels; the best is then refined by
  alternating rounding and least squares (Lloyd iterations).
- `fit_affine(x, w, nmax)`: x ~ s*l - m, l in [0, nmax], s >= 0, m >= 0. Candidate inverse
  scales over the range [min(x, 0), max(x)], each followed by the weighted least-squares
  (s, m) for its levels, then Lloyd iterations.
Candidates are tried in a fixed order and a later one replaces the best only if it is
better by a factor TIE, so that exact ties (e.g. mirrored scales) do not depend on float
summation order.
- `block_err_symmetric` / `block_err_affine`: the error of given (quantized) scales with
  levels rounded to nearest, which is optimal for fixed scales.
"""

import math

import numpy as np
from numba import njit

EPS = 1e-15  # ggml's GROUP_MAX_EPS: blocks with max |x| below this are all-zero
N_STEPS = 9  # candidate inverse scales at 0.1 level spacing either side of the extreme
N_LLOYD = 4  # rounding / least-squares refinement rounds
FAST = {"reassoc", "contract"}  # lets LLVM vectorise the sums of the inner loops
TIE = 1 + 1e-12  # a later candidate must beat the best by this factor (stable ties)


@njit(cache=True)
def f16_bits(v):
    """float -> IEEE half bits (round to nearest even, +-inf above 65504), as ggml stores it."""
    sign = 0x8000 if math.copysign(1.0, v) < 0 else 0
    a = abs(np.float64(v))
    if a >= 65520.0:
        return sign | 0x7C00
    if a < 2.0**-14:  # subnormal: quantum 2^-24
        return sign | int(np.rint(a * 2.0**24))
    m, e = math.frexp(a)  # a = m * 2^e, m in [0.5, 1)
    mant = int(np.rint(m * 2048.0))  # 11 significant bits, in [1024, 2048]
    if mant == 2048:
        mant = 1024
        e += 1
    if e + 14 >= 31:
        return sign | 0x7C00
    return sign | ((e + 14) << 10) | (mant - 1024)


@njit(cache=True)
def f16_value(h):
    """IEEE half bits -> value (float64)."""
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = m * 2.0**-24
    elif e == 31:
        v = np.inf
    else:
        v = math.ldexp(1024.0 + m, e - 25)
    return -v if h & 0x8000 else v


@njit(cache=True)
def put_f16(dst, off, h):
    dst[off] = h & 0xFF
    dst[off + 1] = (h >> 8) & 0xFF


@njit(cache=True)
def clamp_round(v, lo, hi):
    """Nearest integer to v (ties to even), clamped to [lo, hi]."""
    return min(hi, max(lo, int(np.rint(v))))


@njit(cache=True, inline="always")
def level(v, lo, hi):
    """clamp_round as a float64 (the searches' inner loops)."""
    return min(np.float64(hi), max(np.float64(lo), np.rint(v)))


@njit(cache=True, fastmath=FAST)
def _gain_symmetric(x, w, iscale, nmax):
    """(sum w x l, sum w l^2) for l = round(iscale * x) clamped to [-nmax, nmax-1]."""
    sumlx = 0.0
    suml2 = 0.0
    for i in range(x.shape[0]):
        xi, wi = np.float64(x[i]), np.float64(w[i])
        l = level(iscale * xi, -nmax, nmax - 1)
        sumlx += wi * xi * l
        suml2 += wi * l * l
    return sumlx, suml2


@njit(cache=True)
def fit_symmetric(x, w, nmax):
    """Float scale s (may be negative) minimising sum w (x - s*l)^2, l in [-nmax, nmax-1]."""
    amax = 0.0
    vmax = 0.0
    for v in x:
        if abs(v) > amax:
            amax = abs(v)
            vmax = np.float64(v)
    if amax < EPS:
        return 0.0
    best_s = 0.0
    best_gain = 0.0  # error = sum w x^2 - sumlx^2 / suml2
    for orient in range(2):
        for k in range(-N_STEPS, N_STEPS + 1):
            if orient == 0:
                iscale = -(nmax + 0.1 * k) / vmax  # the extreme goes to -nmax
            else:
                iscale = (nmax - 1 + 0.1 * k) / vmax  # the extreme goes to nmax - 1
            sumlx, suml2 = _gain_symmetric(x, w, iscale, nmax)
            if suml2 > 0 and sumlx * sumlx > best_gain * suml2 * TIE:
                best_gain = sumlx * sumlx / suml2
                best_s = sumlx / suml2
    for _ in range(N_LLOYD):
        if best_s == 0:
            break
        sumlx, suml2 = _gain_symmetric(x, w, 1.0 / best_s, nmax)
        if not (suml2 > 0 and sumlx * sumlx > best_gain * suml2 * TIE):
            break
        best_gain = sumlx * sumlx / suml2
        best_s = sumlx / suml2
    return best_s


@njit(cache=True, fastmath=FAST)
def block_err_symmetric(x, w, s, nmax):
    """sum w (x - s*l)^2 with l = round(x/s) clamped to [-nmax, nmax-1] (l = 0 if s == 0)."""
    err = 0.0
    inv = 1.0 / s if s != 0 else 0.0
    for i in range(x.shape[0]):
        xi = np.float64(x[i])
        l = level(xi * inv, -nmax, nmax - 1)
        diff = xi - s * l
        err += np.float64(w[i]) * diff * diff
    return err


@njit(cache=True, fastmath=FAST)
def level_sums(x, w, iscale, origin, nmax):
    """Levels l = round(iscale*(x - origin)) in [0, nmax]; their weighted sums
    (sum w*l, sum w*l^2, sum w*l*x), the terms of a least-squares fit x ~ s*l + offset."""
    sum_l = 0.0
    sum_l2 = 0.0
    sum_xl = 0.0
    for i in range(x.shape[0]):
        xi, wi = np.float64(x[i]), np.float64(w[i])
        l = level(iscale * (xi - origin), 0, nmax)
        sum_l += wi * l
        sum_l2 += wi * l * l
        sum_xl += wi * l * xi
    return sum_l, sum_l2, sum_xl


@njit(cache=True, fastmath=FAST)
def _ls_affine(x, w, iscale, lo, nmax, sum_w, sum_x):
    """Levels l = round(iscale*(x - lo)) in [0, nmax]; weighted least-squares (s, m) for
    x ~ s*l - m with m >= 0, and its error."""
    sum_l, sum_l2, sum_xl = level_sums(x, w, iscale, lo, nmax)
    det = sum_w * sum_l2 - sum_l * sum_l
    if det <= 0:
        return 0.0, 0.0, np.inf
    s = (sum_w * sum_xl - sum_x * sum_l) / det
    off = (sum_l2 * sum_x - sum_l * sum_xl) / det  # x ~ s*l + off
    if off > 0:
        off = 0.0
        s = sum_xl / sum_l2
    return s, -off, block_err_affine(x, w, s, -off, nmax)


@njit(cache=True, fastmath=FAST)
def block_err_affine(x, w, s, m, nmax):
    """sum w (x - (s*l - m))^2 with l = round((x + m)/s) clamped to [0, nmax] (0 if s == 0)."""
    err = 0.0
    inv = 1.0 / s if s > 0 else 0.0
    for i in range(x.shape[0]):
        xi = np.float64(x[i])
        l = level((xi + m) * inv, 0, nmax)
        diff = xi - (s * l - m)
        err += np.float64(w[i]) * diff * diff
    return err


@njit(cache=True)
def fit_affine(x, w, nmax, n_steps):
    """(s, m) with s >= 0, m >= 0 minimising sum w (x - (s*l - m))^2, l in [0, nmax].

    Candidates: inverse scales (nmax + 0.1*k)/(max - lo), k in [-n_steps, n_steps], with
    lo = min(min(x), 0); each followed by least squares, then Lloyd iterations."""
    lo = 0.0
    hi = np.float64(x[0])
    sum_w = 0.0
    sum_x = 0.0
    for i in range(x.shape[0]):
        xi, wi = np.float64(x[i]), np.float64(w[i])
        lo = min(lo, xi)
        hi = max(hi, xi)
        sum_w += wi
        sum_x += wi * xi
    if hi <= lo:  # constant block <= 0: exact with s = 0
        return 0.0, -lo
    best_s = (hi - lo) / nmax
    best_m = -lo
    best_err = block_err_affine(x, w, best_s, best_m, nmax)
    for k in range(-n_steps, n_steps + 1):
        s, m, err = _ls_affine(x, w, (nmax + 0.1 * k) / (hi - lo), lo, nmax, sum_w, sum_x)
        if err * TIE < best_err:
            best_s, best_m, best_err = s, m, err
    for _ in range(N_LLOYD):
        if best_s <= 0:
            break
        s, m, err = _ls_affine(x, w, 1.0 / best_s, -best_m, nmax, sum_w, sum_x)
        if not err * TIE < best_err:
            break
        best_s, best_m, best_err = s, m, err
    return best_s, best_m


@njit(cache=True)
def block_weights(w, c0, n):
    """w[c0:c0+n], or ones if those weights are all zero (any result would then do; this
    keeps the block sensible)."""
    wb = w[c0 : c0 + n]
    for v in wb:
        if v > 0:
            return wb
    return np.ones(n, dtype=w.dtype)
