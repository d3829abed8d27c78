"""The expert-store seam.

The forward pass never touches expert weights itself: it hands a layer's
hidden states, chosen expert ids and router weights to an `ExpertStore` and
gets back the weighted sum of the experts' outputs. A store may compute from
weights it holds (all resident, or a budgeted cache) or ask a remote peer.
Every store adds expert outputs in the same order (top-k slot order, see
`meldlite.kernels.moe_ffn`), so swapping stores does not change results.
"""

import numpy as np

from meldlite import kernels
from meldlite.errors import FormatError
from meldlite.formats.gguf import dequantize_raw
from meldlite.formats.layout import KINDS, stacked_bias_name
from meldlite.kernels.moe import distinct_experts


class ExpertStore:
    """Interface: `moe`, optional `hint` and `announce` for prefetch, `stats`, `close`."""

    def moe(self, layer, x, ids, weights):
        """x (T, E) float32, ids (T, k) int32 (-1 = skipped), weights (T, k) -> (T, E)."""
        raise NotImplementedError

    def hint(self, layer, ids):
        """Experts `ids` of `layer` will probably be needed soon (may be ignored)."""

    def announce(self, layer, ids):
        """Layer `layer` will call `moe` with exactly these ids (T, k) (-1 = skipped):
        its router ran before its attention. A store that loads experts may start
        their loads now (may be ignored)."""

    def stats(self):
        """Counters of this store (hits, misses, bytes read, ...)."""
        return {}

    def close(self):
        """Release files, threads and sockets."""


def expert_matrices(gguf, layer, n_expert, n_embd, n_ff):
    """(mats, types) of one layer for `kernels.moe_ffn`, as views of the file.

    Checks every expert matrix has the shape the config promises. A pruned expert
    left out of the file (never routed) gets placeholders and a stored expert's types;
    a layer without experts only placeholders (types F32).
    """
    arrays, types = [], np.empty((n_expert, 3), np.int32)  # types: (X, 3)
    expected = {"gate": (n_ff, n_embd), "up": (n_ff, n_embd), "down": (n_embd, n_ff)}
    stored = [e for e in range(n_expert) if gguf.expert_present(layer, e)]
    if not stored:  # a dense layer of a MoE model: never routed
        return kernels.expert_list([None] * (3 * n_expert)), np.zeros((n_expert, 3), np.int32)
    for e in range(n_expert):
        if e not in stored:
            arrays += [None] * 3
            types[e] = [
                int(gguf.expert_tensor(layer, kind, stored[0]).ggml_type)
                for kind in ("gate", "up", "down")
            ]
            continue
        for j, kind in enumerate(("gate", "up", "down")):
            t = gguf.expert_tensor(layer, kind, e)
            if tuple(t.shape) != expected[kind]:
                raise FormatError(
                    f"layer {layer} expert {e} {kind} has shape {t.shape}, "
                    f"expected {expected[kind]}"
                )
            arrays.append(np.asarray(t.raw))  # (rows, row_bytes)
            types[e, j] = int(t.ggml_type)
    kernels.check_types(types)
    return kernels.expert_list(arrays), types


def expert_biases(gguf, layer, n_expert, n_embd, n_ff, expert=None):
    """float32 (X, 2 n_ff + n_embd) = [gate | up | down] biases of a layer's experts
    (gpt-oss's stacked `ffn_*_exps.bias`), or an empty (0, 0) array when the file has
    none; with `expert`, that expert's row only ((2 n_ff + n_embd,), or (0,)). Small
    (under 1% of the experts' bytes), so the stores keep them resident."""
    names = [stacked_bias_name(layer, kind) for kind in KINDS]
    found = [gguf.has_tensor(n) for n in names]
    if not any(found):
        return np.zeros((0, 0) if expert is None else (0,), np.float32)
    if not all(found):
        missing = [n for n, ok in zip(names, found) if not ok]
        raise FormatError(f"layer {layer} has expert biases but lacks {', '.join(missing)}")
    parts = []
    for name, n in zip(names, (n_ff, n_ff, n_embd)):
        t = gguf.tensor(name)
        if tuple(t.shape) != (n_expert, n):
            raise FormatError(f"tensor {name!r} has shape {t.shape}, expected {(n_expert, n)}")
        rows = t.raw if expert is None else t.raw[expert : expert + 1]  # (X or 1, row_bytes)
        parts.append(dequantize_raw(rows, t.ggml_type, name))  # (X or 1, n)
    out = np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)  # (X, 2F+E)
    return out if expert is None else out[0]


def layer_biases(gguf, cfg):
    """expert_biases of every layer."""
    return [
        expert_biases(gguf, i, cfg.n_expert, cfg.n_embd, cfg.n_ff_exp) for i in range(cfg.n_layer)
    ]


class ResidentStore(ExpertStore):
    """All experts stay where the memory map puts them; nothing is evicted."""

    def __init__(self, gguf, cfg, llama_numerics=True):
        self._layers = [
            expert_matrices(gguf, i, cfg.n_expert, cfg.n_embd, cfg.n_ff_exp)
            for i in range(cfg.n_layer)
        ]
        self.bias = layer_biases(gguf, cfg)  # per layer (X, 2F+E) or (0, 0)
        self.act = cfg.traits.expert_act
        self.llama_numerics = llama_numerics
        self._calls = self._uses = 0

    def moe(self, layer, x, ids, weights):
        mats, types = self._layers[layer]
        out = kernels.moe_ffn(
            x,
            ids,
            weights,
            mats,
            types,
            llama_numerics=self.llama_numerics,
            act=self.act,
            bias=self.bias[layer],
        )
        self._calls += 1
        self._uses += distinct_experts(ids, types.shape[0])  # ids checked by moe_ffn
        return out

    def stats(self):
        """Every expert is always there: all uses are hits, nothing is read."""
        return {
            "expert_hits": self._uses,
            "expert_misses": 0,
            "bytes_read": 0,
            "prefetch_issued": 0,
            "prefetch_useful": 0,
            "stall_seconds": 0.0,
            "hit_rate": 1.0,
            "expert_uses": self._uses,
            "moe_calls": self._calls,
            "cache_policy": None,
            "expert_io": "resident",
            "prefetch": False,
        }
