"""The transformer forward pass shared by every supported architecture.

One straight function, `forward`, reads `cfg.traits` where architectures
differ. Shape letters: T tokens in the batch, E n_embd, H/G query/KV heads,
D head size, F FFN width, X experts, k experts used, V vocabulary.
"""

import numpy as np

from meldlite import layers
from meldlite.errors import OptionError

F32 = np.float32


class KVCache:
    """Keys and values of every layer, float16 like llama.cpp's default cache."""

    def __init__(self, cfg, n_ctx):
        self.n_ctx = n_ctx
        self.k = np.zeros((cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim_k), np.float16)  # (L, C, G, D)
        self.v = np.zeros((cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim_v), np.float16)  # (L, C, G, Dv)
        self.cos, self.sin = layers.rope_tables(n_ctx, cfg.n_rot, cfg.rope_base)          # (C, R/2)
        self.n_past = 0

    def reset(self):
        self.n_past = 0


def forward(cfg, w, store, cache, tokens, all_logits=True, on_route=None):
    """Run `tokens` (T,) after the `cache.n_past` tokens already in `cache`.

    Returns logits (T, V) float32, or (1, V) for the last token only when
    `all_logits` is False. `on_route(layer, h, ids)` (optional) sees each
    layer's routing, for profiling and prefetch.
    """
    tr = cfg.traits
    n_tok, pos0 = len(tokens), cache.n_past
    if pos0 + n_tok > cache.n_ctx:
        raise OptionError(f"context overflow: {pos0 + n_tok} tokens > n_ctx {cache.n_ctx}")
    if n_tok == 0:
        return np.zeros((0, cfg.n_vocab), F32)
    cos, sin = cache.cos[pos0:pos0 + n_tok], cache.sin[pos0:pos0 + n_tok]   # (T, R/2)
    nh, ng, dk, dv = cfg.n_head, cfg.n_head_kv, cfg.head_dim_k, cfg.head_dim_v
    x = w["token_embd.weight"].rows(tokens)                                  # (T, E)

    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        # --- attention ---
        h = layers.rms_norm(x, w[p + "attn_norm.weight"], cfg.rms_eps)      # (T, E)
        q = w[p + "attn_q.weight"] @ h                                       # (T, H*D)
        k = w[p + "attn_k.weight"] @ h                                       # (T, G*D)
        v = w[p + "attn_v.weight"] @ h                                       # (T, G*Dv)
        for name, t in (("attn_q.bias", q), ("attn_k.bias", k), ("attn_v.bias", v)):
            if p + name in w:
                t += w[p + name]
        if tr.qk_norm == "full":
            q = layers.rms_norm(q, w[p + "attn_q_norm.weight"], cfg.rms_eps)  # (T, H*D)
            k = layers.rms_norm(k, w[p + "attn_k_norm.weight"], cfg.rms_eps)  # (T, G*D)
        q = q.reshape(n_tok, nh, dk)                                         # (T, H, D)
        k = k.reshape(n_tok, ng, dk)                                         # (T, G, D)
        if tr.qk_norm == "head":
            q = layers.rms_norm(q, w[p + "attn_q_norm.weight"], cfg.rms_eps)  # (T, H, D)
            k = layers.rms_norm(k, w[p + "attn_k_norm.weight"], cfg.rms_eps)  # (T, G, D)
        q = layers.rope(q, cos, sin, cfg.n_rot, tr.rope_neox)               # (T, H, D)
        k = layers.rope(k, cos, sin, cfg.n_rot, tr.rope_neox)               # (T, G, D)
        cache.k[i, pos0:pos0 + n_tok] = k
        cache.v[i, pos0:pos0 + n_tok] = v.reshape(n_tok, ng, dv)
        a = layers.attention(q, cache.k[i, :pos0 + n_tok], cache.v[i, :pos0 + n_tok], pos0)  # (T, H*Dv)
        a = w[p + "attn_output.weight"] @ a                                  # (T, E)
        if p + "attn_output.bias" in w:
            a += w[p + "attn_output.bias"]
        x = x + a                                                            # (T, E)

        # --- feed-forward: routed experts (+ shared expert) or dense ---
        h = layers.rms_norm(x, w[p + "ffn_norm.weight"], cfg.rms_eps)       # (T, E)
        if cfg.is_moe:
            router = w[p + "ffn_gate_inp.weight"] @ h                        # (T, X)
            ids, weights = layers.route(router, cfg.n_expert_used, tr.norm_topk)  # (T, k), (T, k)
            if on_route is not None:
                on_route(i, h, ids)
            f = store.moe(i, h, ids, weights)                                # (T, E)
            if tr.shared_expert:
                g = w[p + "ffn_gate_shexp.weight"] @ h                       # (T, Fs)
                u = w[p + "ffn_up_shexp.weight"] @ h                         # (T, Fs)
                s = w[p + "ffn_down_shexp.weight"] @ (layers.silu(g) * u)    # (T, E)
                gate = (h @ w[p + "ffn_gate_inp_shexp.weight"])[:, None]     # (T, 1)
                f = f + s * (layers.silu(gate) / gate)                       # (T, E)
        else:
            g = w[p + "ffn_gate.weight"] @ h                                 # (T, F)
            u = w[p + "ffn_up.weight"] @ h                                   # (T, F)
            f = w[p + "ffn_down.weight"] @ (layers.silu(g) * u)              # (T, E)
        x = x + f                                                            # (T, E)

    cache.n_past = pos0 + n_tok
    if not all_logits:
        x = x[-1:]                                                           # (1, E)
    x = layers.rms_norm(x, w["output_norm.weight"], cfg.rms_eps)            # (T, E)
    return output_matrix(cfg, w) @ x                                         # (T, V)


