"""`Model.info()`: what a model file holds, for `meldlite info` and apps."""

import math
from collections import Counter

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from meldlite.formats import layout


def is_expert_tensor(name):
    """Routed-expert weights (stacked `*_exps.weight` or per-expert `*_exps.E.weight`)."""
    return "_exps." in name


def parameter_counts(gguf, cfg):
    """(total, active per token) parameter counts.

    Active: every non-expert weight of the blocks, k of n routed experts per
    layer, the output matrix and one embedding row.
    """
    sizes = {n: math.prod(gguf.tensor(n).shape) for n in gguf.tensor_names()}
    total = sum(sizes.values())
    experts = sum(v for n, v in sizes.items() if is_expert_tensor(n))
    embd = sizes.get("token_embd.weight", 0)
    active = total - experts - embd + cfg.n_embd
    if cfg.is_moe:
        active += experts * cfg.n_expert_used // cfg.n_expert
    if "output.weight" not in sizes:  # tied: the embedding is also the output matrix
        active += embd
    return total, active


def expert_type_table(gguf, cfg):
    """Per layer, the (gate, up, down) quant type names of every expert."""
    if not cfg.is_moe:
        return []
    return [[list(t) for t in gguf.expert_types(i)] for i in range(cfg.n_layer)]


def expert_label(types):
    """ "Q4_K" when gate, up and down share a type, else "gate/up/down"."""
    return types[0] if len(set(types)) == 1 else "/".join(types)


def _bits(types):
    """Bits per weight summed over the three matrices (for ordering labels)."""
    return sum(
        8
        * GGML_QUANT_SIZES[GGMLQuantizationType[t]][1]
        / GGML_QUANT_SIZES[GGMLQuantizationType[t]][0]
        for t in types
    )


def expert_map(type_table, pruned):
    """Per layer, [(label, count)] of its experts' types, most bits first, with the
    pruned experts counted apart as ("pruned", n)."""
    out = []
    for layer, types in enumerate(type_table):
        gone = set(pruned[layer]) if layer < len(pruned) else set()
        kept = Counter(tuple(t) for e, t in enumerate(types) if e not in gone and t[0] != "pruned")
        row = [(expert_label(t), n) for t, n in sorted(kept.items(), key=lambda kv: -_bits(kv[0]))]
        out.append(row + ([("pruned", len(gone))] if gone else []))
    return out


def _layer_major(gguf, key, cfg):
    """A flat n_layer * n_expert metadata array as per-layer lists, or None."""
    v = gguf.metadata.get(key)
    if not isinstance(v, list) or len(v) != cfg.n_layer * cfg.n_expert:
        return None
    return [v[L * cfg.n_expert : (L + 1) * cfg.n_expert] for L in range(cfg.n_layer)]


def model_info(model):
    gguf, cfg = model.gguf, model.cfg
    total, active = parameter_counts(gguf, cfg)
    tensors = [
        {
            "name": n,
            "type": gguf.tensor(n).qtype,
            "shape": list(gguf.tensor(n).shape),
            "bytes": gguf.tensor(n).nbytes,
        }
        for n in gguf.tensor_names()
    ]
    expert_bytes = sum(t["bytes"] for t in tensors if is_expert_tensor(t["name"]))
    return {
        "path": model.path,
        "architecture": cfg.arch,
        "name": gguf.metadata.get("general.name", ""),
        "file_bytes": sum(t["bytes"] for t in tensors),
        "expert_bytes": expert_bytes,
        "n_vocab": cfg.n_vocab,
        "n_ctx_train": cfg.n_ctx_train,
        "n_ctx": model.n_ctx,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_head_kv": cfg.n_head_kv,
        "head_dim": cfg.head_dim_k,
        "n_expert": cfg.n_expert,
        "n_expert_used": cfg.n_expert_used,
        "n_ff": cfg.n_ff,
        "n_ff_exp": cfg.n_ff_exp,
        "n_ff_shexp": cfg.n_ff_shexp,
        "n_layer_dense_lead": cfg.n_layer_dense_lead,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank,
        "kv_bytes_per_token": cfg.kv_bytes_per_token()[0],
        "kv_bytes_per_token_naive": cfg.kv_bytes_per_token()[1],
        "kv_bytes": model.cache.nbytes,
        "n_parallel": model.cache.n_seq,
        "n_swa": cfg.n_swa,
        "swa_layers": [i for i in range(cfg.n_layer) if cfg.is_swa(i)],
        "expert_layout": gguf.expert_layout if cfg.is_moe else None,
        "params_total": total,
        "params_active": active,
        "tensor_types": dict(Counter(t["type"] for t in tensors)),
        "tensors": tensors,
        "expert_types": expert_type_table(gguf, cfg),
        "expert_pruned": [list(map(int, cfg.pruned(L))) for L in range(cfg.n_layer)]
        if cfg.is_moe
        else [],
        "expert_popularity": _layer_major(gguf, layout.KEY_POPULARITY, cfg),
        "expert_sensitivity": _layer_major(gguf, layout.KEY_SENSITIVITY, cfg),
    }
