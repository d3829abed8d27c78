"""moe_ffn: one jitted call for a layer's routed experts, any mix of quant types.

out[t] = sum over slots j = 0..k-1 with ids[t, j] >= 0, in slot order, starting from 0.0,
         of weights[t, j] * (down_e(act(gate_e x[t] + bg_e, up_e x[t] + bu_e)) + bd_e),
         e = ids[t, j].

`act` is one of `EXPERT_ACTS` (the architecture's `expert_act`): "silu" silu(g) * u,
"relu" relu(g) * u (ggml's reglu), "swiglu_oai" gpt-oss's clamped SwiGLU (ggml's
swiglu_oai: x = min(g, 7), y = clamp(u, -7, 7), x * sigmoid(1.702 x) * (y + 1)).
The biases bg/bu/bd (gpt-oss) are rows of a per-layer float32 array (n_expert,
2 n_ff + n_embd) = [gate bias | up bias | down bias], added in float32 after each
matmul as ggml's add_id does; an empty (0, 0) array means none.

The (token, slot) pairs are grouped by expert, each used expert runs once on all its
tokens (mat-mat, so its blocks are decoded once), its outputs land in one row per pair,
and only then are the rows added per token in slot order (`slots.sum_slots`). Every
matmul output is a serial sum that does not depend on the batch (see matmul.py), so a batch gives exactly
the same bits as the same tokens one by one.

`mats` is a numba.typed.List of read-only 2-D C-contiguous uint8 arrays, three per
expert (gate, up, down); unused experts may hold the (0, 0) `placeholder()`. Build it
with `expert_list`, replace entries with `set_expert`; `check_types` rejects types the
kernels lack (moe_ffn checks the experts it uses itself).
"""

import numba
import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from meldlite.errors import OptionError, UnsupportedError
from meldlite.kernels._cache import track_sources
from meldlite.kernels.actquant import MODE_BY_ID, NONE, round_row
from meldlite.kernels.matmul import matmat_rows, writable_rows
from meldlite.kernels.mats import expert_list
from meldlite.kernels.qdot import PARALLEL_MIN_BYTES, quantize_row, rows_times_tokens
from meldlite.kernels.qtypes import BLOCK_BYTES, BLOCK_ELEMS, SUPPORTED_IDS, check_type, row_bytes
from meldlite.kernels.slots import sum_slots_parallel, sum_slots_serial

GATE, UP, DOWN = 0, 1, 2  # matrix index within an expert's triple
ACT_SILU, ACT_RELU, ACT_SWIGLU_OAI = 0, 1, 2
EXPERT_ACTS = {"silu": ACT_SILU, "relu": ACT_RELU, "swiglu_oai": ACT_SWIGLU_OAI}
OAI_ALPHA = np.float32(1.702)  # llama.cpp's build_moe_ffn constants for swiglu_oai
OAI_LIMIT = np.float32(7.0)
NO_BIAS = np.zeros((0, 0), np.float32)  # (0, 0) no expert biases


@njit(inline="always")
def activate(v, u, act):
    """One gated activation in float32: v the gate projection, u the up projection."""
    if act == ACT_RELU:
        return v * u if v > np.float32(0.0) else np.float32(0.0)
    if act == ACT_SWIGLU_OAI:
        x = min(v, OAI_LIMIT)
        y = -OAI_LIMIT if u < -OAI_LIMIT else (OAI_LIMIT if u > OAI_LIMIT else u)
        return x / (np.float32(1.0) + np.exp(OAI_ALPHA * (-x))) * (y + np.float32(1.0))
    return v / (np.float32(1.0) + np.exp(-v)) * u


@njit(cache=True, nogil=True, error_model="numpy")
def gated(g, u, act, bias, r0, r1):
    """g[:, r0:r1] <- act(g + bias gate, u + bias up) in float32 (no bias when `bias`
    is empty); g, u (n, n_ff), bias (2 n_ff + n_embd,) or (0,)."""
    n_ff = g.shape[1]
    for i in range(g.shape[0]):
        for c in range(r0, r1):
            v, w = g[i, c], u[i, c]
            if bias.shape[0]:
                v += bias[c]
                w += bias[n_ff + c]
            g[i, c] = activate(v, w, act)


