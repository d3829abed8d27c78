"""The transformer forward pass shared by every supported architecture.

One straight function, `forward`, reads `cfg.traits` where architectures
differ. Shape letters: T tokens in the batch, E n_embd, H/G query/KV heads,
D head size, F FFN width, X experts, k experts used, V vocabulary.
"""

import numpy as np

from meldlite.config import tensor_name
from meldlite.errors import FormatError, OptionError
from meldlite.kernels import mathops
from meldlite.kernels.attention import QK_FULL, QK_HEAD, QK_NONE, attention_block, rms_norm_rows
from meldlite.kernels.mla import mla_block
from meldlite.kernels.route import GATINGS
from meldlite.kernels.router import route_input

F32 = np.float32


SWA_CHUNK = 32  # a sliding-window layer's ring holds window + SWA_CHUNK - 1 positions


class KVCache:
    """Keys and values of every layer for n_seq independent sequences, float16 like
    llama.cpp's default cache.

    A global layer keeps n_ctx rows per sequence; a sliding-window layer only a ring of
    min(n_ctx, window + SWA_CHUNK - 1) rows (position p at row p % rows): a batch is
    attended in chunks of SWA_CHUNK tokens so that every position a token sees is still
    held, which gives the logits of llama.cpp's full-size SWA cache. Per layer: k[i]
    (S, C_i, G, D), v[i] (S, C_i, G, Dv) (S = n_seq), and the RoPE tables cos[i]/sin[i]
    (n_ctx, R/2) of the layer's base and scale (shared between layers with the same). A
    multi-head latent attention model caches its normed latent and RoPE'd key part
    instead: k[i] (S, C, 1, kv_lora_rank + n_rot), v[i] (S, C, 1, 0).

    `seq(j)` is sequence j's `SeqCache` (n_past, tokens, reset, rewind); the cache's
    own n_past, tokens, reset and rewind are sequence 0's."""

    def __init__(self, cfg, n_ctx, n_seq=1):
        if n_seq < 1:
            raise OptionError(f"n_seq must be >= 1, got {n_seq}")
        self.n_ctx, self.n_seq = n_ctx, n_seq
        self.k, self.v, self.cos, self.sin, self.window = [], [], [], [], []
        g, dk, dv = cfg.n_head_kv, cfg.head_dim_k, cfg.head_dim_v
        if cfg.kv_lora_rank:  # MLA: one shared [latent | rope part] per position, no V
            g, dk, dv = 1, cfg.kv_lora_rank + cfg.n_rot, 0
        tables = {}
        for i in range(cfg.n_layer):
            window = cfg.n_swa if cfg.is_swa(i) else 0
            rows = min(n_ctx, window + SWA_CHUNK - 1) if window else n_ctx
            self.window.append(window)
            self.k.append(np.zeros((n_seq, rows, g, dk), np.float16))  # (S, C_i, G, D)
            self.v.append(np.zeros((n_seq, rows, g, dv), np.float16))  # (S, C_i, G, Dv)
            base, scale, _ = cfg.rope_of(i)
            if (base, scale) not in tables:
                tables[base, scale] = mathops.rope_tables(
                    n_ctx, cfg.n_rot, base, scale, **cfg.rope_yarn()
                )
            cos, sin = tables[base, scale]  # (C, R/2)
            self.cos.append(cos)
            self.sin.append(sin)
        self.seqs = [SeqCache(self, j) for j in range(n_seq)]

    def seq(self, j):
        """Sequence j's SeqCache."""
        if not 0 <= j < self.n_seq:
            raise OptionError(f"sequence {j} is not in 0..{self.n_seq - 1}")
        return self.seqs[j]

    @property
    def nbytes(self):
        """Bytes of keys and values held (all sequences)."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    @property
    def n_past(self):
        """Positions sequence 0 holds."""
        return self.seqs[0].n_past

    @n_past.setter
    def n_past(self, n):
        self.seqs[0].n_past = n

    @property
    def tokens(self):
        """Sequence 0's token ids at positions 0..n_past-1, where the caller records them."""
        return self.seqs[0].tokens

    @tokens.setter
    def tokens(self, ids):
        self.seqs[0].tokens = ids

    def reset(self):
        self.seqs[0].reset()

    def rewind(self, n):
        """Sequence 0's `SeqCache.rewind`."""
        return self.seqs[0].rewind(n)


