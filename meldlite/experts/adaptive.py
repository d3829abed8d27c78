"""Adaptive top-k: skip routed experts whose share of the router weight is small.

A pure function on a layer's routing, applied once by the forward pass right
after the router (`meldlite.model.adapt_route`), before any expert store loads or
computes anything, so a skipped expert costs neither I/O nor FLOPs. The option,
`min_expert_weight`, is declared in `meldlite.options.Runtime`.
"""

import numpy as np

F32 = np.float32


def skip_light_experts(ids, weights, min_weight):
    """Drop slots whose renormalised weight w / sum(w) is below `min_weight`.

    ids (T, k) int32 (-1 = skipped), weights (T, k) float32 -> (ids', weights')
    with dropped slots set to id -1 and weight 0; the kept slots keep their
    weights (not rescaled: on the trained model rescaling them to the old sum
    doubled the KL divergence from the full run, docs/experts.md). The heaviest
    expert of each token is always kept. Returns the inputs themselves when
    nothing is dropped.
    """
    ids = np.asarray(ids)
    weights = np.asarray(weights, dtype=F32)
    valid = ids >= 0  # (T, k)
    w = np.where(valid, weights, F32(0))  # (T, k)
    total = w.sum(axis=-1, keepdims=True, dtype=F32)  # (T, 1)
    share = w / np.maximum(total, F32(1e-30))  # (T, k)
    drop = valid & (share < F32(min_weight))  # (T, k)
    drop[np.arange(len(ids)), np.argmax(share, axis=-1)] = False
    if not drop.any():
        return ids, weights
    new_w = np.where(drop, F32(0), weights).astype(F32)
    new_ids = np.where(drop, np.int32(-1), ids).astype(np.int32)
    return np.ascontiguousarray(new_ids), np.ascontiguousarray(new_w)