@njit(cache=True, nogil=True, error_model="numpy")
def add_down_bias(y, bias, n_ff):
    """y (n, n_embd) += the down bias, the last n_embd values of bias (none when empty)."""
    if bias.shape[0]:
        for i in range(y.shape[0]):
            for c in range(y.shape[1]):
                y[i, c] += bias[2 * n_ff + c]


@njit(cache=True, nogil=True, error_model="numpy")
def group_by_expert(ids, n_expert):
    """Pairs p = t*k + j sorted by expert (stable), and starts (n_expert+1,) into them."""
    n_tok, k = ids.shape
    starts = np.zeros(n_expert + 1, dtype=np.int64)  # (n_expert+1,)
    for t in range(n_tok):
        for j in range(k):
            if ids[t, j] >= 0:
                starts[ids[t, j] + 1] += 1
    starts = np.cumsum(starts)
    fill = starts[:-1].copy()  # (n_expert,)
    pairs = np.empty(starts[-1], dtype=np.int64)  # (n_pairs,)
    for t in range(n_tok):
        for j in range(k):
            e = ids[t, j]
            if e >= 0:
                pairs[fill[e]] = t * k + j
                fill[e] += 1
    return pairs, starts


@njit(cache=True, nogil=True, error_model="numpy")
def rounded(a, mode):
    """a (n, m) with each row rounded per activation mode (a itself when mode is NONE)."""
    if mode == NONE:
        return a
    r = np.empty_like(a)  # (n, m)
    for i in range(a.shape[0]):
        round_row(a[i], mode, r[i])
    return r


@njit(cache=True, nogil=True, error_model="numpy")
def expert_ffn(x, toks, gate, up, down, tys, modes, act, bias, y):
    """y (n, n_embd) <- down(act(gate xs, up xs)) for xs = x[toks], with the expert's
    biases (n_bias,) when not empty; False on unknown type.

    `modes` (3,) rounds each matrix's input activations as llama.cpp does (actquant)."""
    n = toks.shape[0]
    xs = np.empty((n, x.shape[1]), dtype=np.float32)  # (n, n_embd)
    for i in range(n):
        xs[i] = x[toks[i]]
    g = np.empty((n, gate.shape[0]), dtype=np.float32)  # (n, n_ff)
    u = np.empty((n, up.shape[0]), dtype=np.float32)  # (n, n_ff)
    xg = rounded(xs, modes[GATE])  # (n, n_embd)
    xu = xg if modes[UP] == modes[GATE] else rounded(xs, modes[UP])  # (n, n_embd)
    ok = matmat_rows(gate, np.int64(tys[GATE]), xg, g)
    ok &= matmat_rows(up, np.int64(tys[UP]), xu, u)
    gated(g, u, act, bias, 0, g.shape[1])
    ok &= matmat_rows(down, np.int64(tys[DOWN]), rounded(g, modes[DOWN]), y)
    add_down_bias(y, bias, g.shape[1])
    return ok