class SeqCache:
    """One sequence of a KVCache: the positions it holds (n_past) and the token ids the
    caller records for them (tokens); its rows are k[i][index], v[i][index]."""

    def __init__(self, cache, index):
        self.cache, self.index = cache, index
        self.n_past = 0
        self.tokens = []  # ids at positions 0..n_past-1, where the caller records them

    def reset(self):
        self.n_past = 0
        self.tokens = []

    def rewind(self, n):
        """Keep the first n positions (a common prefix) and forget the rest. False,
        and nothing changed, when a sliding-window ring no longer holds positions that
        the token at position n must see (the caller then starts over)."""
        if not 0 <= n <= self.n_past:
            return False
        c = self.cache
        for k, window in zip(c.k, c.window):
            rows = k.shape[1]
            if window and rows < c.n_ctx and self.n_past - n > rows - window + 1:
                return False
        self.n_past = n
        self.tokens = self.tokens[:n]
        return True


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
    seqs=None,
):
    """Run `tokens` (T,) after the tokens already in `cache`.

    seqs: None runs them all in sequence 0, after its n_past tokens; else a list of
    (seq, n) segments: `tokens` is their tokens concatenated in that order, and segment
    j's n tokens go into sequence seq at that sequence's n_past (each sequence at most
    once). All T tokens share the projections, experts and output head; the RoPE, KV
    cache and attention run per segment. Each sequence's n_past advances by its n.

    Returns logits (T, V) float32, or (S, V), the last token of each segment in
    segment order, when `all_logits` is False. `on_route(layer, h, ids, weights)`
    (optional) sees each layer's routing as the router made it, for profiling.
    `min_expert_weight`: adaptive top-k (`adapt_route`), counted in the dict
    `route_counts` (optional).

    Each layer's attention half (norm, projections, RoPE, KV cache, attention,
    residual, FFN norm, router) is one jitted call (`kernels.attention`); the
    routed experts go through `store.moe`. Where the router reads the layer input
    (`router_input` "layer"), it runs before attention and `store.announce` learns
    the layer's experts while its attention runs.
    """
    tr = cfg.traits
    n_tok = len(tokens)
    segs = segments(cache, n_tok, seqs)  # (S, 3) seq, pos0, n
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
        if layer.router is not None:  # routing known before attention
            route_input(x, *layer.router, k_used, ids, weights)
            routed = adapt_route(ids, weights, min_expert_weight, route_counts)
            store.announce(i, routed[0])
        layer.block(
            x,
            *layer.attn,
            cache.k[i].view(np.uint16),  # float16 bits
            cache.v[i].view(np.uint16),
            cache.cos[i],
            cache.sin[i],
            segs,
            cfg.n_head,
            cfg.attention_scale,
            cfg.q_scale,
            cache.window[i],
            cfg.rope_of(i)[2],
            tr.rope_neox,
            cfg.rms_eps,
            cfg.residual_scale,
            layer.ffn,
            k_used,
            h,
            ids,
            weights,
        )
        if cfg.moe_layer(i):
            if on_route is not None:
                on_route(i, h, ids, weights)
            if layer.router is None:
                routed = adapt_route(ids, weights, min_expert_weight, route_counts)
            f = store.moe(i, h, *routed)  # (T, E)
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

    for seq, _, n in segs:
        cache.seqs[seq].n_past += int(n)
    if not all_logits:
        x = x[np.cumsum(segs[:, 2]) - 1]  # (S, E) each segment's last token
    h = np.empty_like(x)
    rms_norm_rows(x, w["output_norm.weight"], cfg.rms_eps, h)  # (T, E)
    logits = output_matrix(cfg, w) @ h  # (T, V)
    if cfg.logit_scale != 1.0:
        logits *= F32(1.0) / F32(cfg.logit_scale)
    if cfg.logit_softcap:
        logits = softcap(logits, cfg.logit_softcap)  # (T, V)
    return logits


