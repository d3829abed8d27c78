"""Block decoders: one ggml block (uint8) -> float32 values, bit-identical to gguf-py.

`decode_<type>(blk, out)`: `blk` is a uint8 array starting at the block, `out` a float32
array (any stride) receiving the block's values. Field order and float operation order
follow gguf-py's `quants.py` (e.g. Q4_K is `(d*sc)*q - (dmin*m)` in float32), so results
match `gguf.quants.dequantize` bit for bit. `decode_span` decodes a run of whole blocks of
one row for any supported type. Block decoders are inlined (at Numba level) into the
per-span loops: a call per block costs 3x the decoding; inlining more (the dispatch into
the kernels) made compilation ~6x slower for no speed.
"""

import numpy as np
from gguf import quants as gguf_quants
from numba import njit

from meldlite.kernels.bits import bf16_to_f32, e8m0_to_f32_half, f16_to_f32, read_f16, read_u16
from meldlite.kernels.qtypes import (
    BF16,
    BLOCK_BYTES,
    BLOCK_ELEMS,
    F16,
    F32,
    IQ4_NL,
    IQ4_XS,
    MXFP4,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
)

KVALUES_IQ4NL = np.array(gguf_quants.IQ4_NL.kvalues, dtype=np.float32)  # (16,)
KVALUES_MXFP4 = np.array(gguf_quants.MXFP4.kvalues, dtype=np.float32)  # (16,) E2M1 x2


@njit(inline="always")
def _i8(b):
    """uint8 byte -> its int8 value (as int)."""
    return np.int32(b ^ 0x80) - 128


@njit(inline="always")
def decode_q4_0(blk, out):  # d:f16, qs[16]
    d = read_f16(blk, 0)
    for j in range(16):
        q = blk[2 + j]
        out[j] = d * np.float32(np.int32(q & 0xF) - 8)
        out[j + 16] = d * np.float32(np.int32(q >> 4) - 8)


@njit(inline="always")
def decode_q4_1(blk, out):  # d:f16, m:f16, qs[16]
    d = read_f16(blk, 0)
    m = read_f16(blk, 2)
    for j in range(16):
        q = blk[4 + j]
        out[j] = d * np.float32(q & 0xF) + m
        out[j + 16] = d * np.float32(q >> 4) + m


