"""Integer dot products against 8-bit activations, as llama.cpp's CPU matmuls compute them.

llama.cpp quantizes the activations before a quantized matmul (see actquant.py) and then
takes integer dot products of the weight codes with the 8-bit activation codes, scaled per
block. Here the same: `quantize_rows` turns x (T, n) float32 into `Acts` arrays,

    qa (T, n) int8       activation codes,
    da (T, n/32) f32     one scale per 32 (Q8_0: f16-rounded amax/127) or per 256 (Q8_K: 1/iscale),
    bs (T, n/32) int32   sum of the codes of each 32-block (for the K-quant mins); for Q8_1
                         (Q4_1, Q5_1) the float32 bits of block_q8_1's s = f16(d * sum),
    xr (T, n) f32        the rounded values qa*da (or x rounded to f16 for F16 weights),

and `dot_row` multiplies one weight row by one token. A Q4_K row against Q8_K activations:

    sum_b  da_b * ( d_b * sum_j sc_bj * S_bj  -  dmin_b * sum_j m_bj * bs_bj ),
    S_bj = sum_l q_bjl * qa_bjl   (int32; j = 32-value sub-block)

which equals the float product of the dequantized weights with xr up to float rounding
(integer sums are exact, the float steps are fewer). Q4_K, Q5_K, Q6_K, Q2_K, Q3_K,
IQ4_XS (Q8_K activations), Q8_0, Q4_0, Q5_0, IQ4_NL (Q8_0), Q4_1, Q5_1 (Q8_1: Q8_0's codes,
and per block s = f16(d * sum of codes) for the weights' min, m * s, as llama.cpp's
block_q8_1 keeps it; bs holds its float32 bits) have integer kernels, and MXFP4
(gpt-oss's experts: E2M1 codes doubled to int8 by a table, the block's E8M0 scale halved,
as ggml's vec_dot_mxfp4_q8_0); each follows ggml's vec_dot_<type>_q8_<K|0>: int32 sums per
(sub-)block, float scaling per block, block by block. A row of Q2_K against token k:

    sum_b  da_b * ( d_b * sum_i (sc_bi & 15) * S_bi  -  dmin_b * sum_i (sc_bi >> 4) * A_bi ),
    S_bi = sum_l q_bil * qa_bil,  A_bi = sum_l qa_bil   (i = group of 16 values)

F16 and F32 rows use float lanes; BF16 (and every type when the activations stay float)
decodes the row into float (decode.decode_span) and dots it with xr.

Each output (token, row) is one call of the same row function with a fixed operation order,
so results do not depend on thread count, batch size or which rows share a chunk.
For two tokens or more, Q4_K, Q6_K and Q8_0 take token tiles instead (`tiles_q4_k` ...):
each block is unpacked once for up to TILE tokens (simd's *_tile intrinsics) and each
token's float steps are the row function's, in its order, so the bits are the same.

Every type here (the K-quants, IQ4_XS, IQ4_NL, MXFP4, Q4_0, Q5_0, Q4_1, Q5_1, Q8_0) takes
its per-block integer sums from simd.py (LLVM vector code: vpmaddubsw/vpmaddwd on x86) and
does the float steps here, block by block in order (Q8_0's row kernel has simd add four
blocks' terms in that order: q8_0_acc4). Loops that Numba vectorizes on its own
(dot_lanes16) run to a *runtime* length `L` (passed in) because loops with
constant trip counts are fully unrolled before the loop vectorizer sees them and then stay
scalar.
"""

import numpy as np
from numba import njit, prange

