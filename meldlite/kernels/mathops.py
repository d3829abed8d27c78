"""Float math the forward pass runs outside the jitted kernels, in NumPy.

`rope_tables` builds the RoPE cos/sin tables the attention kernel reads (angles as ggml
builds them); `silu` is the activation of the dense and shared-expert FFNs.
"""

import numpy as np

F32 = np.float32


def silu(x):
    """x * sigmoid(x) in float32."""
    return x / (F32(1.0) + np.exp(-x))


def rope_tables(n_pos, n_rot, base):
    """cos/sin tables (n_pos, n_rot/2) with angles pos * base^(-2i/n_rot).

    The angle of pair i is built as ggml does: start from the position and
    multiply by theta_scale once per pair, in float32.
    """
    theta_scale = F32(base) ** F32(-2.0 / n_rot)
    theta = np.arange(n_pos, dtype=F32)  # (P,)
    cos = np.empty((n_pos, n_rot // 2), F32)  # (P, R/2)
    sin = np.empty((n_pos, n_rot // 2), F32)  # (P, R/2)
    for i in range(n_rot // 2):
        cos[:, i] = np.cos(theta.astype(np.float64))  # correctly rounded, like libm cosf
        sin[:, i] = np.sin(theta.astype(np.float64))
        theta = theta * theta_scale
    return cos, sin
