"""Scalar bit-level conversions used by the block decoders (small jitted functions).

Each matches NumPy / gguf-py bit for bit, including NaN payloads:
- f16 -> f32 as `np.float16(...).astype(np.float32)` (NumPy keeps the NaN payload, quiet or not);
- bf16 -> f32 as gguf-py `BF16.dequantize_blocks` (the 16 bits become the top half);
- E8M0 -> f32 "half" scale as gguf-py `MXFP4.e8m0_to_fp32_half` (= ggml `ggml_e8m0_to_fp32_half`).
"""

import numpy as np
from numba import njit

_F16_SUBNORMAL_UNIT = np.float32(2.0**-24)  # value of the f16 subnormal step
_EXP_REBIAS = np.uint32((127 - 15) << 23)  # f16 -> f32 exponent bias, at the f32 exponent


@njit
def u32_as_f32(bits):
    return np.uint32(bits).view(np.float32)


@njit
def f16_to_f32(h):
    """IEEE half (given as an int 0..65535) -> float32, exact."""
    h = np.uint32(h)
    sign = np.uint32((h & np.uint32(0x8000)) << np.uint32(16))
    mag = np.uint32(h & np.uint32(0x7FFF))
    bits = np.uint32((mag << np.uint32(13)) + _EXP_REBIAS)  # normal numbers
    if mag >= np.uint32(0x7C00):  # inf/NaN: exponent 255, payload kept
        bits = np.uint32(bits + _EXP_REBIAS)
    if mag < np.uint32(0x400):  # zero and subnormals, exact
        bits = np.float32(np.float32(mag) * _F16_SUBNORMAL_UNIT).view(np.uint32)
    return u32_as_f32(np.uint32(bits | sign))


@njit
def bf16_to_f32(h):
    """bfloat16 (given as an int 0..65535) -> float32, exact."""
    return u32_as_f32(np.uint32(np.uint32(h) << np.uint32(16)))


@njit
def e8m0_to_f32_half(e):
    """E8M0 exponent byte -> 2**(e-128) as float32 (denormal for e < 2)."""
    e = np.uint32(e)
    if e < np.uint32(2):
        return u32_as_f32(np.uint32(np.uint32(0x00200000) << e))
    return u32_as_f32(np.uint32((e - np.uint32(1)) << np.uint32(23)))


@njit
def read_u16(src, off):
    """Little-endian uint16 at byte `off` of the uint8 array `src`."""
    return np.uint32(src[off]) | (np.uint32(src[off + 1]) << np.uint32(8))


@njit
def read_f16(src, off):
    """Little-endian f16 at byte `off` of `src`, as float32."""
    return f16_to_f32(read_u16(src, off))
