"""Expert arithmetic shared by peers and the coordinator.

Two ways to split a layer's routed experts between nodes:

- compact: each node returns one partial sum per token over its own slots,
  computed by `moe_ffn` with the other slots masked (-1); the coordinator adds
  the partials. This changes only the order of float additions.
- exact: each node returns every chosen expert's own output y (one row per
  (token, slot) pair); the coordinator adds w * y per token in slot order
  j = 0..k-1 starting from 0.0 with `kernels.sum_slots`, the sum `kernels.moe_ffn`
  ends with, so the result is bit-identical to one node's.

`pair_outputs` gets y from an ordinary `moe(x, ids, weights)` call: each pair
becomes a row of its own with one slot of weight 1.0, and 0.0 + 1.0 * y == y.
An expert's output row does not depend on the other rows of the batch (see
kernels/matmul.py), so y is the same bits as inside a single-node call.
"""

import numpy as np

F32 = np.float32


def pairs_of(ids):
    """(rows, slots) of the valid (id >= 0) pairs of ids (T, k), row-major."""
    return np.nonzero(np.asarray(ids) >= 0)


def pair_outputs(moe, x, ids):
    """Each valid pair's expert output (P, E), pairs row-major; `moe(x, ids, w)` computes."""
    rows, slots = pairs_of(ids)
    if len(rows) == 0:
        return np.zeros((0, x.shape[1]), F32)
    xp = np.ascontiguousarray(x[rows], dtype=F32)  # (P, E)
    idp = np.ascontiguousarray(np.asarray(ids)[rows, slots][:, None], dtype=np.int32)  # (P, 1)
    return moe(xp, idp, np.ones((len(rows), 1), F32))  # (P, E)


def fuse_rows(x, ids, tau):
    """Token fusion: merge rows routed to the same slots and experts whose hidden
    states are within relative distance tau (||x - r|| <= tau * ||r||) of a
    representative r (the first row of its cluster).

    Returns (reps (R,) row indices to send, inverse (T,) index into reps)."""
    n = len(x)
    if len(ids) != n:
        raise ValueError(f"fuse_rows: {n} rows of x, {len(ids)} of ids")
    if tau <= 0 or n < 2:
        return np.arange(n), np.arange(n)
    keys = np.ascontiguousarray(ids).view(np.dtype((np.void, ids.dtype.itemsize * ids.shape[1])))
    _, key_of = np.unique(keys.reshape(-1), return_inverse=True)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))
    reps, inverse = [], np.empty(n, np.int64)
    by_key, rep_pos = {}, {}
    for t in range(n):
        cands = by_key.setdefault(int(key_of[t]), [])
        if cands:
            c = np.asarray(cands)
            dist = np.sqrt(((x[c].astype(np.float64) - x[t]) ** 2).sum(axis=1))
            ok = np.flatnonzero(dist <= tau * norms[c])
            if len(ok):
                inverse[t] = rep_pos[int(c[ok[np.argmin(dist[ok])]])]
                continue
        cands.append(t)
        rep_pos[t] = inverse[t] = len(reps)
        reps.append(t)
    return np.asarray(reps, np.int64), inverse
