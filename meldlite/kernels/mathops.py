"""Float math the forward pass runs outside the jitted kernels, in NumPy.

`rope_tables` builds the RoPE cos/sin tables the attention kernel reads (angles as ggml
builds them); `silu` is the activation of the dense and shared-expert FFNs, `gelu` the
tanh-approximated GELU of Gemma's FFN as ggml's CPU path computes it (through its f16
table).
"""

import numpy as np

F32 = np.float32


def silu(x):
    """x * sigmoid(x) in float32."""
    return x / (F32(1.0) + np.exp(-x))


def rope_tables(n_pos, n_rot, base, freq_scale=1.0):
    """cos/sin tables (n_pos, n_rot/2) with angles freq_scale * pos * base^(-2i/n_rot).

    The angle of pair i is built as ggml does: start from the position and
    multiply by theta_scale once per pair, in float32; linear scaling multiplies
    that angle by freq_scale (rope_yarn's theta_interp; skipped at 1, which is exact).
    """
    theta_scale = F32(base) ** F32(-2.0 / n_rot)
    theta = np.arange(n_pos, dtype=F32)  # (P,)
    cos = np.empty((n_pos, n_rot // 2), F32)  # (P, R/2)
    sin = np.empty((n_pos, n_rot // 2), F32)  # (P, R/2)
    for i in range(n_rot // 2):
        angle = theta if freq_scale == 1.0 else F32(freq_scale) * theta  # (P,)
        cos[:, i] = np.cos(angle.astype(np.float64))  # correctly rounded, like libm cosf
        sin[:, i] = np.sin(angle.astype(np.float64))
        theta = theta * theta_scale
    return cos, sin


GELU_COEF_A = F32(0.044715)
SQRT_2_OVER_PI = F32(0.79788456080286535587989211986876)


def _gelu_f16_table():
    """ggml_table_gelu_f16: for each of the 65536 half values x, f16(gelu(x)) with
    gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2))) in float32 (tanh
    correctly rounded, as libm's tanhf nearly always is)."""
    with np.errstate(all="ignore"):
        x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
        x = x.astype(F32)  # (65536,)
        inner = (SQRT_2_OVER_PI * x) * (F32(1.0) + (GELU_COEF_A * x) * x)  # (65536,)
        t = np.tanh(inner.astype(np.float64)).astype(F32)  # (65536,)
        return ((F32(0.5) * x) * (F32(1.0) + t)).astype(np.float16).astype(F32)


_GELU_TABLE = None


def gelu(x):
    """GELU (tanh form) of float32 x as ggml_vec_gelu_f32 with GGML_GELU_FP16: 0 at
    x <= -10, x at x >= 10, else the f16 table at f16(x)."""
    global _GELU_TABLE
    if _GELU_TABLE is None:
        _GELU_TABLE = _gelu_f16_table()
    with np.errstate(over="ignore"):
        y = _GELU_TABLE[x.astype(np.float16).view(np.uint16)]  # (..., F)
    y = np.where(x >= F32(10.0), x, y)
    return np.where(x <= F32(-10.0), F32(0.0), y).astype(F32)
