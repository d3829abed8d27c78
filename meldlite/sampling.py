"""Sampling: small pure functions over a logits vector and an explicit RNG.

The order follows llama.cpp's sampler chain: repetition penalty -> top-k ->
top-p -> min-p -> temperature -> draw. Filters return logits with the
removed entries set to -inf, so they compose in any order. The parameters and
their defaults are the option group `meldlite.options.Sampler`.
"""

import numpy as np

NEG_INF = np.float32(-np.inf)


def repetition_penalty(logits, recent, penalty):
    """Divide positive (multiply negative) logits of recently seen tokens by `penalty`."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    out = logits.copy()
    ids = np.unique(np.asarray(recent))
    seen = out[ids]
    out[ids] = np.where(seen > 0, seen / penalty, seen * penalty)
    return out


def top_k(logits, k):
    """Keep the k largest logits (k = 0 keeps all)."""
    if k <= 0 or k >= len(logits):
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits >= kth, logits, NEG_INF)


def softmax(logits):
    e = np.exp((logits - logits.max()).astype(np.float64))
    return e / e.sum()


def top_p(logits, p):
    """Keep the smallest set of most probable tokens whose mass reaches p."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    n_keep = int(np.searchsorted(cum, p) + 1)
    out = np.full_like(logits, NEG_INF)
    keep = order[:n_keep]
    out[keep] = logits[keep]
    return out


def min_p(logits, p):
    """Keep tokens whose probability is at least p times the top one's."""
    if p <= 0.0:
        return logits
    return np.where(logits >= logits.max() + np.log(p), logits, NEG_INF)


def sample(logits, params, rng, recent=()):
    """One token id from logits (V,) under `params` (a `meldlite.options.Sampler`),
    drawing from `rng`."""
    logits = repetition_penalty(
        logits,
        list(recent)[-params.repeat_last_n :] if params.repeat_last_n else [],
        params.repeat_penalty,
    )
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    logits = min_p(top_p(top_k(logits, params.top_k), params.top_p), params.min_p)
    probs = softmax(logits / params.temperature)
    return int(rng.choice(len(probs), p=probs))
