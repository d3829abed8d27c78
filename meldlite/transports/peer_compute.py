"""The kernels a peer runs: its sessions' per-layer expert lists, warming the
kernels up before the first request, and a COMPUTE request's outputs.

Called from the peer's request loop only, so no other thread enters the kernels.
"""

import numpy as np

from meldlite import kernels
from meldlite.transports import protocol as P
from meldlite.transports.compute import pair_outputs

F32 = np.float32


def warm_up():
    """One tiny MoE call, so the first real request does not wait for Numba's cache."""
    e = 32
    mat = np.zeros((e, e * 4), np.uint8)  # (32, 128) F32 rows of 32 values
    mats = kernels.expert_list([mat, mat, mat])
    for llama_numerics in (False, True):
        kernels.moe_ffn(
            np.zeros((1, e), F32),  # x (1, E)
            np.zeros((1, 1), np.int32),  # ids (1, 1)
            np.ones((1, 1), F32),  # weights (1, 1)
            mats,
            np.zeros((1, 3), np.int32),  # types (X, 3)
            llama_numerics=llama_numerics,
        )


def build_layers(s, bank):
    """Session s's per-layer (typed matrix list, types (X, 3), held (X,)), placeholders
    for experts not held; then its kernels warmed up (the session is ready)."""
    layers = []
    for L in range(s.n_layer):
        arrays = [None] * (3 * s.n_expert)
        types = np.zeros((s.n_expert, 3), np.int32)  # (X, 3)
        held = np.zeros(s.n_expert, bool)  # (X,)
        for e in range(s.n_expert):
            ex = bank.get((s.model_hash, L, e)) if (L, e) in s.assigned else None
            if ex is not None:
                arrays[3 * e : 3 * e + 3] = ex.mats
                types[e] = ex.types
                held[e] = True
        layers.append((kernels.expert_list(arrays), types, held))
    s.layers = layers
    warm_session(s)


def warm_session(s):
    """One row through one expert of each distinct type triple, before the session is
    ready: kernels a first request would need are loaded (or compiled) now."""
    seen = set()
    x = np.zeros((1, s.n_embd), F32)  # (1, E)
    for mats, types, held in s.layers:
        for e in np.flatnonzero(held):
            key = tuple(types[e])
            if key not in seen:
                seen.add(key)
                kernels.moe_ffn(
                    x,
                    np.array([[e]], np.int32),  # (1, 1)
                    np.ones((1, 1), F32),  # (1, 1)
                    mats,
                    types,
                    llama_numerics=s.llama_numerics,
                    act=s.expert_act,
                )


def compute(s, h, payload, limits):
    """A COMPUTE request of session s: returns (y, x, ids), y (T, E) partial sums
    (compact) or (P, E) pair outputs (exact), x (T, E) and ids (T, k) as received."""
    r = h.req_id
    if not s.ready:
        raise P.WireError("NO_SESSION", "no experts assigned yet, or some still to load", r)
    if h.layer >= s.n_layer:
        raise P.WireError("BAD_REQUEST", f"layer {h.layer} of a {s.n_layer}-layer model", r)
    x, ids, weights = P.parse_compute(h, payload, s.n_embd, limits)  # (T, E), (T, k), (T, k)
    mats, types, held = s.layers[h.layer]
    if ids.size and (ids.min() < -1 or ids.max() >= s.n_expert):
        raise P.WireError(
            "BAD_REQUEST",
            f"expert ids {ids.min()}..{ids.max()} outside -1..{s.n_expert - 1}",
            r,
        )
    used = np.unique(ids[ids >= 0])
    if not held[used].all():
        missing = used[~held[used]]
        raise P.WireError(
            "NOT_HERE", f"layer {h.layer} experts {missing.tolist()} are not on this peer", r
        )

    def moe(xx, ii, ww):
        return kernels.moe_ffn(
            xx, ii, ww, mats, types, llama_numerics=s.llama_numerics, act=s.expert_act
        )

    y = pair_outputs(moe, x, ids) if h.exact else moe(x, ids, weights)
    return y, x, ids
