"""The MoE router: gating, optional group-limited selection, top-k, weights (`route_gated`).

Follows llama.cpp's build_moe_ffn on the CPU:
  probs     = gate(logits)            softmax (float64 sum), sigmoid 1/(1+exp(-l)), or the
                                      logits themselves ("softmax_weight": softmax after top-k)
  selection = probs + sel_bias        per-expert selection bias (exp_probs_b), selection only
  groups    = n_group groups of X/n_group experts; a group's score is the sum of its two
              largest selection values; all but the n_group_used best groups are masked
  ids       = the k largest selection values (ties: lower id first), descending
  weights   = probs[ids]; softmax over them ("softmax_weight"); divided by their sum
              (clamped to 2^-14) when norm_topk; times w_scale unless it is 0 or 1.
              The sum is float32 in slot order, as meldlite always summed it (ggml_sum_rows
              sums in float64: the same bits for k = 2; on a k = 4 qwen3moe file float64
              moved the median |dlogit| to llama.cpp from 3.476e-4 to 3.474e-4 only).
An expert whose logit is -inf (pruned) is never chosen. The NumPy reference is
`route_ref.route`. Shape letters: T tokens, X experts, k experts used, n groups.
"""

import numpy as np
from numba import njit

from meldlite.kernels._cache import track_sources

GATE_SOFTMAX, GATE_SIGMOID, GATE_SOFTMAX_WEIGHT = 0, 1, 2
GATINGS = {"softmax": GATE_SOFTMAX, "sigmoid": GATE_SIGMOID, "softmax_weight": GATE_SOFTMAX_WEIGHT}
NO_BIAS = np.zeros(0, np.float32)  # (0,) no selection bias


@njit(cache=True, nogil=True, error_model="numpy")
def gate_row(logits, gating, probs):
    """probs (X,) <- gate(logits (X,)) in float32."""
    n_x = logits.shape[0]
    if gating == GATE_SIGMOID:
        for e in range(n_x):
            probs[e] = np.float32(1.0) / (np.float32(1.0) + np.exp(-logits[e]))
    elif gating == GATE_SOFTMAX_WEIGHT:
        for e in range(n_x):
            probs[e] = logits[e]
    else:
        softmax_row(logits, probs)


@njit(cache=True, nogil=True, error_model="numpy")
def softmax_row(v, out):
    """out (n,) <- softmax(v (n,)), exponentials summed in float64 as ggml; v may be out."""
    mx = v.max()
    tot = 0.0
    for i in range(v.shape[0]):
        out[i] = np.exp(v[i] - mx)
        tot += np.float64(out[i])
    inv = 1.0 / tot
    for i in range(v.shape[0]):
        out[i] = np.float32(out[i] * inv)


@njit(cache=True, nogil=True, error_model="numpy")
def top_index(values, allowed):
    """Index of the largest value among `allowed` (ties: lower index); -1 if none."""
    best = -1
    for e in range(values.shape[0]):
        if allowed[e] and (best < 0 or values[e] > values[best]):
            best = e
    return best


@njit(cache=True, nogil=True, error_model="numpy")
def mask_groups(sel, n_group, n_group_used, allowed):
    """allowed (X,) &= expert is in one of the n_group_used groups with the largest
    top-2 sums of sel (X,); a group's two values are summed in float64 as ggml_sum_rows."""
    per = sel.shape[0] // n_group
    score = np.empty(n_group, dtype=np.float32)  # (n,)
    for g in range(n_group):
        a, b = -np.inf, -np.inf
        for e in range(g * per, g * per + per):
            if sel[e] > a:
                a, b = sel[e], a
            elif sel[e] > b:
                b = sel[e]
        score[g] = np.float32(np.float64(a) + np.float64(b))
    keep = np.zeros(n_group, dtype=np.bool_)  # (n,)
    free = np.ones(n_group, dtype=np.bool_)  # (n,)
    for _ in range(n_group_used):
        g = top_index(score, free)
        free[g] = False
        keep[g] = True
    for e in range(sel.shape[0]):
        allowed[e] = allowed[e] and keep[e // per]


@njit(cache=True, nogil=True, error_model="numpy")
def route_gated(
    logits, k, gating, sel_bias, n_group, n_group_used, norm_topk, w_scale, ids, weights
):
    """ids (T, k) int32, weights (T, k) float32 <- the routing of logits (T, X); see the
    module docstring. sel_bias (X,) or empty; n_group <= 1: no group selection."""
    n_x = logits.shape[1]
    probs = np.empty(n_x, dtype=np.float32)  # (X,)
    sel = np.empty(n_x, dtype=np.float32)  # (X,)
    allowed = np.empty(n_x, dtype=np.bool_)  # (X,)
    for t in range(logits.shape[0]):
        gate_row(logits[t], gating, probs)
        for e in range(n_x):
            sel[e] = probs[e] + sel_bias[e] if sel_bias.shape[0] else probs[e]
            allowed[e] = logits[t, e] != -np.inf
        if n_group > 1:
            mask_groups(sel, n_group, n_group_used, allowed)
        for j in range(k):
            best = top_index(sel, allowed)
            allowed[best] = False
            ids[t, j] = best
            weights[t, j] = probs[best]
        finish_weights(weights[t], gating, norm_topk, w_scale)


@njit(cache=True, nogil=True, error_model="numpy")
def finish_weights(w, gating, norm_topk, w_scale):
    """The chosen experts' weights w (k,) in place: softmax ("softmax_weight"), sum-1
    normalisation, scale."""
    k = w.shape[0]
    if gating == GATE_SOFTMAX_WEIGHT:
        softmax_row(w, w)
    if norm_topk:
        s = np.float32(0.0)
        for j in range(k):
            s += w[j]
        total = max(s, np.float32(6.103515625e-5))
        for j in range(k):
            w[j] = w[j] / total
    if w_scale != 0.0 and w_scale != 1.0:
        for j in range(k):
            w[j] = w[j] * np.float32(w_scale)


track_sources(gate_row, softmax_row, top_index, mask_groups, route_gated, finish_weights)
