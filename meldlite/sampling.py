"""Sampling: small pure functions over a logits vector and an explicit RNG.

The order follows llama.cpp's sampler chain: repetition penalty -> top-k ->
top-p -> min-p -> temperature -> draw. Filters return logits with the
removed entries set to -inf, so they compose in any order.
"""

from dataclasses import dataclass

import numpy as np

from meldlite.errors import OptionError

NEG_INF = np.float32(-np.inf)


@dataclass(frozen=True)
class SamplerParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(message)


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
    """One token id from logits (V,) under `params`, drawing from `rng`."""
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
