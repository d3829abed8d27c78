"""The transformer forward pass shared by every supported architecture.

One straight function, `forward`, reads `cfg.traits` where architectures
differ. Shape letters: T tokens in the batch, E n_embd, H/G query/KV heads,
D head size, F FFN width, X experts, k experts used, V vocabulary.
"""

import numpy as np

from meldlite.errors import OptionError
from meldlite.kernels import mathops
from meldlite.kernels.attention import QK_FULL, QK_HEAD, QK_NONE, attention_block, rms_norm_rows
from meldlite.kernels.route import GATINGS

F32 = np.float32


SWA_CHUNK = 32  # a sliding-window layer's ring holds window + SWA_CHUNK - 1 positions


class KVCache:
    """Keys and values of every layer, float16 like llama.cpp's default cache.

    A global layer keeps n_ctx rows; a sliding-window layer only a ring of
    min(n_ctx, window + SWA_CHUNK - 1) rows (position p at row p % rows): a batch is
    attended in chunks of SWA_CHUNK tokens so that every position a token sees is still
    held, which gives the logits of llama.cpp's full-size SWA cache. Per layer: k[i]
    (C_i, G, D), v[i] (C_i, G, Dv), and the RoPE tables cos[i]/sin[i] (n_ctx, R/2) of
    the layer's base and scale (shared between layers with the same)."""

    def __init__(self, cfg, n_ctx):
        self.n_ctx = n_ctx
        self.k, self.v, self.cos, self.sin, self.window = [], [], [], [], []
        tables = {}
        for i in range(cfg.n_layer):
            window = cfg.n_swa if cfg.is_swa(i) else 0
            rows = min(n_ctx, window + SWA_CHUNK - 1) if window else n_ctx
            self.window.append(window)
            self.k.append(np.zeros((rows, cfg.n_head_kv, cfg.head_dim_k), np.float16))
            self.v.append(np.zeros((rows, cfg.n_head_kv, cfg.head_dim_v), np.float16))
            base, scale, _ = cfg.rope_of(i)
            if (base, scale) not in tables:
                tables[base, scale] = mathops.rope_tables(n_ctx, cfg.n_rot, base, scale)
            cos, sin = tables[base, scale]  # (C, R/2)
            self.cos.append(cos)
            self.sin.append(sin)
        self.n_past = 0

    @property
    def nbytes(self):
        """Bytes of keys and values held."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def reset(self):
        self.n_past = 0


def forward(
    cfg,
    w,
    store,
    cache,
    tokens,
    all_logits=True,
    on_route=None,
    min_expert_weight=None,
    route_counts=None,
):
    """Run `tokens` (T,) after the `cache.n_past` tokens already in `cache`.

    Returns logits (T, V) float32, or (1, V) for the last token only when
    `all_logits` is False. `on_route(layer, h, ids, weights)` (optional) sees each
    layer's routing as the router made it, for profiling. `min_expert_weight`:
    adaptive top-k (`adapt_route`), counted in the dict `route_counts` (optional).

    Each layer's attention half (norm, projections, RoPE, KV cache, attention,
    residual, FFN norm, router) is one jitted call (`kernels.attention`); the
    routed experts go through `store.moe`.
    """
    tr = cfg.traits
    n_tok, pos0 = len(tokens), cache.n_past
    if pos0 + n_tok > cache.n_ctx:
        raise OptionError(f"context overflow: {pos0 + n_tok} tokens > n_ctx {cache.n_ctx}")
    if n_tok == 0:
        return np.zeros((0, cfg.n_vocab), F32)
    x = w["token_embd.weight"].rows(tokens)  # (T, E)
    if cfg.embedding_scale != 1.0:
        x *= F32(cfg.embedding_scale)
    k_used = max(cfg.n_expert_used, 1)
    for i, layer in enumerate(layer_plans(cfg, w)):
        p = f"blk.{i}."
        h = np.empty_like(x)  # (T, E)
        ids = np.empty((n_tok, k_used), np.int32)  # (T, k)
        weights = np.empty((n_tok, k_used), F32)  # (T, k)
        attention_block(
            x,
            *layer.attn,
            cache.k[i].view(np.uint16),  # float16 bits
            cache.v[i].view(np.uint16),
            cache.cos[i],
            cache.sin[i],
            pos0,
            cfg.n_head,
            cfg.attention_scale,
            cfg.q_scale,
            cache.window[i],
            cfg.rope_of(i)[2],
            tr.rope_neox,
            cfg.rms_eps,
            cfg.residual_scale,
            *layer.ffn,
            k_used,
            h,
            ids,
            weights,
        )
        if cfg.is_moe:
            if on_route is not None:
                on_route(i, h, ids, weights)
            ids, weights = adapt_route(ids, weights, min_expert_weight, route_counts)
            f = store.moe(i, h, ids, weights)  # (T, E)
            if cfg.n_ff_shexp:
                g = w[p + "ffn_gate_shexp.weight"] @ h  # (T, Fs)
                u = w[p + "ffn_up_shexp.weight"] @ h  # (T, Fs)
                s = w[p + "ffn_down_shexp.weight"] @ (mathops.silu(g) * u)  # (T, E)
                if tr.shared_expert == "sigmoid":
                    gate = (h @ w[p + "ffn_gate_inp_shexp.weight"])[:, None]  # (T, 1)
                    s = s * (mathops.silu(gate) / gate)  # (T, E)
                f = f + s  # (T, E)
        else:
            g = w[p + "ffn_gate.weight"] @ h  # (T, F)
            u = w[p + "ffn_up.weight"] @ h  # (T, F)
            f = w[p + "ffn_down.weight"] @ (ACTIVATIONS[tr.ffn_act](g) * u)  # (T, E)
        if tr.post_norms:
            rms_norm_rows(f, w[p + "post_ffw_norm.weight"], cfg.rms_eps, f)  # (T, E)
        if cfg.residual_scale != 1.0:
            f = f * F32(cfg.residual_scale)  # (T, E)
        x += f  # (T, E)

    cache.n_past = pos0 + n_tok
    if not all_logits:
        x = x[-1:]  # (1, E)
    h = np.empty_like(x)
    rms_norm_rows(x, w["output_norm.weight"], cfg.rms_eps, h)  # (T, E)
    logits = output_matrix(cfg, w) @ h  # (T, V)
    if cfg.logit_scale != 1.0:
        logits *= F32(1.0) / F32(cfg.logit_scale)
    if cfg.logit_softcap:
        logits = softcap(logits, cfg.logit_softcap)  # (T, V)
    return logits


ACTIVATIONS = {"silu": mathops.silu, "gelu": mathops.gelu}


def softcap(logits, cap):
    """cap * tanh(logits / cap) as ggml's scale, tanh, scale (tanh correctly rounded)."""
    t = np.tanh((logits * (F32(1.0) / F32(cap))).astype(np.float64)).astype(F32)  # (T, V)
    return t * F32(cap)