@njit(inline="always")
def _q5_codes(blk, qh_off, j):
    """5-bit codes of elements j and j+16 (j < 16): nibble of qs[j] plus a bit of the u32 qh."""
    qh = read_u16(blk, qh_off) | (read_u16(blk, qh_off + 2) << np.uint32(16))
    q = blk[qh_off + 4 + j]
    lo = np.int32(q & 0xF) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
    hi = np.int32(q >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
    return lo, hi


@njit(inline="always")
def decode_q5_0(blk, out):  # d:f16, qh[4], qs[16]; (q-16)*d
    d = read_f16(blk, 0)
    for j in range(16):
        lo, hi = _q5_codes(blk, 2, j)
        out[j] = d * np.float32(lo - 16)
        out[j + 16] = d * np.float32(hi - 16)


@njit(inline="always")
def decode_q5_1(blk, out):  # d:f16, m:f16, qh[4], qs[16]; q*d + m
    d = read_f16(blk, 0)
    m = read_f16(blk, 2)
    for j in range(16):
        lo, hi = _q5_codes(blk, 4, j)
        out[j] = d * np.float32(lo) + m
        out[j + 16] = d * np.float32(hi) + m


@njit(inline="always")
def decode_q8_0(blk, out):  # d:f16, qs[32] int8
    d = read_f16(blk, 0)
    for j in range(32):
        out[j] = np.float32(_i8(blk[2 + j])) * d


@njit(inline="always")
def decode_q2_k(blk, out):  # scales[16], qs[64], d:f16, dmin:f16
    d = read_f16(blk, 80)
    dmin = read_f16(blk, 82)
    for h in range(2):
        for s in range(4):
            for half in range(2):
                sc = blk[h * 8 + s * 2 + half]
                dl = d * np.float32(sc & 0xF)
                ml = dmin * np.float32(sc >> 4)
                for l in range(half * 16, half * 16 + 16):
                    q = (blk[16 + h * 32 + l] >> (2 * s)) & 3
                    out[h * 128 + s * 32 + l] = dl * np.float32(q) - ml


@njit(inline="always")
def _q3_k_scale(blk, i):
    """6-bit scale i (0..15) of a Q3_K block, minus 32."""
    lo = (blk[96 + i % 8] >> (4 * (i // 8))) & 0xF
    hi = (blk[104 + i % 4] >> (2 * (i // 4))) & 3
    return np.int32(lo | (hi << 4)) - 32


@njit(inline="always")
def decode_q3_k(blk, out):  # hmask[32], qs[64], scales[12], d:f16
    d = read_f16(blk, 108)
    for h in range(2):
        for s in range(4):
            for half in range(2):
                dl = d * np.float32(_q3_k_scale(blk, h * 8 + s * 2 + half))
                for l in range(half * 16, half * 16 + 16):
                    ql = np.int32((blk[32 + h * 32 + l] >> (2 * s)) & 3)
                    hbit = np.int32((blk[l] >> (h * 4 + s)) & 1)
                    out[h * 128 + s * 32 + l] = dl * np.float32(ql - 4 * (1 - hbit))


@njit(inline="always")
def _k_scale_min(blk, off, i):
    """(scale, min) of sub-block i (0..7) from the 12 packed bytes at `off` (Q4_K/Q5_K)."""
    if i < 4:
        return blk[off + i] & 63, blk[off + i + 4] & 63
    sc = (blk[off + i + 4] & 0xF) | ((blk[off + i - 4] >> 2) & 0x30)
    m = (blk[off + i + 4] >> 4) | ((blk[off + i] >> 2) & 0x30)
    return sc, m


@njit(inline="always")
def _decode_k_affine(blk, out, qs, high):
    """Q4_K / Q5_K: d, dmin, scales[12], then for Q5_K (`high`) qh[32] (the 5th bits),
    then qs[128] at byte `qs`; value = (d*sc)*q - (dmin*m) per sub-block of 32."""
    d = read_f16(blk, 0)
    dmin = read_f16(blk, 2)
    for i in range(8):
        sc, m = _k_scale_min(blk, 4, i)
        dl = d * np.float32(sc)
        ml = dmin * np.float32(m)
        shift = 4 * (i % 2)
        for l in range(32):
            q = (blk[qs + (i // 2) * 32 + l] >> shift) & 0xF
            if high:
                q |= ((blk[16 + l] >> i) & 1) << 4
            out[i * 32 + l] = dl * np.float32(q) - ml


@njit(inline="always")
def decode_q4_k(blk, out):  # d, dmin, scales[12], qs[128]
    _decode_k_affine(blk, out, 16, False)


@njit(inline="always")
def decode_q5_k(blk, out):  # d, dmin, scales[12], qh[32], qs[128]
    _decode_k_affine(blk, out, 48, True)


@njit(inline="always")
def decode_q6_k(blk, out):  # ql[128], qh[64], scales[16] int8, d:f16
    d = read_f16(blk, 208)
    for h in range(2):
        for g in range(8):
            dl = d * np.float32(_i8(blk[192 + h * 8 + g]))
            for r in range(g * 16, g * 16 + 16):
                ql = (blk[h * 64 + r % 64] >> (4 * (r // 64))) & 0xF
                qh = (blk[128 + h * 32 + r % 32] >> (2 * (r // 32))) & 3
                out[h * 128 + r] = dl * np.float32(np.int32(ql | (qh << 4)) - 32)


@njit(inline="always")
def decode_iq4_nl(blk, out):  # d:f16, qs[16] -> kvalues_iq4nl
    d = read_f16(blk, 0)
    for j in range(16):
        q = blk[2 + j]
        out[j] = d * KVALUES_IQ4NL[q & 0xF]
        out[j + 16] = d * KVALUES_IQ4NL[q >> 4]


@njit(inline="always")
def decode_iq4_xs(blk, out):  # d:f16, scales_h:u16, scales_l[4], qs[128]
    d = read_f16(blk, 0)
    scales_h = read_u16(blk, 2)
    for i in range(8):
        lo = np.int32((blk[4 + i // 2] >> (4 * (i % 2))) & 0xF)
        hi = np.int32((scales_h >> np.uint32(2 * i)) & np.uint32(3))
        dl = d * np.float32((lo | (hi << 4)) - 32)
        for m in range(16):
            q = blk[8 + i * 16 + m]
            out[i * 32 + m] = dl * KVALUES_IQ4NL[q & 0xF]
            out[i * 32 + 16 + m] = dl * KVALUES_IQ4NL[q >> 4]


@njit(inline="always")
def decode_mxfp4(blk, out):  # e:E8M0, qs[16] -> kvalues_mxfp4
    d = e8m0_to_f32_half(blk[0])
    for j in range(16):
        q = blk[1 + j]
        out[j] = d * KVALUES_MXFP4[q & 0xF]
        out[j + 16] = d * KVALUES_MXFP4[q >> 4]


@njit
def _f32_at(row, o):
    bits = read_u16(row, o) | (read_u16(row, o + 2) << np.uint32(16))
    return np.uint32(bits).view(np.float32)


@njit(inline="always")
def decode_f32_16(src, out):  # 16 little-endian f32
    for j in range(16):
        out[j] = _f32_at(src, 4 * j)


@njit(inline="always")
def decode_f16_16(src, out):  # 16 f16
    for j in range(16):
        out[j] = f16_to_f32(read_u16(src, 2 * j))


@njit(inline="always")
def decode_bf16_16(src, out):  # 16 bf16
    for j in range(16):
        out[j] = bf16_to_f32(read_u16(src, 2 * j))


@njit(inline="always")
def _plain_value(t, row, i):
    """Value i of a row of F32 / F16 / BF16 bytes."""
    if t == F32:
        return _f32_at(row, 4 * i)
    if t == F16:
        return f16_to_f32(read_u16(row, 2 * i))
    return bf16_to_f32(read_u16(row, 2 * i))


@njit
def _decode_plain(t, row, c0, cn, out):
    """F32 / F16 / BF16 values c0..c0+cn of a row of raw bytes, in groups of 16 (constant
    loops become scalar stores; runtime-length ones would be vectorized into scatters when
    `out` is a strided column of the matmul tile)."""
    n16 = cn - cn % 16
    if t == F32:
        for g in range(0, n16, 16):
            decode_f32_16(row[4 * (c0 + g) :], out[g:])
    elif t == F16:
        for g in range(0, n16, 16):
            decode_f16_16(row[2 * (c0 + g) :], out[g:])
    else:
        for g in range(0, n16, 16):
            decode_bf16_16(row[2 * (c0 + g) :], out[g:])
    for i in range(n16, cn):
        out[i] = _plain_value(t, row, c0 + i)


@njit(inline="always")
def decode_block(t, blk, out):
    """Decode the one block of quantized type `t` at blk[0:] into out[:block size]."""
    if t == Q4_0:
        decode_q4_0(blk, out)
    elif t == Q4_1:
        decode_q4_1(blk, out)
    elif t == Q5_0:
        decode_q5_0(blk, out)
    elif t == Q5_1:
        decode_q5_1(blk, out)
    elif t == Q8_0:
        decode_q8_0(blk, out)
    elif t == IQ4_NL:
        decode_iq4_nl(blk, out)
    elif t == MXFP4:
        decode_mxfp4(blk, out)
    elif t == Q2_K:
        decode_q2_k(blk, out)
    elif t == Q3_K:
        decode_q3_k(blk, out)
    elif t == Q4_K:
        decode_q4_k(blk, out)
    elif t == Q5_K:
        decode_q5_k(blk, out)
    elif t == Q6_K:
        decode_q6_k(blk, out)
    elif t == IQ4_XS:
        decode_iq4_xs(blk, out)


@njit
def decode_span(t, row, c0, cn, out):
    """Decode values c0..c0+cn of `row` (uint8) of type `t` into out[:cn].

    c0 and cn must be multiples of the block size. Returns False (and writes nothing)
    for a type it does not know or a span that is not made of whole blocks.
    """
    if t == F32 or t == F16 or t == BF16:
        _decode_plain(t, row, c0, cn, out)
        return True
    if t < 0 or t >= BLOCK_ELEMS.shape[0] or BLOCK_ELEMS[t] == 0:
        return False
    elems, nbytes = BLOCK_ELEMS[t], BLOCK_BYTES[t]
    if c0 % elems or cn % elems:
        return False
    for b in range(c0 // elems, (c0 + cn) // elems):
        decode_block(t, row[b * nbytes :], out[b * elems - c0 :])
    return True
