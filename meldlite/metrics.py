"""Measures of how far one model's next-token distributions are from another's.

Lossy choices (quantization, skipped experts, compressed activations) are
judged by the mean KL divergence of next-token distributions from the exact
model, with top-1 agreement beside it (perplexity alone is too noisy).
"""

import numpy as np


def log_softmax(logits):
    """log softmax over the last axis, in float64: (T, V) -> (T, V)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(ref_logits, logits):
    """KL(ref || other) of the softmax distributions, per position: (T, V) x 2 -> (T,)."""
    lp, lq = log_softmax(ref_logits), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def top1_agreement(ref_logits, logits):
    """Share of positions whose most likely token is the same."""
    return float((np.argmax(ref_logits, -1) == np.argmax(logits, -1)).mean())
