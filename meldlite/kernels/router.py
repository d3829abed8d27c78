"""The router run on its own, before attention (`route_input`): for architectures
whose router reads the layer input rather than the FFN-normed state (smallthinker),
so that a layer's experts are known before its attention runs.

Same numerics as the router inside `attention.attention_block`: the router matrix
through qdot's kernels with its input rounded per its activation mode, then
`route.route_gated` (gating, selection bias, groups, renormalisation, scale).
Reference: `route_ref` on `reference.matmul_ref`'s logits.
"""

import numpy as np
from numba import njit

from meldlite.kernels._cache import track_sources
from meldlite.kernels.attention import project
from meldlite.kernels.route import route_gated


@njit(cache=True, nogil=True, error_model="numpy")
def route_input(
    x,
    wr,
    tr,
    mr,
    rbias,
    sel_bias,
    gating,
    n_group,
    n_group_used,
    norm_topk,
    w_scale,
    k_used,
    ids,
    weights,
):
    """ids/weights (T, k) <- top-k routing of x (T, E) by the router wr (X rows);
    rbias (X,), when not empty, is added to the logits (-inf masks a pruned expert);
    sel_bias .. w_scale: the gating of `route.route_gated`."""
    n_tok, n = x.shape
    nb = max(1, n // 32)
    qa = np.empty((n_tok, n), dtype=np.int8)  # (T, E)
    da = np.empty((n_tok, nb), dtype=np.float32)  # (T, E/32)
    bs = np.empty((n_tok, nb), dtype=np.int32)  # (T, E/32)
    xr = np.empty((n_tok, n), dtype=np.float32)  # (T, E)
    logits = np.empty((n_tok, wr.shape[0]), dtype=np.float32)  # (T, X)
    project(wr, tr, mr, x, qa, da, bs, xr, np.arange(n_tok), logits, True)
    if rbias.shape[0]:
        for t in range(n_tok):
            logits[t] += rbias
    route_gated(
        logits, k_used, gating, sel_bias, n_group, n_group_used, norm_topk, w_scale, ids, weights
    )


track_sources(route_input)
