"""Float math the forward pass runs outside the jitted kernels, in NumPy.

`rope_tables` builds the RoPE cos/sin tables the attention kernel reads (angles as ggml
builds them, with linear or YaRN scaling as ggml's rope_yarn); `silu` is the activation
of the dense and shared-expert FFNs, `gated` the experts' (for the quantizer's
estimates), `gelu` the tanh-approximated GELU of Gemma's FFN as ggml's CPU path
computes it (through its f16 table).
"""

import numpy as np

F32 = np.float32


def silu(x):
    """x * sigmoid(x) in float32."""
    return x / (F32(1.0) + np.exp(-x))


def gated(g, u, act="silu"):
    """The experts' gated activation in float32, as kernels.moe computes it (act: a key
    of moe.EXPERT_ACTS): silu(g) u, relu(g) u, or gpt-oss's clamped SwiGLU."""
    if act == "relu":
        return np.where(g > 0, g * u, F32(0))
    if act == "swiglu_oai":
        x = np.minimum(g, F32(7.0))
        y = np.clip(u, F32(-7.0), F32(7.0))
        return x / (F32(1.0) + np.exp(F32(1.702) * -x)) * (y + F32(1.0))
    return silu(g) * u


def yarn_corr_dims(n_rot, n_ctx_orig, base, beta_fast, beta_slow):
    """ggml_rope_yarn_corr_dims: the first and last pair index of YaRN's ramp, float32."""

    def corr_dim(beta):  # n_rot * ln(n_ctx_orig / (beta 2 pi)) / (2 ln base)
        r = F32(n_ctx_orig) / (F32(beta) * F32(2) * F32(np.pi))
        return F32(n_rot) * _logf(r) / (F32(2) * _logf(F32(base)))

    low = max(F32(0), np.floor(corr_dim(beta_fast)))
    high = min(F32(n_rot - 1), np.ceil(corr_dim(beta_slow)))
    return F32(low), F32(high)


def _logf(v):
    return F32(np.log(np.float64(v)))


def rope_tables(
    n_pos,
    n_rot,
    base,
    freq_scale=1.0,
    ext_factor=0.0,
    attn_factor=1.0,
    beta_fast=32.0,
    beta_slow=1.0,
    n_ctx_orig=0,
):
    """cos/sin tables (n_pos, n_rot/2) with angles pos * base^(-2i/n_rot).

    The angle of pair i is built as ggml does: start from the position and
    multiply by theta_scale once per pair, in float32. With scaling (ggml's
    rope_yarn): the angle is freq_scale * angle, mixed back towards the unscaled
    angle by YaRN's ramp over the pairs between the correction dims when
    ext_factor != 0, and cos/sin are multiplied by attn_factor (times
    1 + 0.1 ln(1/freq_scale) when ext_factor != 0).
    """
    scaled = freq_scale != 1.0 or ext_factor != 0.0 or attn_factor != 1.0
    theta_scale = F32(base) ** F32(-2.0 / n_rot)
    theta = np.arange(n_pos, dtype=F32)  # (P,)
    cos = np.empty((n_pos, n_rot // 2), F32)  # (P, R/2)
    sin = np.empty((n_pos, n_rot // 2), F32)  # (P, R/2)
    if scaled:
        mix, mscale = _yarn_mix(
            n_rot, base, ext_factor, attn_factor, freq_scale, beta_fast, beta_slow, n_ctx_orig
        )
    for i in range(n_rot // 2):
        angle = theta
        if scaled:
            angle = F32(freq_scale) * theta  # (P,)
            if ext_factor != 0.0:
                angle = angle * (F32(1) - mix[i]) + theta * mix[i]
        cos[:, i] = np.cos(angle.astype(np.float64))  # correctly rounded, like libm cosf
        sin[:, i] = np.sin(angle.astype(np.float64))
        theta = theta * theta_scale
    if scaled:
        cos *= mscale
        sin *= mscale
    return cos, sin


def _yarn_mix(n_rot, base, ext_factor, attn_factor, freq_scale, beta_fast, beta_slow, n_ctx_orig):
    """(mix (R/2,) float32 ramp times ext_factor, mscale float32) of ggml's rope_yarn."""
    mscale = F32(attn_factor)
    mix = np.zeros(n_rot // 2, F32)  # (R/2,)
    if ext_factor != 0.0:
        low, high = yarn_corr_dims(n_rot, n_ctx_orig, base, beta_fast, beta_slow)
        y = (np.arange(n_rot // 2, dtype=F32) - low) / max(F32(0.001), high - low)  # (R/2,)
        mix = (F32(1) - np.minimum(F32(1), np.maximum(F32(0), y))) * F32(ext_factor)
        mscale = mscale * (F32(1.0) + F32(0.1) * _logf(F32(1.0) / F32(freq_scale)))
    return mix.astype(F32), F32(mscale)


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
