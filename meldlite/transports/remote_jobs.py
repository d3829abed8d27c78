"""One layer's work split by node, and put back together.

A job is one group (node) of a layer's (token, slot) pairs: the token rows with
at least one of its slots, the other slots masked to -1. `split_jobs` makes
them from the router's node per pair; `combine` adds their results:
- compact: each job's result is one partial sum per row; partials are added
  in node order (only the float addition order differs from one node);
- exact: each job's result is one output per pair; w * y is summed per token
  in slot order (`kernels.sum_slots`), bit-identical to one node.
"""

from dataclasses import dataclass

import numpy as np

from meldlite import kernels
from meldlite.transports.compute import fuse_rows

F32 = np.float32


@dataclass
class Job:
    """One group (node) of one layer's pairs."""

    node: int
    rows: np.ndarray  # (m,) token rows this group touches
    ids: np.ndarray  # (m, k) int32, other nodes' slots -1
    weights: np.ndarray  # (m, k) float32, 0 where masked
    reps: np.ndarray  # (R,) rows actually computed (token fusion), indices into rows
    inverse: np.ndarray  # (m,) row of the computed block for each row
    remote: bool  # the node is a peer (so the wire applies)
    client: object = None
    generation: int = -1
    req_id: int = 0
    deadline: float = 0.0
    arrival: float = 0.0  # link model: when the request reaches the peer
    delivery: float = 0.0  # link model: when the reply reaches us
    result: np.ndarray = None  # compact: (m, E); exact: (pairs, E)


def split_jobs(x, ids, weights, node, local_node, fuse, counters):
    """One job per node of node (T, k) (-1: no node), in node order; x (T, E),
    ids (T, k), weights (T, k). A peer's rows are fused (tolerance `fuse`, 0: off)."""
    jobs = []
    for g in np.unique(node[node >= 0]):
        g = int(g)
        mask = node == g  # (T, k)
        rows = np.flatnonzero(mask.any(axis=1))  # (m,)
        ids_g = np.where(mask[rows], ids[rows], -1).astype(np.int32)  # (m, k)
        w_g = np.where(mask[rows], weights[rows], F32(0)).astype(F32)  # (m, k)
        remote = g != local_node
        if remote and fuse and len(rows) > 1:
            reps, inverse = fuse_rows(x[rows], ids_g, fuse)  # (R,), (m,)
            counters["rows_fused"] += len(rows) - len(reps)
        else:
            reps = inverse = np.arange(len(rows))
        jobs.append(Job(g, rows, ids_g, w_g, reps, inverse, remote))
    return jobs


def combine(jobs, ids, weights, shape, exact):
    """The layer's output (T, E) = shape from the jobs' results; ids, weights (T, k)."""
    if exact:
        y_of_pair = np.zeros(ids.shape, np.int64)  # (T, k)
        offset = 0
        for job in jobs:
            r, s = np.nonzero(job.ids >= 0)
            y_of_pair[job.rows[r], s] = offset + np.arange(len(r))
            offset += len(r)
        Y = np.concatenate([j.result for j in jobs]) if jobs else np.zeros((0, shape[1]), F32)
        return kernels.sum_slots(ids, weights, Y, y_of_pair)  # (T, E)
    out = np.zeros(shape, F32)  # (T, E)
    for job in sorted(jobs, key=lambda j: j.node):
        out[job.rows] += job.result
    return out