from meldlite.kernels._cache import track_sources
from meldlite.kernels.actquant import (
    NONE,
    _f16_round,
    mode_of,
    round_row,
)
from meldlite.kernels.actquant import (
    Q8_0 as MODE_Q8_0,
)
from meldlite.kernels.actquant import (
    Q8_1 as MODE_Q8_1,
)
from meldlite.kernels.actquant import (
    Q8_K as MODE_Q8_K,
)
from meldlite.kernels.bits import e8m0_to_f32_half, f16_to_f32
from meldlite.kernels.decode import decode_span
from meldlite.kernels.matmul import operands
from meldlite.kernels.qtypes import (
    F16,
    F32,
    IQ4_NL,
    IQ4_NL_BYTES,
    IQ4_XS,
    IQ4_XS_BYTES,
    MXFP4,
    MXFP4_BYTES,
    Q2_K,
    Q2_K_BYTES,
    Q3_K,
    Q3_K_BYTES,
    Q4_0,
    Q4_0_BYTES,
    Q4_1,
    Q4_1_BYTES,
    Q4_K,
    Q4_K_BYTES,
    Q5_0,
    Q5_0_BYTES,
    Q5_1,
    Q5_1_BYTES,
    Q5_K,
    Q5_K_BYTES,
    Q6_K,
    Q6_K_BYTES,
    Q8_0,
    Q8_0_BYTES,
    QK,
    QK_K,
)
from meldlite.kernels.simd import (
    F16C,
    f16_hw,
    iq4nl_sum1,
    iq4nl_sums4,
    iq4xs_sum,
    mxfp4_sum1,
    mxfp4_sums4,
    q2k_sums,
    q3k_sum,
    q4_0_sum1,
    q4_0_sums4,
    q4_1_sum1,
    q4_1_sums4,
    q4k_sums,
    q4k_tile,
    q5_0_sum1,
    q5_0_sums4,
    q5_1_sum1,
    q5_1_sums4,
    q5k_sums,
    q6k_sum,
    q6k_tile,
    q8_0_acc4,
    q8_0_sum1,
    q8_0_tile,
    u16_at,
)

INT_TYPES = (
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
    MXFP4,
)  # ggml type ids with integer kernels
CHUNK = 16  # rows per parallel work item
TILE = 8  # tokens per unpacked block in the tiled kernels (their codes stay in L1)


# ---------------------------------------------------------------- activations