def segments(cache, n_tok, seqs):
    """The (S, 3) int64 array of (seq, pos0, n) rows `forward` runs: seqs None is one
    segment of the n_tok tokens in sequence 0. OptionError for a repeated or unknown
    sequence, an empty segment, counts that do not add up to n_tok, or a sequence whose
    context would overflow."""
    if seqs is None:
        seqs = [(0, n_tok)] if n_tok else []
    segs = np.zeros((len(seqs), 3), np.int64)  # (S, 3)
    seen = set()
    for j, (seq, n) in enumerate(seqs):
        if not 0 <= seq < cache.n_seq or seq in seen:
            raise OptionError(
                f"segment {j}: sequence {seq} is repeated or not in 0..{cache.n_seq - 1}"
            )
        if n < 1:
            raise OptionError(f"segment {j}: {n} tokens (at least 1)")
        pos0 = cache.seqs[seq].n_past
        if pos0 + n > cache.n_ctx:
            raise OptionError(f"context overflow: {pos0 + n} tokens > n_ctx {cache.n_ctx}")
        seen.add(seq)
        segs[j] = seq, pos0, n
    if segs[:, 2].sum() != n_tok:
        raise OptionError(f"the segments hold {segs[:, 2].sum()} tokens, not {n_tok}")
    return segs


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
    kept = n_routed
    if min_weight:
        ids, weights = skip_light_experts(ids, weights, min_weight)
        kept = int(np.count_nonzero(ids >= 0))
    if counts is not None:
        counts["routed_slots"] += n_routed
        counts["experts_skipped"] += n_routed - kept
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
    weight (empty unless the architecture has post norms), sink logits (H,) (empty when
    absent)); ffn: (ffn_norm, router raw/type/mode: an empty matrix for dense models,
    router bias (X,): the file's plus -inf for pruned experts, empty when none, then the
    gating of `routing`).; router: the
    router's raw/type/mode and the same router arguments when it reads the layer input
    (run before attention by `route_input`, `ffn` then has an empty router), else None."""

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
        self.block = attention_block
        if p + "attn_kv_a_mqa.weight" in w:
            self.block, self.attn = mla_block, mla_weights(cfg, w, p, mat, vec)
        else:
            self.attn = self.standard_weights(cfg, w, p, mat, vec, qk)
        router = mat("ffn_gate_inp.weight") if cfg.moe_layer(i) else (_NO_MATRIX, 0, 0)
        ffn_norm = w[tensor_name(cfg.traits.ffn_norm, i)]
        gates = (router_bias(cfg, vec("ffn_gate_inp.bias"), i), *routing(cfg, w, p))
        self.router = None
        if cfg.moe_layer(i) and cfg.traits.router_input == "layer":
            self.router = (*router, *gates)
            router = (_NO_MATRIX, 0, 0)  # the attention block does not route
        self.ffn = (ffn_norm, *router, *gates)

    @staticmethod
    def standard_weights(cfg, w, p, mat, vec, qk):
        return (
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
            vec("post_attention_norm.weight") if cfg.traits.post_norms else _EMPTY_F32,
            vec("attn_sinks.weight"),
        )


def mla_weights(cfg, w, p, mat, vec):
    """`mla_block`'s weights of layer prefix p: attn_q, or attn_q_a + its norm + attn_q_b
    (empty matrices for the form the file lacks), attn_kv_a_mqa and its norm, the per-head
    attn_k_b and attn_v_b (split from the older attn_kv_b when the file has that), output."""
    none = (_NO_MATRIX, 0, 0)
    lora = p + "attn_q_a.weight" in w
    if p + "attn_k_b.weight" in w:
        k_b, v_b = w.heads(p + "attn_k_b.weight"), w.heads(p + "attn_v_b.weight")
    else:
        nope = cfg.head_dim_k - cfg.n_rot
        k_b, v_b = w.split_kv_b(p + "attn_kv_b.weight", cfg.n_head, nope, cfg.head_dim_v)
    return (
        w[p + "attn_norm.weight"],
        *(none if lora else mat("attn_q.weight")),
        *(mat("attn_q_a.weight") if lora else none),
        vec("attn_q_a_norm.weight"),
        *(mat("attn_q_b.weight") if lora else none),
        *mat("attn_kv_a_mqa.weight"),
        w[p + "attn_kv_a_norm.weight"],
        k_b.mat,
        k_b.t,
        k_b.mode,
        v_b.mat,
        v_b.t,
        v_b.mode,
        *mat("attn_output.weight"),
    )


def router_bias(cfg, bias, layer):
    """(X,) added to the router logits: the file's router bias (gpt-oss) plus -inf for
    pruned experts; empty when there is neither."""
    mask = cfg.router_bias(layer)  # (X,) or (0,)
    if not bias.size:
        return mask
    return bias + mask if mask.size else bias


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
    e = cfg.n_embd
    w.matrix("token_embd.weight", cfg.n_vocab, e)
    w.matrix(output_matrix(cfg, w).name, cfg.n_vocab, e)
    w.vector("output_norm.weight", e)
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        w.vector(p + "attn_norm.weight", e)
        w.vector(tensor_name(cfg.traits.ffn_norm, i), e)
        if cfg.traits.post_norms:
            w.vector(p + "post_attention_norm.weight", e)
            w.vector(p + "post_ffw_norm.weight", e)
        if cfg.traits.attn_sinks:
            w.vector(p + "attn_sinks.weight", cfg.n_head)
        if p + "attn_kv_a_mqa.weight" in w:
            check_mla(cfg, w, p)
        else:
            check_attention(cfg, w, p)
        check_ffn(cfg, w, p, cfg.moe_layer(i))


def check_attention(cfg, w, p):
    e, dk, dv = cfg.n_embd, cfg.head_dim_k, cfg.head_dim_v
    w.matrix(p + "attn_q.weight", cfg.n_head * dk, e)
    w.matrix(p + "attn_k.weight", cfg.n_head_kv * dk, e)
    w.matrix(p + "attn_v.weight", cfg.n_head_kv * dv, e)
    w.matrix(p + "attn_output.weight", e, cfg.n_head * dv)
    if cfg.traits.qk_norm:
        full = cfg.traits.qk_norm == "full"
        w.vector(p + "attn_q_norm.weight", cfg.n_head * dk if full else dk)
        w.vector(p + "attn_k_norm.weight", cfg.n_head_kv * dk if full else dk)


def check_mla(cfg, w, p):
    """The tensors of multi-head latent attention, as llama.cpp's deepseek2 loader."""
    e, h, dk, dv, r = cfg.n_embd, cfg.n_head, cfg.head_dim_k, cfg.head_dim_v, cfg.kv_lora_rank
    if r <= 0 or cfg.n_rot >= dk:
        raise FormatError(
            f"{p}attn_kv_a_mqa: kv_lora_rank and a rope dimension < key length needed"
        )
    if cfg.q_lora_rank:
        w.matrix(p + "attn_q_a.weight", cfg.q_lora_rank, e)
        w.vector(p + "attn_q_a_norm.weight", cfg.q_lora_rank)
        w.matrix(p + "attn_q_b.weight", h * dk, cfg.q_lora_rank)
    else:
        w.matrix(p + "attn_q.weight", h * dk, e)
    w.matrix(p + "attn_kv_a_mqa.weight", r + cfg.n_rot, e)
    w.vector(p + "attn_kv_a_norm.weight", r)
    if p + "attn_k_b.weight" in w:
        shapes = {"attn_k_b": (h, r, dk - cfg.n_rot), "attn_v_b": (h, dv, r)}
        for name, shape in shapes.items():
            got = w.gguf.tensor(p + name + ".weight").shape
            if tuple(got) != shape:
                raise FormatError(f"tensor {p}{name}.weight should have shape {shape}, has {got}")
    else:
        w.matrix(p + "attn_kv_b.weight", h * (dk - cfg.n_rot + dv), r)
    w.matrix(p + "attn_output.weight", e, h * dv)


def check_ffn(cfg, w, p, moe):
    e = cfg.n_embd
    if not moe:
        w.matrix(p + "ffn_gate.weight", cfg.n_ff, e)
        w.matrix(p + "ffn_up.weight", cfg.n_ff, e)
        w.matrix(p + "ffn_down.weight", e, cfg.n_ff)
        return
    w.matrix(p + "ffn_gate_inp.weight", cfg.n_expert, e)
    if p + "ffn_gate_inp.bias" in w:
        w.vector(p + "ffn_gate_inp.bias", cfg.n_expert)
    if p + "exp_probs_b.bias" in w:
        w.vector(p + "exp_probs_b.bias", cfg.n_expert)
    if cfg.n_ff_shexp:
        w.matrix(p + "ffn_gate_shexp.weight", cfg.n_ff_shexp, e)
        w.matrix(p + "ffn_up_shexp.weight", cfg.n_ff_shexp, e)
        w.matrix(p + "ffn_down_shexp.weight", e, cfg.n_ff_shexp)
    if cfg.n_ff_shexp and cfg.traits.shared_expert == "sigmoid":
        w.vector(p + "ffn_gate_inp_shexp.weight", e)