def adapt_route(ids, weights, min_weight, counts=None):
    """Adaptive top-k, applied once, right after the router: with `min_weight`, the
    slots whose renormalised weight is below it are skipped (id -1, weight 0) before
    any store loads or computes them (`skip_light_experts`).

    counts (optional dict): "routed_slots" += the router's slots, "experts_skipped"
    += the slots skipped. ids (T, k), weights (T, k) -> (ids', weights')."""
    n_routed = int(np.count_nonzero(ids >= 0)) if counts is not None else 0
    if min_weight:
        ids, weights = skip_light_experts(ids, weights, min_weight)
    if counts is not None:
        counts["routed_slots"] += n_routed
        counts["experts_skipped"] += n_routed - int(np.count_nonzero(ids >= 0))
    return ids, weights


def skip_light_experts(ids, weights, min_weight):
    """Drop slots whose renormalised weight w / sum(w) is below `min_weight`.

    ids (T, k) int32 (-1 = skipped), weights (T, k) float32 -> (ids', weights')
    with dropped slots set to id -1 and weight 0; the kept slots keep their
    weights (not rescaled: on the trained model rescaling them to the old sum
    doubled the KL divergence from the full run, docs/experts.md). The heaviest
    expert of each token is always kept. Returns the inputs themselves when
    nothing is dropped.
    """
    ids = np.asarray(ids)
    weights = np.asarray(weights, dtype=F32)
    valid = ids >= 0  # (T, k)
    w = np.where(valid, weights, F32(0))  # (T, k)
    total = w.sum(axis=-1, keepdims=True, dtype=F32)  # (T, 1)
    share = w / np.maximum(total, F32(1e-30))  # (T, k)
    drop = valid & (share < F32(min_weight))  # (T, k)
    drop[np.arange(len(ids)), np.argmax(share, axis=-1)] = False
    if not drop.any():
        return ids, weights
    new_w = np.where(drop, F32(0), weights).astype(F32)
    new_ids = np.where(drop, np.int32(-1), ids).astype(np.int32)
    return np.ascontiguousarray(new_ids), np.ascontiguousarray(new_w)


