"""Activation rounding as llama.cpp's CPU matmuls do it.

ggml does not multiply a quantized weight by float activations: it first
converts the activations to the weight type's "vec_dot type" (Q8_0 for Q4_0,
Q5_0, Q8_0, IQ4_NL, MXFP4; Q8_1 for Q4_1, Q5_1; Q8_K for the K-quants and
IQ4_XS; F16 for F16; BF16 for BF16) and takes integer dot products. A float
product with the activations replaced by their 8-bit (or 16-bit) values gives
the same result up to float summation order, which is what `round_activations`
returns. Following it is optional (`Model(..., llama_numerics=True)`); the
kernels themselves compute exactly in float.

Rounding details (llama.cpp's quantize_row_q8_0 and quantize_row_q8_K): Q8_0/Q8_1
blocks of 32 with d = amax/127 stored as f16 and q = round-half-even(x * 127/amax)
(the x86 SIMD path); Q8_K blocks of 256 with iscale = -127/max (signed max),
q = min(127, nearest_int(iscale*x)) and d = 1/iscale kept in f32. Q8_1 rounds the values
as Q8_0 and also keeps s = f16(d * sum(q)) per block (d unrounded) for the weights' min
term m * s: no per-value rounding expresses that, so Q4_1/Q5_1 products here (and in the
float kernels) use m * f16(d) * sum(q) instead; qdot's integer kernels use s.
"""

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from meldlite.kernels._cache import track_sources

NONE, ROUND_F16, ROUND_BF16, Q8_0, Q8_K, Q8_1 = 0, 1, 2, 3, 4, 5

_MODE = {
    T.F16: ROUND_F16,
    T.BF16: ROUND_BF16,
    T.Q4_0: Q8_0,
    T.Q5_0: Q8_0,
    T.Q8_0: Q8_0,
    T.IQ4_NL: Q8_0,
    T.MXFP4: Q8_0,
    T.Q4_1: Q8_1,
    T.Q5_1: Q8_1,
    T.Q2_K: Q8_K,
    T.Q3_K: Q8_K,
    T.Q4_K: Q8_K,
    T.Q5_K: Q8_K,
    T.Q6_K: Q8_K,
    T.IQ4_XS: Q8_K,
}

# mode per ggml type id, for jitted callers (the MoE kernel)
MODE_BY_ID = np.zeros(max(int(t) for t in T) + 1, np.int32)  # (n_type_ids,)
for _t, _m in _MODE.items():
    MODE_BY_ID[int(_t)] = _m


def mode_of(ggml_type):
    """The activation rounding llama.cpp applies before multiplying by this type."""
    return _MODE.get(T(int(ggml_type)), NONE)


_F16_KEEP = np.uint32(0xFFFFE000)  # the float32 bits a float16 keeps (sign, exponent, 10)


@njit(cache=True, nogil=True, inline="always")
def _f16_round(v):
    """v rounded to the nearest float16 value (ties to even), as float32: the mantissa
    rounded to 10 bits in the float32 bits, f16 subnormals to multiples of 2^-24, overflow
    to inf. Equal bit for bit to float32(float16(v)) for all 2^32 float32 inputs (checked
    exhaustively), and ~9x faster than rounding by frexp/ldexp/rint."""
    a = abs(v)
    if not a < np.float32(65520.0):  # NaN, inf, or rounds past 65504
        if a != a:
            return v
        return np.float32(np.inf) if v > 0 else np.float32(-np.inf)
    if a < np.float32(2.0**-14):  # f16 subnormal: quantum 2^-24 (scalings by 2^k are exact)
        return np.float32(np.rint(v * np.float32(2.0**24))) * np.float32(2.0**-24)
    u = np.float32(v).view(np.uint32)
    u = np.uint32((u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & _F16_KEEP)
    return u.view(np.float32)


@njit(cache=True, nogil=True, inline="always")
def _bf16_round(v):
    u = np.float32(v).view(np.uint32)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN stays NaN
        return v
    u = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return np.uint32(u).view(np.float32)


@njit(cache=True, nogil=True)
def _q8_0_block(src, dst):
    amax = np.float32(0.0)
    for v in src:
        amax = max(amax, abs(v))
    d = _f16_round(amax / np.float32(127.0))
    inv = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
    for j in range(src.shape[0]):
        dst[j] = np.float32(np.rint(src[j] * inv)) * d


@njit(cache=True, nogil=True)
def _q8_k_block(src, dst):
    amax, mx = np.float32(0.0), np.float32(0.0)
    for v in src:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax == 0:
        dst[:] = 0
        return
    iscale = np.float32(-127.0) / mx
    d = np.float32(1.0) / iscale
    for j in range(src.shape[0]):
        dst[j] = np.float32(min(np.float32(127.0), np.rint(iscale * src[j]))) * d


@njit(cache=True, nogil=True)
def round_row(src, mode, dst):
    """Round one activation row (n,) into dst (n,) per `mode`."""
    n = src.shape[0]
    if mode == ROUND_F16:
        for j in range(n):
            dst[j] = _f16_round(src[j])
    elif mode == ROUND_BF16:
        for j in range(n):
            dst[j] = _bf16_round(src[j])
    elif (mode == Q8_0 or mode == Q8_1) and n % 32 == 0:
        for b in range(0, n, 32):
            _q8_0_block(src[b : b + 32], dst[b : b + 32])
    elif mode == Q8_K and n % 256 == 0:
        for b in range(0, n, 256):
            _q8_k_block(src[b : b + 256], dst[b : b + 256])
    else:
        dst[:] = src


@njit(cache=True, nogil=True, parallel=True)
def _round_rows(x, mode, out):
    for t in prange(x.shape[0]):
        round_row(x[t], mode, out[t])


def round_activations(x, ggml_type):
    """x (T, n) or (n,) float32 -> the values llama.cpp's matmul would use."""
    mode = mode_of(ggml_type)
    if mode == NONE:
        return x
    x2 = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, x.shape[-1])  # (T, n)
    out = np.empty_like(x2)
    _round_rows(x2, mode, out)
    return out.reshape(x.shape)


def round_activations_reference(x, ggml_type):
    """NumPy reference of `round_activations`."""
    mode = mode_of(ggml_type)
    x = np.asarray(x, np.float32)
    if mode == ROUND_F16:
        with np.errstate(over="ignore"):  # beyond f16's range rounds to inf, as in ggml
            return x.astype(np.float16).astype(np.float32)
    if mode == ROUND_BF16:
        u = x.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
        return np.where(np.isnan(x), x, r)
    if mode in (Q8_0, Q8_1) and x.shape[-1] % 32 == 0:
        b = x.reshape(-1, 32)
        amax = np.abs(b).max(axis=1, keepdims=True)
        d = (amax / np.float32(127)).astype(np.float16).astype(np.float32)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0))
        return (np.rint(b * inv) * d).reshape(x.shape).astype(np.float32)
    if mode == Q8_K and x.shape[-1] % 256 == 0:
        b = x.reshape(-1, 256)
        mx = b[np.arange(len(b)), np.abs(b).argmax(axis=1)][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = np.where(mx != 0, np.float32(-127) / mx, np.float32(0)).astype(np.float32)
            d = np.where(mx != 0, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
        return (np.minimum(np.rint(iscale * b), 127) * d).reshape(x.shape).astype(np.float32)
    return x


track_sources(_q8_0_block, _q8_k_block, round_row, _round_rows)
