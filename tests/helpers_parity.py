"""The gates of logit parity with llama.cpp, shared by test_parity (llama.cpp run here)
and test_parity_saved (llama.cpp's logits saved on another machine, scripts/parity_refs.py).

Float (F32/F16) files: the largest |difference| within 1e-3 of the largest |logit|, the
median within 5e-4 of it. Quantized files (llama.cpp's dot products quantize the
activations too, see meldlite/kernels/actquant.py): mean KL divergence within 1e-3, the
argmax the same on at least 93% of the positions (one or two near-ties of 128 flip on
float summation order).
"""

import numpy as np

from meldlite.metrics import kl_divergence as kl_per_position

MAX_REL, MEDIAN_REL = 1e-3, 5e-4  # of the largest |logit|, float files
MEAN_KL, AGREE_FLOOR = 1e-3, 0.93  # quantized files


def assert_float_close(ours, ref):
    """The float files' gates on logits ours, ref (T, V); returns the argmax flips."""
    assert ours.shape == ref.shape and ours.dtype == np.float32
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref)  # (T, V)
    rel = diff.max() / scale
    assert rel <= MAX_REL, f"max |diff| / max |logit| = {rel:.2e}"
    med = np.median(diff) / scale
    assert med <= MEDIAN_REL, f"median |diff| / max |logit| = {med:.2e}"
    return int((ours.argmax(-1) != ref.argmax(-1)).sum())


def quant_stats(ours, ref):
    """(KL divergence per position (T,), argmax agreement per position (T,) bool)."""
    return kl_per_position(ref, ours), ours.argmax(-1) == ref.argmax(-1)