_EMPTY_F32 = np.zeros(0, F32)
_NO_MATRIX = np.zeros((0, 0), np.uint8)
_NO_MATRIX.flags.writeable = False


class LayerPlan:
    """One layer's arguments for `attention_block`, looked up once per model.

    attn: (attn_norm, then raw/type/mode of q, k, v, output, the four biases (empty when
    absent), q/k norm weights (empty when absent), qk-norm kind, post-attention norm
    weight (empty when absent)); ffn: (ffn_norm, router
    raw/type/mode: an empty matrix for dense models, router bias (X,): -inf for pruned
    experts, empty when none is pruned, then the gating of `routing`)."""

    def __init__(self, cfg, w, i):
        p = f"blk.{i}."

        def mat(name):
            m = w[p + name]
            if m.mat is None:  # a type the kernels lack: raise their error now
                m @ np.zeros(m.shape[1], F32)
            return m.mat, m.t, m.mode

        def vec(name):
            return w[p + name] if p + name in w else _EMPTY_F32

        qk = {"": QK_NONE, "head": QK_HEAD, "full": QK_FULL}[cfg.traits.qk_norm]
        self.attn = (
            w[p + "attn_norm.weight"],
            *mat("attn_q.weight"),
            *mat("attn_k.weight"),
            *mat("attn_v.weight"),
            *mat("attn_output.weight"),
            vec("attn_q.bias"),
            vec("attn_k.bias"),
            vec("attn_v.bias"),
            vec("attn_output.bias"),
            vec("attn_q_norm.weight"),
            vec("attn_k_norm.weight"),
            qk,
            vec("post_attention_norm.weight"),
        )
        router = mat("ffn_gate_inp.weight") if cfg.is_moe else (_NO_MATRIX, 0, 0)
        self.ffn = (w[p + "ffn_norm.weight"], *router, cfg.router_bias(i), *routing(cfg, w, p))


def routing(cfg, w, p):
    """The router's gating arguments of layer prefix `p` for `route.route_gated`:
    (selection bias (X,) `exp_probs_b` or empty, gating code, expert groups, groups used,
    renormalise, weight scale)."""
    name = p + "exp_probs_b.bias"
    bias = w[name] if name in w else _EMPTY_F32
    return (
        bias,
        GATINGS[cfg.gating],
        cfg.n_expert_groups,
        cfg.n_group_used,
        cfg.norm_topk,
        cfg.expert_weights_scale,
    )


def layer_plans(cfg, w):
    """The LayerPlan of every layer, built on first use and kept on `w`."""
    plans = getattr(w, "_layer_plans", None)
    if plans is None or len(plans) != cfg.n_layer:
        plans = [LayerPlan(cfg, w, i) for i in range(cfg.n_layer)]
        w._layer_plans = plans
    return plans


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
        if cfg.traits.post_norms:
            w.vector(p + "post_attention_norm.weight", e)
            w.vector(p + "post_ffw_norm.weight", e)
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
        if cfg.n_ff_shexp:
            w.matrix(p + "ffn_gate_shexp.weight", cfg.n_ff_shexp, e)
            w.matrix(p + "ffn_up_shexp.weight", cfg.n_ff_shexp, e)
            w.matrix(p + "ffn_down_shexp.weight", e, cfg.n_ff_shexp)
        if cfg.n_ff_shexp and cfg.traits.shared_expert == "sigmoid":
            w.vector(p + "ffn_gate_inp_shexp.weight", e)
