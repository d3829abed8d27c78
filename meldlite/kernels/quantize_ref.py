"""Plain NumPy references of the jitted quantizers (slow; tests compare the kernels with them).

Written vectorised over blocks, from the algorithm descriptions in quantize_search.py,
quantize_legacy.py and quantize_kquants.py, sharing no code with them; f16 rounding is
NumPy's. Each `*_ref(x, w)` takes x (n_rows, n_cols) float32 and w (n_cols,) float32 or
None and returns (n_rows, row_bytes) uint8.
"""

import numpy as np

EPS = 1e-15
N_STEPS = 9
N_LLOYD = 4
TIE = 1 + 1e-12


def first_best(errs):
    """Index along axis 0 of the best error, a later one winning only if better by TIE."""
    pick = np.zeros(errs.shape[1:], dtype=np.int64)
    best = errs[0]
    for i in range(1, errs.shape[0]):
        better = errs[i] * TIE < best
        pick = np.where(better, i, pick)
        best = np.where(better, errs[i], best)
    return pick


def _f16_bytes(d) -> np.ndarray:
    """(...) values -> (..., 2) uint8 of their f16 (nearest even)."""
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(np.asarray(d, dtype=np.float32).astype(np.float16)).view(np.uint8).reshape(
            *np.shape(d), 2)


def _blocks(x, n):
    """x (n_rows, n_cols) -> (n_rows, n_blocks, n)."""
    return x.reshape(x.shape[0], -1, n)


def _block_weights(w, shape, n):
    """Per-element weights (n_rows, n_blocks, n): w per column, ones where a block's are all 0."""
    if w is None:
        return np.ones(shape, dtype=np.float64)
    wb = np.broadcast_to(w.astype(np.float64).reshape(1, -1, n), shape).copy()
    wb[wb.sum(-1) == 0] = 1.0
    return wb


def _signed_absmax(xb):
    """Signed value of the largest |x| per block (first on ties) (...,)."""
    i = np.argmax(np.abs(xb), axis=-1)
    return np.take_along_axis(xb, i[..., None], axis=-1)[..., 0]


# ---- ggml's reference quantizers (no importance) --------------------------------------------

def q8_0_ggml_ref(x):
    xb = _blocks(x, 32)  # (n_rows, nb, 32)
    d = np.abs(xb).max(-1) / np.float32(127)  # (n_rows, nb) float32
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    v = (xb * inv[..., None]).astype(np.float64)  # (n_rows, nb, 32)
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)  # roundf: ties away from zero
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=-1).reshape(x.shape[0], -1)


def _nibble_levels_ggml(x, nmax):
    xb = _blocks(x, 32)  # (n_rows, nb, 32)
    d = (_signed_absmax(xb) / np.float32(-nmax)).astype(np.float32)  # (n_rows, nb)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), np.float32(0)).astype(np.float32)
    v = (xb * inv[..., None] + np.float32(nmax + 0.5)).astype(np.float32)  # (n_rows, nb, 32)
    return d, np.minimum(2 * nmax - 1, np.trunc(v)).astype(np.uint8)


def _pack_q4_0(d16, levels):
    qs = levels[..., :16] | (levels[..., 16:] << 4)  # (n_rows, nb, 16)
    return np.concatenate([d16, qs], axis=-1).reshape(levels.shape[0], -1)


def _pack_q5_0(d16, levels):
    qs = (levels[..., :16] & 0xF) | ((levels[..., 16:] & 0xF) << 4)  # (n_rows, nb, 16)
    bits = (levels >> 4).astype(np.uint64) << np.arange(32, dtype=np.uint64)  # (n_rows, nb, 32)
    qh = bits.sum(-1).astype("<u4")[..., None].view(np.uint8)  # (n_rows, nb, 4)
    return np.concatenate([d16, qh, qs], axis=-1).reshape(levels.shape[0], -1)


# ---- importance-weighted symmetric scale search -----------------------------------------------

def _round_clamp(v, lo, hi):
    return np.clip(np.rint(v), lo, hi)