@njit(cache=True, nogil=True, error_model="numpy")
def rows_of_pairs(pairs, n_tok, k):
    """row_of (n_tok, k): the row i of ys holding pair pairs[i] = t*k + j."""
    row_of = np.zeros((n_tok, k), dtype=np.int64)  # (n_tok, k)
    for i in range(pairs.shape[0]):
        row_of[pairs[i] // k, pairs[i] % k] = i
    return row_of


@njit(cache=True, nogil=True, error_model="numpy")
def expert_bias(bias, e):
    """Expert e's biases (2 n_ff + n_embd,), or an empty row when bias is (0, 0)."""
    return bias[e] if bias.shape[0] else bias.ravel()[:0]


@njit(cache=True, nogil=True, error_model="numpy")
def moe_ffn_kernel(x, ids, weights, mats, types, modes, act, bias, out):
    """The whole routed-expert step; False if some used expert has an unknown type."""
    pairs, starts = group_by_expert(ids, types.shape[0])
    ys = np.empty((pairs.shape[0], x.shape[1]), dtype=np.float32)  # (n_pairs, n_embd)
    toks = pairs // ids.shape[1]  # (n_pairs,) token of each pair
    ok = True
    for e in range(types.shape[0]):
        s, s_end = starts[e], starts[e + 1]
        if s_end > s:
            ok &= expert_ffn(
                x,
                toks[s:s_end],
                mats[3 * e + GATE],
                mats[3 * e + UP],
                mats[3 * e + DOWN],
                types[e],
                modes[e],
                act,
                expert_bias(bias, e),
                ys[s:s_end],
            )
    sum_slots_parallel(ids, weights, ys, rows_of_pairs(pairs, ids.shape[0], ids.shape[1]), out)
    return ok


# ---------------------------------------------------------------- integer path (llama_numerics)
# The same sum as moe_ffn_kernel with rounded activations, computed as llama.cpp does:
# integer dot products against 8-bit activation codes (qdot.py). Work is split into
# (expert, ITEM_ROWS rows) items: one parallel pass for gate+up+SwiGLU, one for down.
# Each item slices its expert's arrays (reference counts), so items are not too small:
# 64 rows give 64 + 128 items for 8 experts of 512 x 1024, plenty for a few threads.

ITEM_ROWS = 64
WHOLE_EXPERTS_PER_THREAD = 4  # used experts per thread from which each expert is one item


@njit(cache=True, nogil=True, error_model="numpy")
def _act_slots(ids, modes):
    """slot (n_modes,) of each activation mode the used experts' gate/up need (-1: none)."""
    slot = np.full(8, -1, dtype=np.int64)  # (n_modes,) modes are small ints (actquant)
    n = 0
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if e >= 0:
                for m in range(2):
                    if slot[modes[e, m]] < 0:
                        slot[modes[e, m]] = n
                        n += 1
    return slot, n


@njit(cache=True, nogil=True, error_model="numpy")
def _items(starts, n_rows_of, types, which):
    """Work items (expert, first row) over the used experts' matrices `which`."""
    n = 0
    for e in range(types.shape[0]):
        if starts[e + 1] > starts[e]:
            n += (n_rows_of[e, which] + ITEM_ROWS - 1) // ITEM_ROWS
    item_e = np.empty(n, dtype=np.int64)  # (n_items,)
    item_r = np.empty(n, dtype=np.int64)  # (n_items,)
    i = 0
    for e in range(types.shape[0]):
        if starts[e + 1] > starts[e]:
            for r0 in range(0, n_rows_of[e, which], ITEM_ROWS):
                item_e[i] = e
                item_r[i] = r0
                i += 1
    return item_e, item_r


@njit(cache=True, nogil=True, error_model="numpy")
def _gate_up_item(mats, types, e, r0, starts, toks, slot, modes, act, bias, qa, da, bs, xr, g, u):
    """g/u[p, r0:r0+ITEM_ROWS] for the pairs p of expert e, then g <- act(g, u)."""
    s, s_end = starts[e], starts[e + 1]
    gate, up = mats[3 * e + GATE], mats[3 * e + UP]
    r1 = min(gate.shape[0], r0 + ITEM_ROWS)
    a, b = slot[modes[e, GATE]], slot[modes[e, UP]]
    rows_times_tokens(
        gate, types[e, GATE], r0, r1, qa[a], da[a], bs[a], xr[a], toks[s:s_end], g[s:s_end], True
    )
    rows_times_tokens(
        up, types[e, UP], r0, r1, qa[b], da[b], bs[b], xr[b], toks[s:s_end], u[s:s_end], True
    )
    gated(g[s:s_end], u[s:s_end], act, expert_bias(bias, e), r0, r1)


@njit(cache=True, nogil=True, error_model="numpy")
def _down_item(mats, types, e, r0, starts, pair_ids, bias, qa, da, bs, xr, ys):
    s, s_end = starts[e], starts[e + 1]
    down = mats[3 * e + DOWN]
    r1 = min(down.shape[0], r0 + ITEM_ROWS)
    rows_times_tokens(
        down, types[e, DOWN], r0, r1, qa, da, bs, xr, pair_ids[s:s_end], ys[s:s_end], True
    )
    if bias.shape[0]:
        n_ff = mats[3 * e + GATE].shape[0]
        for p in range(s, s_end):
            for c in range(r0, r1):
                ys[p, c] += bias[e, 2 * n_ff + c]


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _gate_up_parallel(
    mats, types, item_e, item_r, starts, toks, slot, modes, act, bias, qa, da, bs, xr, g, u
):
    for i in prange(item_e.shape[0]):
        _gate_up_item(
            mats,
            types,
            item_e[i],
            item_r[i],
            starts,
            toks,
            slot,
            modes,
            act,
            bias,
            qa,
            da,
            bs,
            xr,
            g,
            u,
        )


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _down_parallel(mats, types, item_e, item_r, starts, pair_ids, bias, qa, da, bs, xr, ys):
    for i in prange(item_e.shape[0]):
        _down_item(mats, types, item_e[i], item_r[i], starts, pair_ids, bias, qa, da, bs, xr, ys)


@njit(cache=True, nogil=True, error_model="numpy")
def _balanced(starts, used):
    """The used experts' pair counts differ at most twofold (whole experts then share
    the threads evenly enough)."""
    lo, hi = starts[-1], 0
    for e in used:
        n = starts[e + 1] - starts[e]
        lo, hi = min(lo, n), max(hi, n)
    return hi <= 2 * lo


@njit(cache=True, nogil=True, error_model="numpy")
def _expert_item(mats, types, e, starts, toks, slot, modes, act, bias, acts, down_acts, ys):
    """All of expert e for its pairs: gate/up and the activation, its pairs' down inputs
    rounded, then down; the same row items as the two-phase path, so the same bits.
    acts = (qa, da, bs, xr, g, u); down_acts = (qh, dh, bh, xh, pair_ids)."""
    qa, da, bs, xr, g, u = acts
    qh, dh, bh, xh, pair_ids = down_acts
    for r0 in range(0, mats[3 * e + GATE].shape[0], ITEM_ROWS):
        _gate_up_item(
            mats, types, e, r0, starts, toks, slot, modes, act, bias, qa, da, bs, xr, g, u
        )
    for p in range(starts[e], starts[e + 1]):
        quantize_row(g[p], modes[e, DOWN], qh[p], dh[p], bh[p], xh[p])
    for r0 in range(0, mats[3 * e + DOWN].shape[0], ITEM_ROWS):
        _down_item(mats, types, e, r0, starts, pair_ids, bias, qh, dh, bh, xh, ys)


@njit(parallel=True, cache=True, nogil=True, error_model="numpy")
def _experts_parallel(mats, types, used, starts, toks, slot, modes, act, bias, acts, down_acts, ys):
    """_expert_item for each used expert, in one parallel loop (one fork/join a layer)."""
    for i in prange(used.shape[0]):
        _expert_item(
            mats, types, used[i], starts, toks, slot, modes, act, bias, acts, down_acts, ys
        )


@njit(cache=True, nogil=True, error_model="numpy")
def moe_ffn_int_kernel(x, ids, weights, mats, types, modes, act, bias, out, whole_min):
    """moe_ffn_kernel with every matmul input rounded as llama.cpp does, by integer dots.

    With at least whole_min used experts whose pair counts differ at most twofold, each
    expert is one work item of a single parallel loop (gate/up, activation, down); else
    two loops over 64-row items (all gate/up rows, then all down rows). Same bits."""
    n_tok, n_embd = x.shape
    pairs, starts = group_by_expert(ids, types.shape[0])
    n_pairs = pairs.shape[0]
    toks = pairs // ids.shape[1]  # (n_pairs,) token of each pair
    n_rows_of = np.zeros((types.shape[0], 3), dtype=np.int64)  # (n_expert, 3)
    n_ff = 0
    work = 0
    for e in range(types.shape[0]):
        if starts[e + 1] > starts[e]:
            for m in range(3):
                n_rows_of[e, m] = mats[3 * e + m].shape[0]
                work += mats[3 * e + m].size * (starts[e + 1] - starts[e])
            n_ff = mats[3 * e + GATE].shape[0]
    # activations of x, once per rounding mode the gate/up matrices need
    slot, n_slots = _act_slots(ids, modes)
    nb = max(1, n_embd // 32)
    qa = np.empty((n_slots, n_tok, n_embd), dtype=np.int8)  # (S, T, E)
    da = np.empty((n_slots, n_tok, nb), dtype=np.float32)  # (S, T, E/32)
    bs = np.empty((n_slots, n_tok, nb), dtype=np.int32)  # (S, T, E/32)
    xr = np.empty((n_slots, n_tok, n_embd), dtype=np.float32)  # (S, T, E)
    for mode in range(slot.shape[0]):
        if slot[mode] >= 0:
            k = slot[mode]
            for t in range(n_tok):
                if ids[t].max() >= 0:
                    quantize_row(x[t], mode, qa[k, t], da[k, t], bs[k, t], xr[k, t])
    g = np.empty((n_pairs, n_ff), dtype=np.float32)  # (P, F) gate, then silu(gate) * up
    u = np.empty((n_pairs, n_ff), dtype=np.float32)  # (P, F)
    nbf = max(1, n_ff // 32)
    qh = np.empty((n_pairs, n_ff), dtype=np.int8)  # (P, F) the down matrices' inputs
    dh = np.empty((n_pairs, nbf), dtype=np.float32)  # (P, F/32)
    bh = np.empty((n_pairs, nbf), dtype=np.int32)  # (P, F/32)
    xh = np.empty((n_pairs, n_ff), dtype=np.float32)  # (P, F)
    ys = np.empty((n_pairs, n_embd), dtype=np.float32)  # (P, E)
    pair_ids = np.arange(n_pairs)  # (P,) row of each pair in the down activations
    used = np.nonzero(starts[1:] > starts[:-1])[0]  # (U,) experts with pairs
    parallel = work >= PARALLEL_MIN_BYTES
    if parallel and used.shape[0] >= whole_min and _balanced(starts, used):
        acts, down_acts = (qa, da, bs, xr, g, u), (qh, dh, bh, xh, pair_ids)
        _experts_parallel(
            mats, types, used, starts, toks, slot, modes, act, bias, acts, down_acts, ys
        )
        sum_slots_serial(ids, weights, ys, rows_of_pairs(pairs, n_tok, ids.shape[1]), out)
        return
    item_e, item_r = _items(starts, n_rows_of, types, GATE)
    parallel = parallel and item_e.shape[0] > 1
    if parallel:
        _gate_up_parallel(
            mats, types, item_e, item_r, starts, toks, slot, modes, act, bias, qa, da, bs, xr, g, u
        )
    else:
        for i in range(item_e.shape[0]):
            _gate_up_item(
                mats,
                types,
                item_e[i],
                item_r[i],
                starts,
                toks,
                slot,
                modes,
                act,
                bias,
                qa,
                da,
                bs,
                xr,
                g,
                u,
            )
    # the down matrices' inputs: each pair's SwiGLU row, rounded per its expert's down type
    for e in range(types.shape[0]):
        for p in range(starts[e], starts[e + 1]):
            quantize_row(g[p], modes[e, DOWN], qh[p], dh[p], bh[p], xh[p])
    item_e, item_r = _items(starts, n_rows_of, types, DOWN)
    if parallel:
        _down_parallel(mats, types, item_e, item_r, starts, pair_ids, bias, qh, dh, bh, xh, ys)
    else:
        for i in range(item_e.shape[0]):
            _down_item(
                mats, types, item_e[i], item_r[i], starts, pair_ids, bias, qh, dh, bh, xh, ys
            )
    sum_slots_serial(ids, weights, ys, rows_of_pairs(pairs, n_tok, ids.shape[1]), out)


def check_types(types, experts=None) -> None:
    """Raise UnsupportedError if an expert in `experts` (default: all) has a type the kernels lack."""
    types = np.asarray(types)
    rows = np.arange(types.shape[0]) if experts is None else np.asarray(experts)
    bad = ~np.isin(types[rows], SUPPORTED_IDS)  # (n_checked, 3)
    if bad.any():
        i, m = np.argwhere(bad)[0]
        name = (
            GGMLQuantizationType(types[rows[i], m]).name
            if types[rows[i], m] in GGMLQuantizationType._value2member_map_
            else f"id {types[rows[i], m]}"
        )
        raise UnsupportedError(
            f"expert {rows[i]} {('gate', 'up', 'down')[m]} matrix has ggml type "
            f"{name}, which the kernels do not support"
        )


def _check_expert_shapes(mats, types, e, n_embd) -> None:
    gate, up, down = mats[3 * e + GATE], mats[3 * e + UP], mats[3 * e + DOWN]
    n_ff = gate.shape[0]
    try:
        want = (
            (n_ff, row_bytes(check_type(types[e, GATE]), n_embd)),
            (n_ff, row_bytes(check_type(types[e, UP]), n_embd)),
            (n_embd, row_bytes(check_type(types[e, DOWN]), n_ff)),
        )
    except OptionError as err:
        raise OptionError(
            f"expert {e} (n_embd={n_embd}, n_ff={n_ff} from its gate matrix "
            f"of shape {gate.shape}): {err}"
        ) from None
    for name, arr, shape in zip(("gate", "up", "down"), (gate, up, down), want):
        if arr.shape != shape or not arr.flags.c_contiguous:
            raise OptionError(
                f"expert {e} {name} matrix has shape {arr.shape}, expected a "
                f"C-contiguous {shape} for n_embd={n_embd}, n_ff={n_ff}"
            )


def _plain(a, dtype, ndim):
    """a is already a C-contiguous ndarray of dtype with ndim dimensions (the common case)."""
    return type(a) is np.ndarray and a.dtype == dtype and a.ndim == ndim and a.flags.c_contiguous


def _check_inputs(x, ids, weights, types):
    if (
        _plain(x, np.float32, 2)
        and x.flags.writeable
        and _plain(ids, np.int32, 2)
        and _plain(weights, np.float32, 2)
        and _plain(types, np.int32, 2)
        and ids.shape[0] == x.shape[0]
        and weights.shape == ids.shape
        and types.shape[1] == 3
    ):
        return x, ids, weights, types
    x = np.asarray(x)
    if x.dtype != np.float32 or x.ndim != 2:
        raise OptionError(f"x must be float32 (n_tok, n_embd), got {x.dtype} {x.shape}")
    ids, weights, types = np.asarray(ids), np.asarray(weights), np.asarray(types)
    if ids.ndim != 2 or ids.shape[0] != x.shape[0] or not np.issubdtype(ids.dtype, np.integer):
        raise OptionError(
            f"ids must be integer (n_tok={x.shape[0]}, k), got {ids.dtype} {ids.shape}"
        )
    if weights.dtype != np.float32 or weights.shape != ids.shape:
        raise OptionError(
            f"weights must be float32 {ids.shape}, got {weights.dtype} {weights.shape}"
        )
    if types.ndim != 2 or types.shape[1] != 3 or not np.issubdtype(types.dtype, np.integer):
        raise OptionError(f"types must be integer (n_expert, 3), got {types.dtype} {types.shape}")
    return (
        writable_rows(x, x.shape[1]),
        np.ascontiguousarray(ids, dtype=np.int32),
        np.ascontiguousarray(weights),
        np.ascontiguousarray(types, dtype=np.int32),
    )


_SUPPORTED = np.zeros(len(MODE_BY_ID), dtype=np.bool_)  # (n_type_ids,) types the kernels decode
_SUPPORTED[SUPPORTED_IDS] = True
_TABLES = (_SUPPORTED, BLOCK_ELEMS, BLOCK_BYTES, MODE_BY_ID)  # _checked_moe's per-type tables


@njit(cache=True, nogil=True, error_model="numpy")
def _fast_checks(
    n_embd, ids, mats, types, supported, block_elems, block_bytes, llama_numerics, mode_by_id, modes
):
    """True if mats has 3 entries per expert and every used expert id is in range, has
    supported types and matrices of the right shapes (then modes (n_expert, 3) holds each
    matrix's activation rounding); False sends the caller to the checks that name the
    problem."""
    n_expert = types.shape[0]
    if len(mats) != 3 * n_expert:
        return False
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if e < -1 or e >= n_expert:
                return False
    for e in range(n_expert):
        for m in range(3):
            ty = types[e, m]
            modes[e, m] = mode_by_id[ty] if llama_numerics and 0 <= ty < mode_by_id.shape[0] else 0
    seen = np.zeros(n_expert, dtype=np.bool_)  # (n_expert,)
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if e < 0 or seen[e]:
                continue
            seen[e] = True
            for m in range(3):
                ty = types[e, m]
                if ty < 0 or ty >= supported.shape[0] or not supported[ty]:
                    return False
            gate, up, down = mats[3 * e + GATE], mats[3 * e + UP], mats[3 * e + DOWN]
            n_ff = gate.shape[0]
            for m, mat, rows, cols in (
                (GATE, gate, n_ff, n_embd),
                (UP, up, n_ff, n_embd),
                (DOWN, down, n_embd, n_ff),
            ):
                el = block_elems[types[e, m]]
                if (
                    cols % el
                    or mat.shape[0] != rows
                    or mat.shape[1] != cols // el * block_bytes[types[e, m]]
                ):
                    return False
    return True


@njit(cache=True, nogil=True, error_model="numpy")
def distinct_experts(ids, n_expert):
    """Number of distinct expert ids in [0, n_expert) in ids (T, k) (-1 = skipped)."""
    seen = np.zeros(n_expert, dtype=np.bool_)  # (n_expert,)
    n = 0
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if 0 <= e < n_expert and not seen[e]:
                seen[e] = True
                n += 1
    return n


REFUSED, NO_KERNEL = -1, -2  # _checked_moe's failures


@njit(cache=True, nogil=True, error_model="numpy")
def _checked_moe(x, ids, weights, mats, types, tables, llama_numerics, act, bias, out, whole_min):
    """_fast_checks, then the integer (llama_numerics) or float kernel into out, in one
    call from Python. Returns REFUSED when the checks refuse the inputs, NO_KERNEL when the
    float kernel lacks a type, else 0. tables = (supported, block_elems, block_bytes,
    mode_by_id) per type id, as _fast_checks takes them; whole_min: see
    moe_ffn_int_kernel."""
    supported, block_elems, block_bytes, mode_by_id = tables
    modes = np.empty_like(types)  # (n_expert, 3) activation rounding per matrix
    if not _fast_checks(
        x.shape[1],
        ids,
        mats,
        types,
        supported,
        block_elems,
        block_bytes,
        llama_numerics,
        mode_by_id,
        modes,
    ):
        return REFUSED
    if llama_numerics:
        moe_ffn_int_kernel(x, ids, weights, mats, types, modes, act, bias, out, whole_min)
    elif not moe_ffn_kernel(x, ids, weights, mats, types, modes, act, bias, out):
        return NO_KERNEL
    return 0


def moe_ffn(
    x, ids, weights, mats, types, out=None, llama_numerics=False, act="silu", bias=None
) -> np.ndarray:
    """Routed experts of one layer for x (n_tok, n_embd) -> float32 (n_tok, n_embd).

    ids (n_tok, k) int32 expert per slot (-1 = skipped), weights (n_tok, k) float32,
    mats typed List of 3*n_expert uint8 matrices, types (n_expert, 3) ggml type ids.
    llama_numerics: round each matrix's input as llama.cpp does (see actquant) and multiply
    by integer dot products (qdot), as llama.cpp's CPU backend does.
    act: a key of EXPERT_ACTS; bias: None, or float32 (n_expert, 2 n_ff + n_embd) expert biases."""
    x, ids, weights, types = _check_inputs(x, ids, weights, types)
    act_id = _act_id(act)
    bias = _check_bias(bias, types.shape[0])
    if isinstance(mats, list):
        mats = expert_list(mats)
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    elif out.dtype != np.float32 or out.shape != x.shape or not out.flags.c_contiguous:
        raise OptionError(f"out must be a C-contiguous float32 array of shape {x.shape}")
    if bias.shape[0] and _used_n_ff(ids, mats) * 2 + x.shape[1] != bias.shape[1]:
        raise OptionError(
            f"expert biases have {bias.shape[1]} values per expert, expected "
            f"2 n_ff + n_embd = {_used_n_ff(ids, mats) * 2 + x.shape[1]}"
        )
    whole_min = WHOLE_EXPERTS_PER_THREAD * numba.get_num_threads()  # (jitted: uncacheable)
    numerics = bool(llama_numerics)
    status = _checked_moe(
        x, ids, weights, mats, types, _TABLES, numerics, act_id, bias, out, whole_min
    )
    if status == REFUSED:
        if len(mats) != 3 * types.shape[0]:
            raise OptionError(
                f"mats has {len(mats)} entries, expected 3 per expert = {3 * types.shape[0]}"
            )
        _slow_checks(x, ids, mats, types)
        raise AssertionError("moe_ffn: the fast checks refused inputs the full checks accept")
    if status == NO_KERNEL:
        raise AssertionError("jitted kernel rejected an expert type")  # checked above
    return out


def _act_id(act):
    if act not in EXPERT_ACTS:
        raise OptionError(f"expert activation {act!r} is not one of {', '.join(EXPERT_ACTS)}")
    return EXPERT_ACTS[act]


def _check_bias(bias, n_expert):
    """bias as a C-contiguous float32 (n_expert, n) array, NO_BIAS for None or empty."""
    if bias is None or (isinstance(bias, np.ndarray) and bias.size == 0):
        return NO_BIAS
    if not _plain(bias, np.float32, 2):
        bias = np.asarray(bias)
        if bias.dtype != np.float32 or bias.ndim != 2:
            raise OptionError(f"expert biases must be float32 (n_expert, n), got {bias.dtype}")
        bias = np.ascontiguousarray(bias)
    if bias.shape[0] != n_expert:
        raise OptionError(f"expert biases have {bias.shape[0]} rows, expected {n_expert}")
    return bias


def _used_n_ff(ids, mats):
    """n_ff of the first used expert (its gate matrix's rows); 0 when none is used."""
    used = ids[ids >= 0]
    return mats[3 * int(used[0]) + GATE].shape[0] if used.size else 0


def _slow_checks(x, ids, mats, types):
    """Raise the error that says what is wrong with the experts' inputs."""
    if ids.size and (ids.min() < -1 or ids.max() >= types.shape[0]):
        raise OptionError(
            f"expert ids must be -1 (skip) or in [0, {types.shape[0]}), "
            f"got {ids.min()}..{ids.max()}"
        )
    used = np.unique(ids[ids >= 0])
    check_types(types, used)
    for e in used:
        _check_expert_shapes(mats, types, int(e), x.shape[1])


track_sources(
    activate,
    gated,
    add_down_bias,
    expert_bias,
    group_by_expert,
    rounded,
    expert_ffn,
    rows_of_pairs,
    moe_ffn_kernel,
    _act_slots,
    _items,
    _gate_up_item,
    _down_item,
    _gate_up_parallel,
    _down_parallel,
    _balanced,
    _expert_item,
    _experts_parallel,
    moe_ffn_int_kernel,
    _fast_checks,
    _checked_moe,
    distinct_experts,
)