@njit(nogil=True, error_model="numpy")
def _q8_1_s_bits(d, s):
    """The float32 bits (int32) of block_q8_1's s = f16(d * s) for the code sum s."""
    return np.float32(_f16_round(d * np.float32(s))).view(np.int32)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_q8_0_row(x, qa, da, bs, q8_1):
    """One row as Q8_0 blocks of 32 (the x86 rounding of actquant: round-half-even); bs
    gets each block's code sum, or with `q8_1` the float32 bits of block_q8_1's s =
    f16(d * sum) with d = amax/127 unrounded (llama.cpp's quantize_row_q8_1)."""
    for b in range(x.shape[0] // QK):
        amax = np.float32(0.0)
        for j in range(QK * b, QK * b + QK):
            amax = max(amax, abs(x[j]))
        d = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
        da[b] = _f16_round(d)
        s = 0
        for j in range(QK * b, QK * b + QK):
            q = np.int32(np.rint(x[j] * inv))
            qa[j] = q
            s += q
        bs[b] = _q8_1_s_bits(d, s) if q8_1 else s


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_q8_k_row(x, qa, da, bs):
    """One row as Q8_K blocks of 256: iscale = -127/max (signed), q = min(127, rint)."""
    for b in range(x.shape[0] // QK_K):
        amax, mx = np.float32(0.0), np.float32(0.0)
        for j in range(QK_K * b, QK_K * b + QK_K):
            if abs(x[j]) > amax:
                amax, mx = abs(x[j]), x[j]
        if amax == 0:
            da[b] = 0.0
            for j in range(QK_K * b, QK_K * b + QK_K):
                qa[j] = 0
        else:
            iscale = np.float32(-127.0) / mx
            da[b] = np.float32(1.0) / iscale
            for j in range(QK_K * b, QK_K * b + QK_K):
                qa[j] = np.int32(min(np.float32(127.0), np.rint(iscale * x[j])))
        for s in range(8 * b, 8 * b + 8):
            t = 0
            for j in range(QK * s, QK * s + QK):
                t += qa[j]
            bs[s] = t


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_row(x, mode, qa, da, bs, xr):
    """Fill one token's activation arrays for `mode` (actquant's modes)."""
    n = x.shape[0]
    if (mode == MODE_Q8_0 or mode == MODE_Q8_1) and n % QK == 0:
        quantize_q8_0_row(x, qa, da, bs, mode == MODE_Q8_1)
        for j in range(n):
            xr[j] = np.float32(qa[j]) * da[j // QK]
    elif mode == MODE_Q8_K and n % QK_K == 0:
        quantize_q8_k_row(x, qa, da, bs)
        for j in range(n):
            xr[j] = np.float32(qa[j]) * da[j // QK_K]
    else:
        round_row(x, mode, xr)


@njit(cache=True, nogil=True, error_model="numpy")
def quantize_rows(x, mode, qa, da, bs, xr):
    """x (T, n) float32 -> qa (T, n) int8, da (T, n/32), bs (T, n/32), xr (T, n)."""
    for t in range(x.shape[0]):
        quantize_row(x[t], mode, qa[t], da[t], bs[t], xr[t])


def empty_acts(n_tok, n):
    """Uninitialised activation arrays (qa, da, bs, xr) for n_tok rows of n values."""
    nb = max(1, n // QK)
    return (
        np.empty((n_tok, n), np.int8),
        np.empty((n_tok, nb), np.float32),
        np.empty((n_tok, nb), np.int32),
        np.empty((n_tok, n), np.float32),
    )


# ---------------------------------------------------------------- row kernels


@njit(inline="always")
def _f16(w, o):
    """The float16 at byte o of w as float32 (one F16C instruction where the CPU has it)."""
    if F16C:
        return f16_hw(w, o)
    return f16_to_f32(np.uint32(u16_at(w, o)))


@njit(inline="always")
def _f16_flat(w, o):
    """The float16 at flat byte o of w, converted from its bits in code (as _f16_bits)."""
    return f16_to_f32(np.uint32(u16_at(w, o)))


@njit(inline="always")
def _f16_bits(row, o):
    """The float16 at row[o:o+2] of a 1-D row, converted from its bits in code."""
    return f16_to_f32(np.uint32(row[o]) | (np.uint32(row[o + 1]) << np.uint32(8)))


# Row r of a matrix w (n_rows, row_bytes) . token k of activations qa (T, n) int8,
# da (T, n/32) float32, bs (T, n/32) int32: block by block, the integer sums from simd.py,
# the float steps here in block order. Flat offsets instead of slices (no reference counts).


@njit(cache=True, nogil=True, error_model="numpy")
def dot_q4_k(w, r, qa, da, bs, k, nb):
    """Q4_K row (nb super-blocks of Q4_K_BYTES) . Q8_K activations."""
    sumf = np.float32(0.0)
    ow, oa, ob = r * w.shape[1], k * qa.shape[1], k * bs.shape[1]
    for b in range(nb):
        o = ow + Q4_K_BYTES * b
        isum, msum = q4k_sums(w, o, qa, oa + QK_K * b, bs, ob + QK_K // QK * b)
        d = da[k, b]
        sumf += _f16(w, o) * d * np.float32(isum) - _f16(w, o + 2) * d * np.float32(msum)
    return sumf


@njit(cache=True, nogil=True, error_model="numpy")
def dot_q6_k(w, r, qa, da, k, nb):
    """Q6_K row (nb super-blocks of Q6_K_BYTES) . Q8_K activations."""
    sumf = np.float32(0.0)
    ow, oa = r * w.shape[1], k * qa.shape[1]
    for b in range(nb):
        o = ow + Q6_K_BYTES * b
        d = _f16(w, o + Q6_K_BYTES - 2)  # the f16 scale ends the block
        sumf += d * da[k, b] * np.float32(q6k_sum(w, o, qa, oa + QK_K * b))
    return sumf


@njit(inline="always")
def _q8_k_row(w, t, r, qa, da, bs, k, nb):
    """Row r of a Q5_K, Q2_K, Q3_K or IQ4_XS matrix (type t, nb super-blocks) . Q8_K
    activations: per block d * da * isum - dmin * da * msum (dot_q4_k's steps; ggml's
    vec_dot_*_q8_K) with the block's sums from simd; types without mins have msum = 0.
    d, dmin: f16 at bytes 0, 2 (Q5_K), 80, 82 (Q2_K), 108 (Q3_K), 0 (IQ4_XS)."""
    sumf = np.float32(0.0)
    nbytes = Q5_K_BYTES if t == Q5_K else Q2_K_BYTES if t == Q2_K else Q3_K_BYTES
    nbytes = IQ4_XS_BYTES if t == IQ4_XS else nbytes
    ow, oa, ob = r * w.shape[1], k * qa.shape[1], k * bs.shape[1]
    for b in range(nb):
        o = ow + nbytes * b
        p = oa + QK_K * b
        msum, mw = np.int32(0), np.float32(0.0)
        if t == Q5_K:
            isum, msum = q5k_sums(w, o, qa, p, bs, ob + QK_K // QK * b)
            dw, mw = _f16(w, o), _f16(w, o + 2)
        elif t == Q2_K:
            isum, msum = q2k_sums(w, o, qa, p)
            dw, mw = _f16(w, o + 80), _f16(w, o + 82)
        elif t == Q3_K:
            isum, dw = q3k_sum(w, o, qa, p), _f16(w, o + 108)
        else:
            isum, dw = iq4xs_sum(w, o, qa, p), _f16(w, o)
        d = da[k, b]
        sumf += dw * d * np.float32(isum) - mw * d * np.float32(msum)
    return sumf


@njit(inline="always")
def _sums(w, t, o, qa, p, four):
    """The integer sums of four blocks (or of one: (s, 0, 0, 0)) of a _blocks32_row type at
    w's flat byte o against qa[p:]."""
    z = np.int32(0)
    if t == IQ4_NL:
        return iq4nl_sums4(w, o, qa, p) if four else (iq4nl_sum1(w, o, qa, p), z, z, z)
    if t == MXFP4:
        return mxfp4_sums4(w, o, qa, p) if four else (mxfp4_sum1(w, o, qa, p), z, z, z)
    if t == Q4_0:
        return q4_0_sums4(w, o, qa, p) if four else (q4_0_sum1(w, o, qa, p), z, z, z)
    if t == Q5_0:
        return q5_0_sums4(w, o, qa, p) if four else (q5_0_sum1(w, o, qa, p), z, z, z)
    if t == Q4_1:
        return q4_1_sums4(w, o, qa, p) if four else (q4_1_sum1(w, o, qa, p), z, z, z)
    return q5_1_sums4(w, o, qa, p) if four else (q5_1_sum1(w, o, qa, p), z, z, z)


@njit(inline="always")
def _term32(w, t, r, o, c, s, da, bs, k, b):
    """Block b's float term: scale * da * s, plus m * s_q8_1 for Q4_1 / Q5_1 (ggml's
    vec_dot_q4_1_q8_1); the scale is f16 at byte 0, or MXFP4's E8M0 2^(e-128) (w[r, c])."""
    if t == MXFP4:
        return e8m0_to_f32_half(w[r, c]) * da[k, b] * np.float32(s)
    if t == IQ4_NL or t == Q4_0 or t == Q5_0:
        return _f16(w, o) * da[k, b] * np.float32(s)
    return _f16(w, o) * da[k, b] * np.float32(s) + _f16(w, o + 2) * _q8_1_s(bs, k, b)


@njit(inline="always")
def _blocks32_row(w, t, r, qa, da, bs, k, nb):
    """Row r of a Q4_0, Q5_0, IQ4_NL, MXFP4 (Q8_0 activations), Q4_1 or Q5_1 (Q8_1) matrix
    (type t, nb blocks of 32) . token k: four blocks' sums per simd call, then each block's
    float term (_term32) in block order."""
    sumf = np.float32(0.0)
    nbytes = IQ4_NL_BYTES if t == IQ4_NL else MXFP4_BYTES if t == MXFP4 else Q4_1_BYTES
    nbytes = Q5_1_BYTES if t == Q5_1 else Q4_0_BYTES if t == Q4_0 else nbytes
    nbytes = Q5_0_BYTES if t == Q5_0 else nbytes
    ow, oa = r * w.shape[1], k * qa.shape[1]
    n4 = nb - nb % 4
    for b in range(0, n4, 4):
        o = ow + nbytes * b
        s4 = _sums(w, t, o, qa, oa + QK * b, True)
        for j in range(4):
            c = nbytes * (b + j)
            sumf += _term32(w, t, r, ow + c, c, s4[j], da, bs, k, b + j)
    for b in range(n4, nb):
        c = nbytes * b
        s = _sums(w, t, ow + c, qa, oa + QK * b, False)[0]
        sumf += _term32(w, t, r, ow + c, c, s, da, bs, k, b)
    return sumf


@njit(cache=True, nogil=True, error_model="numpy")
def rows_typed(w, t, r0, r1, qa, da, bs, toks, out, nk, n32):
    """out[i, r] = row r . token toks[i] for r in [r0, r1), for the types of _q8_k_row (nk
    super-blocks per row) and _blocks32_row (n32 blocks), t a runtime value (a copy of the
    loops per type with t a constant ran no faster and made qdot's first compile 143 s of
    CPU instead of 38)."""
    for r in range(r0, r1):
        for i in range(toks.shape[0]):
            if _q8_k_type(t):
                out[i, r] = _q8_k_row(w, t, r, qa, da, bs, toks[i], nk)
            else:
                out[i, r] = _blocks32_row(w, t, r, qa, da, bs, toks[i], n32)


@njit(cache=True, nogil=True, error_model="numpy")
def dot_q8_0(w, r, qa, da, k, nb):
    """Q8_0 row (nb blocks of Q8_0_BYTES: d f16, qs[32]) . Q8_0 activations: per block
    sumf += d_w * d_a * s in block order, four blocks per simd call."""
    sumf = np.float32(0.0)
    ow, oa, od = r * w.shape[1], k * qa.shape[1], k * da.shape[1]
    n4 = nb - nb % 4
    for b in range(0, n4, 4):
        sumf = q8_0_acc4(w, ow + Q8_0_BYTES * b, qa, oa + QK * b, da, od + b, sumf)
    for b in range(n4, nb):
        o = ow + Q8_0_BYTES * b
        sumf += _f16_flat(w, o) * da[k, b] * np.float32(q8_0_sum1(w, o, qa, oa + QK * b))
    return sumf


@njit(inline="always")
def _q8_1_s(bs, k, b):
    """block_q8_1's s of token k's block b (qdot stores its float32 bits in bs)."""
    return np.int32(bs[k, b]).view(np.float32)


@njit(inline="always")
def _f16_bits_to_f32(h):
    """f16 bits (uint32) -> float32, branch-free (vectorizable), exact incl. inf/NaN."""
    em = h & np.uint32(0x7FFF)
    f = np.uint32(em << np.uint32(13)).view(np.float32) * np.float32(2.0**112)
    if em >= np.uint32(0x7C00):
        f = np.uint32((em << np.uint32(13)) | np.uint32(0x7F800000)).view(np.float32)
    return -f if h & np.uint32(0x8000) else f


@njit(inline="always")
def _f16w(row, i):
    return _f16_bits_to_f32(np.uint32(row[2 * i]) | (np.uint32(row[2 * i + 1]) << np.uint32(8)))


@njit(cache=True, nogil=True, error_model="numpy")
def f16_row_to_f32(row, n, out):
    """n float16 values (little-endian bytes of `row`) -> out[:n] float32 (vectorized)."""
    for i in range(n):
        out[i] = _f16w(row, i)


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"contract"})
def dot_lanes16(w, xr, n, acc, L):
    """sum of w[i] * xr[i] as llama.cpp's AVX-512 GEMM sums it (tinyBLAS): 16 lanes (lane l
    takes i = l, l+16, ...) accumulated with FMA, then reduced as _mm512_reduce_add_ps
    does (l + l+8, then + 4, then pairs); a tail of n % 16 is added after.
    acc: (16,) float32 scratch; L must be 16 (a runtime count, see the module notes)."""
    for l in range(L):
        acc[l] = 0.0
    n16 = n - n % 16
    for i in range(0, n16, 16):
        for l in range(L):
            acc[l] += w[i + l] * xr[i + l]
    for l in range(8):
        acc[l] += acc[l + 8]
    for l in range(4):
        acc[l] += acc[l + 4]
    s = (acc[0] + acc[1]) + (acc[2] + acc[3])
    for i in range(n16, n):
        s += w[i] * xr[i]
    return s


@njit(cache=True, nogil=True, error_model="numpy", fastmath={"reassoc"})
def dot_f32(w, xr, n):
    """Float row . float activations (w: n float32, e.g. a decoded row)."""
    s = np.float32(0.0)
    for i in range(n):
        s += w[i] * xr[i]
    return s


# ---------------------------------------------------------------- token tiles
# Rows [r0, r1) of w against the tokens toks (n,), TILE tokens at a time: each block is
# unpacked once per tile (simd.q4k_tile / q6k_tile) and its term added to each token's
# output in block order, starting from 0.0, with dot_q4_k's / dot_q6_k's float steps;
# so out[i, r] has the bits of the one-token kernel.


@njit(cache=True, nogil=True, error_model="numpy")
def tiles_q4_k(w, r0, r1, qa, da, bs, toks, out, nb):
    """out[:, r0:r1] of a Q4_K matrix (nb super-blocks per row) . Q8_K activations."""
    n = toks.shape[0]
    for i0 in range(0, n, TILE):
        m = min(TILE, n - i0)
        for r in range(r0, r1):
            for i in range(i0, i0 + m):
                out[i, r] = 0.0
            for b in range(nb):
                o = r * w.shape[1] + Q4_K_BYTES * b
                q4k_tile(w, o, _f16(w, o), _f16(w, o + 2), qa, bs, da, toks, i0, m, b, out, r)


@njit(cache=True, nogil=True, error_model="numpy")
def tiles_q6_k(w, r0, r1, qa, da, toks, out, nb):
    """out[:, r0:r1] of a Q6_K matrix (nb super-blocks per row) . Q8_K activations."""
    n = toks.shape[0]
    for i0 in range(0, n, TILE):
        m = min(TILE, n - i0)
        for r in range(r0, r1):
            for i in range(i0, i0 + m):
                out[i, r] = 0.0
            for b in range(nb):
                o = r * w.shape[1] + Q6_K_BYTES * b
                q6k_tile(w, o, _f16(w, o + Q6_K_BYTES - 2), qa, da, toks, i0, m, b, out, r)


@njit(cache=True, nogil=True, error_model="numpy")
def tiles_q8_0(w, r0, r1, qa, da, toks, out, nb):
    """out[:, r0:r1] of a Q8_0 matrix (nb blocks per row) . Q8_0 activations: four blocks
    per q8_0_tile call, then the nb % 4 last ones one by one."""
    n = toks.shape[0]
    n4 = nb // 4
    for i0 in range(0, n, TILE):
        m = min(TILE, n - i0)
        for r in range(r0, r1):
            for i in range(i0, i0 + m):
                out[i, r] = 0.0
            o = r * w.shape[1]
            for b in range(n4):
                p = o + 4 * Q8_0_BYTES * b
                ds = (
                    _f16_flat(w, p),
                    _f16_flat(w, p + Q8_0_BYTES),
                    _f16_flat(w, p + 2 * Q8_0_BYTES),
                    _f16_flat(w, p + 3 * Q8_0_BYTES),
                )
                q8_0_tile(w, p, ds, qa, da, toks, i0, m, b, out, r)
            for b in range(4 * n4, nb):
                p = o + Q8_0_BYTES * b
                q8_0_tile(w, p, (_f16_flat(w, p),), qa, da, toks, i0, m, b, out, r)


# ---------------------------------------------------------------- rows x tokens


@njit(inline="always")
def _flat_kernel(t):
    """Whether type t has a row kernel on flat offsets (_dot_flat)."""
    return t == Q4_K or t == Q6_K or t == Q8_0


@njit(inline="always")
def _q8_k_type(t):
    return t == Q5_K or t == Q2_K or t == Q3_K or t == IQ4_XS


@njit(inline="always")
def _blocks32_type(t):
    return t == IQ4_NL or t == MXFP4 or t == Q4_1 or t == Q5_1 or t == Q4_0 or t == Q5_0


@njit(inline="always")
def _dot_flat(raw, t, r, qa, da, bs, k, nk, n32):
    """Row r of raw (type t, a _flat_kernel type) . token k: nk super-blocks / n32 blocks."""
    if t == Q4_K:
        return dot_q4_k(raw, r, qa, da, bs, k, nk)
    if t == Q6_K:
        return dot_q6_k(raw, r, qa, da, k, nk)
    return dot_q8_0(raw, r, qa, da, k, n32)


@njit(cache=True, nogil=True, error_model="numpy")
def rows_times_tokens(raw, t, r0, r1, qa, da, bs, xr, toks, out, llama_numerics):
    """out[i, r] = row r of raw (type t) . token toks[i]'s activations, r in [r0, r1).

    qa/da/bs/xr are (n_tok_all, ...) activation arrays; toks (n,) picks the tokens;
    out (n, n_rows). Every quantized type takes a float path when not `llama_numerics` (float
    activations in xr); only float paths allocate (a row buffer per call). Rows are the
    outer loop, so a row is read from memory once for all tokens."""
    n_cols = xr.shape[1]
    n = toks.shape[0]
    if n == 0:
        return
    nk, n32 = n_cols // 256, n_cols // 32
    if llama_numerics and n >= 2 and t == Q4_K:
        tiles_q4_k(raw, r0, r1, qa, da, bs, toks, out, nk)
        return
    if llama_numerics and n >= 2 and t == Q6_K:
        tiles_q6_k(raw, r0, r1, qa, da, toks, out, nk)
        return
    if llama_numerics and n >= 2 and t == Q8_0:
        tiles_q8_0(raw, r0, r1, qa, da, toks, out, n32)
        return
    if llama_numerics and (_q8_k_type(t) or _blocks32_type(t)):
        rows_typed(raw, t, r0, r1, qa, da, bs, toks, out, nk, n32)
        return
    if llama_numerics and _flat_kernel(t):  # the simd kernels, no slices
        for r in range(r0, r1):
            for i in range(n):
                out[i, r] = _dot_flat(raw, t, r, qa, da, bs, toks[i], nk, n32)
        return
    acc16 = np.empty(16, dtype=np.float32)  # (16,) lanes of dot_lanes16
    scratch = np.empty(n_cols, dtype=np.float32)  # (n_cols,) one decoded row
    for r in range(r0, r1):
        row = raw[r]
        for i in range(n):
            k = toks[i]
            if t == F16:
                if i == 0:
                    f16_row_to_f32(row, n_cols, scratch)
                v = dot_lanes16(scratch, xr[k], n_cols, acc16, 16)
            elif t == F32:
                v = dot_f32(row.view(np.float32), xr[k], n_cols)
            elif not llama_numerics:
                if i == 0:
                    decode_span(t, row, 0, n_cols, scratch)
                v = dot_f32(scratch, xr[k], n_cols)
            else:
                if i == 0:
                    decode_span(t, row, 0, n_cols, scratch)
                v = dot_f32(scratch, xr[k], n_cols)
            out[i, r] = v


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def matmul_parallel(raw, t, qa, da, bs, xr, toks, out, llama_numerics):
    """out (n, n_rows) for all rows, CHUNK rows per work item, in parallel."""
    n_rows = raw.shape[0]
    n_chunks = (n_rows + CHUNK - 1) // CHUNK
    for c in prange(n_chunks):
        rows_times_tokens(
            raw,
            t,
            c * CHUNK,
            min(n_rows, c * CHUNK + CHUNK),
            qa,
            da,
            bs,
            xr,
            toks,
            out,
            llama_numerics,
        )


@njit(cache=True, nogil=True, error_model="numpy")
def matmul_serial(raw, t, qa, da, bs, xr, toks, out, llama_numerics):
    """matmul_parallel on the calling thread (small matrices: no thread start-up)."""
    rows_times_tokens(raw, t, 0, raw.shape[0], qa, da, bs, xr, toks, out, llama_numerics)


PARALLEL_MIN_BYTES = 1 << 19  # weight bytes x tokens below which one thread is faster (measured)


@njit(cache=True, nogil=True, error_model="numpy")
def matmul_acts(raw, t, qa, da, bs, xr, toks, out, llama_numerics):
    """Pick the serial or parallel row loop by work size (both give the same bits)."""
    if raw.shape[0] * raw.shape[1] * toks.shape[0] < PARALLEL_MIN_BYTES or raw.shape[0] < 2 * CHUNK:
        matmul_serial(raw, t, qa, da, bs, xr, toks, out, llama_numerics)
    else:
        matmul_parallel(raw, t, qa, da, bs, xr, toks, out, llama_numerics)


track_sources(
    quantize_q8_0_row,
    quantize_q8_k_row,
    quantize_row,
    quantize_rows,
    dot_q4_k,
    dot_q6_k,
    dot_q8_0,
    rows_typed,
    tiles_q4_k,
    tiles_q6_k,
    tiles_q8_0,
    f16_row_to_f32,
    dot_lanes16,
    dot_f32,
    rows_times_tokens,
    matmul_parallel,
    matmul_serial,
    matmul_acts,
)


@njit(cache=True, nogil=True, error_model="numpy")
def linear(raw, t, mode, x, out):
    """out (T, n_rows) = W x for x (T, n_cols) rounded per `mode`, in one call."""
    n_tok, n = x.shape
    qa = np.empty((n_tok, n), dtype=np.int8)  # (T, n)
    nb = max(1, n // QK)
    da = np.empty((n_tok, nb), dtype=np.float32)  # (T, n/32)
    bs = np.empty((n_tok, nb), dtype=np.int32)  # (T, n/32)
    xr = np.empty((n_tok, n), dtype=np.float32)  # (T, n)
    quantize_rows(x, mode, qa, da, bs, xr)
    matmul_acts(raw, t, qa, da, bs, xr, np.arange(n_tok), out, mode != NONE)


def qmatmul(raw, ggml_type, x, out=None):
    """W x with x rounded as llama.cpp rounds a matmul's activations (actquant), by integer
    dot products where the type has them. Arguments as `kernels.matmul`."""
    qtype, raw, x2, out, out2 = operands(raw, ggml_type, x, out)
    linear(raw, int(qtype), mode_of(qtype), x2, out2)
    return out


track_sources(linear)
