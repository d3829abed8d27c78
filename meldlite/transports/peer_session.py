"""A peer's sessions: per client (one coordinator connection, a ROUTER identity)
the model hash agreed in the handshake, the config and the experts assigned.
"""

import time
from dataclasses import dataclass, field

from meldlite.kernels.moe import EXPERT_ACTS
from meldlite.kernels.qtypes import check_type
from meldlite.transports import protocol as P


@dataclass
class Session:
    model_hash: str
    client: str
    n_embd: int = 0
    n_ff: int = 0
    n_layer: int = 0
    n_expert: int = 0
    llama_numerics: bool = True
    expert_act: str = "silu"  # the experts' gate activation (kernels.moe EXPERT_ACTS)
    assigned: dict = field(default_factory=dict)  # (layer, e) -> (g, u, d) types
    missing: set = field(default_factory=set)  # (layer, e) still to LOAD
    layers: list = None  # per layer: (typed mats, types (X, 3), held bool (X,))
    last_seen: float = 0.0

    @property
    def ready(self):
        return self.layers is not None and not self.missing


def read_assignment(s, obj, limits, req_id):
    """Set session s's config from an ASSIGN body; return its experts, (layer, e) -> types."""
    lim, r = limits, req_id
    s.n_embd = P.field(obj, "n_embd", int, r, 1, lim.n_embd)
    s.n_ff = P.field(obj, "n_ff", int, r, 1, lim.n_ff)
    s.n_layer = P.field(obj, "n_layer", int, r, 1, lim.layers)
    s.n_expert = P.field(obj, "n_expert", int, r, 1, lim.experts)
    s.llama_numerics = bool(P.field(obj, "llama_numerics", bool, r))
    s.expert_act = P.field(obj, "expert_act", str, r, optional=True) or "silu"
    if s.expert_act not in EXPERT_ACTS:
        raise P.WireError("BAD_REQUEST", f"expert_act {s.expert_act!r} is not supported", r)
    experts = P.field(obj, "experts", list, r)
    types = P.field(obj, "types", list, r)
    if len(experts) != len(types) or len(experts) > s.n_layer * s.n_expert:
        raise P.WireError(
            "BAD_REQUEST",
            "experts and types must be lists of equal length, at most n_layer * n_expert",
            r,
        )
    assigned = {}
    for pair, ty in zip(experts, types):
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and all(type(v) is int for v in pair)
            and 0 <= pair[0] < s.n_layer
            and 0 <= pair[1] < s.n_expert
        ):
            raise P.WireError("BAD_REQUEST", f"expert {pair!r} is not [layer, e] in range", r)
        if not (isinstance(ty, list) and len(ty) == 3 and all(type(v) is int for v in ty)):
            raise P.WireError("BAD_REQUEST", f"types {ty!r} are not three ggml type ids", r)
        assigned[tuple(pair)] = tuple(int(check_type(v)) for v in ty)
    return assigned


class Sessions:
    """The sessions by client identity; a dropped session's experts go back to `bank`."""

    def __init__(self, bank):
        self.bank = bank
        self.by_ident = {}  # identity -> Session

    def __len__(self):
        return len(self.by_ident)

    def idents(self):
        return list(self.by_ident)

    def open(self, ident, model_hash, client):
        """A new session for ident (replacing the one it had)."""
        self.drop(ident)
        s = self.by_ident[ident] = Session(model_hash, client, last_seen=time.monotonic())
        return s

    def of(self, ident, req_id):
        """ident's session (NO_SESSION error without one), marked as heard from now."""
        s = self.by_ident.get(ident)
        if s is None:
            raise P.WireError("NO_SESSION", "send HELLO first (or this peer restarted)", req_id)
        s.last_seen = time.monotonic()
        return s

    def drop(self, ident):
        s = self.by_ident.pop(ident, None)
        if s is not None:
            self.bank.release(s)

    def drop_all(self):
        for ident in self.idents():
            self.drop(ident)
