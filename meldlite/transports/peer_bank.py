"""A peer's expert bank: the expert matrices it holds, shared by the sessions of
one model (counted once against the memory budget), lent to sessions and taken
back when they end or are reassigned.

An expert comes from the peer's own GGUF file (read by `read_expert`) or from
the coordinator (LOAD, `receive`). One with no session using it stays until
room is needed (with a budget), or until another model's session asks for room
(without one: a rejoining coordinator of the same model finds it still here).
"""

import os
from dataclasses import dataclass

import numpy as np

from meldlite.experts.store import expert_biases
from meldlite.formats import KINDS
from meldlite.kernels.qtypes import check_type, row_bytes
from meldlite.transports import protocol as P


@dataclass
class Expert:
    """One expert's matrices (gate, up, down as uint8 (rows, row_bytes)) and types,
    and its biases (float32 (2 n_ff + n_embd,) = [gate | up | down]) when it has them."""

    mats: tuple
    types: tuple
    nbytes: int
    refs: int = 0  # sessions using it
    bias: np.ndarray = None


def expert_nbytes(types, n_embd, n_ff):
    """Bytes of one expert's gate, up and down matrices of these types."""
    g, u, d = (check_type(t) for t in types)
    return n_ff * row_bytes(g, n_embd) + n_ff * row_bytes(u, n_embd) + n_embd * row_bytes(d, n_ff)


def matrix_shapes(types, n_embd, n_ff):
    """(rows, row_bytes) of the gate, up and down matrices."""
    g, u, d = (check_type(t) for t in types)
    return (
        (n_ff, row_bytes(g, n_embd)),
        (n_ff, row_bytes(u, n_embd)),
        (n_embd, row_bytes(d, n_ff)),
    )


def read_expert(gguf, layer, e, types, n_embd, n_ff, req_id, bias=False, n_expert=0):
    """One expert from the peer's own file, by pread into owned memory (with its
    biases when `bias`: the layer has n_expert)."""
    mats, nbytes = [], 0
    shapes = matrix_shapes(types, n_embd, n_ff)
    with open(gguf.path, "rb") as f:
        for kind, ty, shape in zip(KINDS, types, shapes):
            t = gguf.expert_tensor(layer, kind, e)
            if int(t.ggml_type) != ty or tuple(t.raw.shape) != shape:
                raise P.WireError(
                    "MODEL_MISMATCH",
                    f"layer {layer} expert {e} {kind}: file has "
                    f"{t.qtype} {t.raw.shape}, coordinator expects type {ty} "
                    f"{shape}",
                    req_id,
                )
            buf = np.empty(shape, np.uint8)  # (rows, row_bytes)
            if os.preadv(f.fileno(), [memoryview(buf).cast("B")], t.offset) != buf.nbytes:
                raise OSError(f"{gguf.path}: short read of layer {layer} expert {e}")
            mats.append(buf)
            nbytes += buf.nbytes
    b = None
    if bias:
        b = expert_biases(gguf, layer, n_expert, n_embd, n_ff, expert=e)  # (2F+E,)
        if b.shape != (2 * n_ff + n_embd,):
            raise P.WireError(
                "MODEL_MISMATCH", f"layer {layer} expert {e}: the file has no expert biases", req_id
            )
    return Expert(tuple(mats), tuple(types), nbytes, bias=b)


class ExpertBank:
    """Experts by (model_hash, layer, e); `budget` bytes at most (None: no limit).

    gguf: the peer's model file, experts are read from (None: all arrive by LOAD)."""

    def __init__(self, gguf, budget):
        self.gguf = gguf
        self.budget = budget
        self.experts = {}  # (model_hash, layer, e) -> Expert

    def get(self, key):
        return self.experts.get(key)

    def held_bytes(self):
        return sum(ex.nbytes for ex in self.experts.values())

    def lend(self, s, assigned, req_id):
        """Give session s the experts `assigned` ((layer, e) -> types) in place of
        its old ones: those held (or in the file) now, the rest listed in s.missing."""
        self.release(s)
        new_bytes = sum(
            expert_nbytes(t, s.n_embd, s.n_ff)
            for (L, e), t in assigned.items()
            if (s.model_hash, L, e) not in self.experts
        )
        self.make_room(new_bytes, req_id, s.model_hash)
        s.assigned = assigned
        s.missing = set()
        for (L, e), ty in assigned.items():
            key = (s.model_hash, L, e)
            if key not in self.experts and self.gguf is not None:
                self.experts[key] = read_expert(
                    self.gguf, L, e, ty, s.n_embd, s.n_ff, req_id, s.bias, s.n_expert
                )
            if key in self.experts:
                if self.experts[key].types != ty:
                    raise P.WireError(
                        "MODEL_MISMATCH",
                        f"layer {L} expert {e} has types "
                        f"{self.experts[key].types}, coordinator says {ty}",
                        req_id,
                    )
                self.experts[key].refs += 1
            else:
                s.missing.add((L, e))

    def receive(self, s, layer, e, mats, bias=None):
        """Expert (layer, e) of session s arrived (LOAD): mats (gate, up, down) uint8,
        bias float32 (2F+E,) or None."""
        ty = s.assigned[(layer, e)]
        self.experts[(s.model_hash, layer, e)] = Expert(
            tuple(mats), ty, sum(m.nbytes for m in mats), refs=1, bias=bias
        )
        s.missing.discard((layer, e))

    def release(self, s):
        """Session s no longer uses its experts (they stay until room is needed)."""
        for L, e in s.assigned:
            ex = self.experts.get((s.model_hash, L, e))
            if ex is not None and (L, e) not in s.missing:
                ex.refs -= 1
        s.assigned, s.missing, s.layers = {}, set(), None

    def make_room(self, nbytes, req_id, model_hash=None):
        """Forget unused experts until nbytes more fit the budget (BUDGET error if not)."""
        if self.budget is None:  # keep unused experts of this model only (a rejoin needs them)
            for key in [k for k, ex in self.experts.items() if ex.refs <= 0 and k[0] != model_hash]:
                del self.experts[key]
            return
        for key in [k for k, ex in self.experts.items() if ex.refs <= 0]:
            if self.held_bytes() + nbytes <= self.budget:
                break
            del self.experts[key]
        if self.held_bytes() + nbytes > self.budget:
            raise P.WireError(
                "BUDGET",
                f"{nbytes / 2**20:.1f} MiB more of experts do not fit the "
                f"budget of {self.budget / 2**20:.1f} MiB "
                f"({self.held_bytes() / 2**20:.1f} MiB held)",
                req_id,
            )