def output_matrix(cfg, w):
    """The output head: `output.weight`, or the tied embedding where allowed."""
    if "output.weight" in w or not cfg.traits.tied_output:
        return w["output.weight"]
    return w["token_embd.weight"]


def check_weights(cfg, w):
    """Touch every tensor the forward pass needs and check its shape, so a
    broken file fails at load with a FormatError, not in the middle of a run."""
    e, dk, dv = cfg.n_embd, cfg.head_dim_k, cfg.head_dim_v
    w.matrix("token_embd.weight", cfg.n_vocab, e)
    w.matrix(output_matrix(cfg, w).name, cfg.n_vocab, e)
    w.vector("output_norm.weight", e)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        w.vector(p + "attn_norm.weight", e)
        w.vector(p + "ffn_norm.weight", e)
        w.matrix(p + "attn_q.weight", cfg.n_head * dk, e)
        w.matrix(p + "attn_k.weight", cfg.n_head_kv * dk, e)
        w.matrix(p + "attn_v.weight", cfg.n_head_kv * dv, e)
        w.matrix(p + "attn_output.weight", e, cfg.n_head * dv)
        if cfg.traits.qk_norm:
            full = cfg.traits.qk_norm == "full"
            w.vector(p + "attn_q_norm.weight", cfg.n_head * dk if full else dk)
            w.vector(p + "attn_k_norm.weight", cfg.n_head_kv * dk if full else dk)
        if cfg.is_moe:
            w.matrix(p + "ffn_gate_inp.weight", cfg.n_expert, e)
        else:
            w.matrix(p + "ffn_gate.weight", cfg.n_ff, e)
            w.matrix(p + "ffn_up.weight", cfg.n_ff, e)
            w.matrix(p + "ffn_down.weight", e, cfg.n_ff)
        if cfg.traits.shared_expert:
            w.matrix(p + "ffn_gate_shexp.weight", cfg.n_ff_shexp, e)
            w.matrix(p + "ffn_up_shexp.weight", cfg.n_ff_shexp, e)
            w.matrix(p + "ffn_down_shexp.weight", e, cfg.n_ff_shexp)
            w.vector(p + "ffn_gate_inp_shexp.weight", e)
