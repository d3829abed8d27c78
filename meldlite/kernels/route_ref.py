"""NumPy reference of the MoE router (`kernels.route.route_gated` is checked against it).

Shape letters: T tokens, X experts, k experts used, n groups, m experts per group.
"""

import numpy as np

F32 = np.float32


def gate(logits, gating):
    """Router probabilities (T, X) from logits (T, X)."""
    if gating == "sigmoid":
        return (F32(1.0) / (F32(1.0) + np.exp(-logits))).astype(F32)
    if gating == "softmax_weight":
        return logits.astype(F32)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))  # (T, X)
    return (e * (1.0 / e.sum(axis=-1, dtype=np.float64, keepdims=True))).astype(F32)


def group_mask(sel, n_group, n_group_used):
    """(T, X) bool: experts in the n_group_used groups whose two largest values sum highest."""
    n_tok, n_x = sel.shape
    groups = sel.reshape(n_tok, n_group, n_x // n_group)  # (T, n, m)
    top2 = -np.sort(-groups, axis=-1)[..., :2]  # (T, n, 2)
    score = top2.astype(np.float64).sum(axis=-1).astype(F32)  # (T, n)
    best = np.argsort(-score, axis=-1, kind="stable")[:, :n_group_used]  # (T, n_used)
    keep = np.zeros((n_tok, n_group), bool)  # (T, n)
    np.put_along_axis(keep, best, True, axis=-1)
    return np.repeat(keep, n_x // n_group, axis=-1)  # (T, X)


def route(
    logits, k, norm_topk, gating="softmax", sel_bias=None, n_group=0, n_group_used=0, w_scale=0.0
):
    """Top-k experts per token as llama.cpp's build_moe_ffn (see kernels.route).
    Returns ids (T, k) int32 and weights (T, k) float32."""
    probs = gate(logits, gating)  # (T, X)
    sel = probs + sel_bias if sel_bias is not None and len(sel_bias) else probs  # (T, X)
    sel = np.where(logits == -np.inf, -np.inf, sel).astype(F32)  # (T, X)
    if n_group > 1:
        sel = np.where(group_mask(sel, n_group, n_group_used), sel, -np.inf)
    ids = np.argsort(-sel, axis=-1, kind="stable")[:, :k].astype(np.int32)  # (T, k)
    weights = np.take_along_axis(probs, ids, axis=-1)  # (T, k)
    if gating == "softmax_weight":
        weights = gate(weights, "softmax")
    if norm_topk:
        total = np.zeros((len(weights), 1), F32)  # (T, 1) float32, in slot order
        for j in range(k):
            total[:, 0] += weights[:, j]
        weights = weights / np.maximum(total, F32(6.103515625e-5))
    if w_scale not in (0.0, 1.0):
        weights = weights * F32(w_scale)
    return ids, np.ascontiguousarray(weights, dtype=F32)
