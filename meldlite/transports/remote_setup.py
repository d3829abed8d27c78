"""What the coordinator tells a peer as it joins: HELLO's body, the ASSIGN of
its placement node (config, experts, their ggml types) and the bytes of an
expert it asks for (LOAD). `PeerClient` calls these during its handshake.
"""

import numpy as np

from meldlite.formats import KINDS
from meldlite.transports import protocol as P


def expert_types(gguf, cfg, present):
    """(L, X, 3) ggml type ids of every expert's gate, up and down (0: pruned)."""
    return np.array(
        [
            [
                [
                    int(gguf.expert_tensor(L, kind, e).ggml_type) if present[L, e] else 0
                    for kind in KINDS
                ]
                for e in range(cfg.n_expert)
            ]
            for L in range(cfg.n_layer)
        ]
    )


class PeerSetup:
    """The handshake's content for the peers of `placement`, model gguf/cfg."""

    def __init__(self, gguf, cfg, placement, present, llama_numerics):
        self.gguf, self.cfg, self.placement = gguf, cfg, placement
        self.llama_numerics = llama_numerics
        self.model_hash = P.model_hash(gguf)
        self.types = expert_types(gguf, cfg, present)  # (L, X, 3)

    def hello(self):
        return {
            "protocol": P.PROTOCOL_VERSION,
            "model_hash": self.model_hash,
            "client": f"meldlite coordinator {self.gguf.path.name}",
        }

    def assignment(self, node):
        experts = self.placement.experts_of(node)
        return {
            "n_embd": self.cfg.n_embd,
            "n_ff": self.cfg.n_ff_exp,
            "n_layer": self.cfg.n_layer,
            "n_expert": self.cfg.n_expert,
            "llama_numerics": bool(self.llama_numerics),
            "expert_act": self.cfg.traits.expert_act,
            "experts": [[L, e] for L, e in experts],
            "types": [self.types[L, e].tolist() for L, e in experts],
        }

    def expert_frames(self, layer, e):
        """Expert (layer, e)'s gate, up and down as uint8 (rows, row_bytes) arrays."""
        return [np.ascontiguousarray(self.gguf.expert_tensor(layer, kind, e).raw) for kind in KINDS]