def fit_symmetric_ref(xb, wb, nmax):
    """(...) best float scales for xb (..., n) ~ s*l, l in [-nmax, nmax-1]."""
    x = xb.astype(np.float64)
    vmax = _signed_absmax(x)  # (...)
    live = np.abs(vmax) >= EPS
    vsafe = np.where(live, vmax, 1.0)
    k = np.arange(-N_STEPS, N_STEPS + 1)
    steps = np.concatenate([-(nmax + 0.1 * k), nmax - 1 + 0.1 * k])  # (n_cand,)
    iscales = steps.reshape(-1, *[1] * vsafe.ndim) / vsafe[None]  # (n_cand, ...)
    best_s = np.zeros(vmax.shape)
    best_gain = np.zeros(vmax.shape)
    for isc in iscales:                                     # in the kernel's candidate order
        l = _round_clamp(isc[..., None] * x, -nmax, nmax - 1)
        slx = (wb * x * l).sum(-1)
        sl2 = (wb * l * l).sum(-1)
        better = (sl2 > 0) & (slx * slx > best_gain * sl2 * TIE)
        best_gain = np.where(better, slx * slx / np.where(sl2 > 0, sl2, 1), best_gain)
        best_s = np.where(better, slx / np.where(sl2 > 0, sl2, 1), best_s)
    active = best_s != 0
    for _ in range(N_LLOYD):
        inv = np.where(active, 1 / np.where(best_s != 0, best_s, 1), 0)
        l = _round_clamp(inv[..., None] * x, -nmax, nmax - 1)
        slx = (wb * x * l).sum(-1)
        sl2 = (wb * l * l).sum(-1)
        active &= (sl2 > 0) & (slx * slx > best_gain * sl2 * TIE)
        safe = np.where(sl2 > 0, sl2, 1)
        best_gain = np.where(active, slx * slx / safe, best_gain)
        best_s = np.where(active, slx / safe, best_s)
    return np.where(live, best_s, 0.0)


def _err_symmetric(x, w, s, nmax):
    """(...) sum w (x - s*l)^2 with l rounded to nearest for scales s (...)."""
    inv = np.where(s != 0, 1 / np.where(s != 0, s, 1), 0)
    l = _round_clamp(x * inv[..., None], -nmax, nmax - 1)
    return (w * (x - s[..., None] * l) ** 2).sum(-1)


def _f16_neighbours(d):
    """(3, ...) float16: d rounded to f16, then the next smaller and larger magnitudes."""
    h = np.asarray(d, dtype=np.float32).astype(np.float16)
    mag = np.abs(h).view(np.uint16).astype(np.int32)
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
    cands = _f16_neighbours(fit_symmetric_ref(xb, wb, nmax))  # (3, n_rows, nb)
    errs = np.stack([_err_symmetric(xb, wb, c.astype(np.float64), nmax) for c in cands])  # (3, n_rows, nb)
    pick = first_best(errs)
    d = np.take_along_axis(cands, pick[None], axis=0)[0]  # (n_rows, nb) float16
    df = d.astype(np.float64)
    inv = np.where(df != 0, 1 / np.where(df != 0, df, 1), 0)
    levels = _round_clamp(xb * inv[..., None], -nmax, nmax - 1) + nmax
    return d, levels.astype(np.int64)


def q8_0_ref(x, w=None):
    if w is None:
        return q8_0_ggml_ref(x)
    d, levels = _weighted_levels(x, w, 128)
    q = (levels - 128).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=-1).reshape(x.shape[0], -1)


def _nibbles_ref(x, w, nmax, pack):
    d, levels = _nibble_levels_ggml(x, nmax) if w is None else _weighted_levels(x, w, nmax)
    return pack(_f16_bytes(d), levels.astype(np.uint8))


def q4_0_ref(x, w=None):
    return _nibbles_ref(x, w, 8, _pack_q4_0)


def q5_0_ref(x, w=None):
    return _nibbles_ref(x, w, 16, _pack_q5_0)
