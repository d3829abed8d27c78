"""Random-weight GGUF models of every supported architecture, for parity tests.

Written with gguf-py's GGUFWriter; the vocabulary is copied from the built-in
model so that llama.cpp (the reference) can load the files as they are.
"""

import ctypes
import os
from dataclasses import dataclass, replace

import gguf
import numpy as np
from gguf import (
    ExpertGatingFuncType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    Keys,
    RopeScalingType,
    TokenType,
)

from meldlite.data import default_model_path


@dataclass(frozen=True)
class Shape:
    n_vocab: int = 4096  # >= the borrowed vocabulary's 4096 (padded with unused tokens)
    n_embd: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    n_ff: int = 256
    n_expert: int = 8
    n_expert_used: int = 2
    n_ff_exp: int = 256
    n_ff_shexp: int = 256
    n_ctx: int = 256


# Which blocks each architecture has: (moe, shared expert, qk norm, qkv bias, tied output ok)
ARCHS = {
    "qwen3moe": dict(moe=True, shexp=False, qk_norm="head", bias=False),
    "qwen2moe": dict(moe=True, shexp=True, qk_norm="", bias=True),
    "llama-moe": dict(moe=True, shexp=False, qk_norm="", bias=False),
    "olmoe": dict(moe=True, shexp=False, qk_norm="full", bias=False),
    "llama": dict(moe=False, shexp=False, qk_norm="", bias=False),
    "qwen2": dict(moe=False, shexp=False, qk_norm="", bias=True),
    "qwen3": dict(moe=False, shexp=False, qk_norm="head", bias=False),
    "granitemoe": dict(moe=True, shexp=False, qk_norm="", bias=False, granite=True, tied=True),
    "granitemoe-shared": dict(moe=True, shexp=True, qk_norm="", bias=False, granite=True),
    "gpt-oss": dict(moe=True, shexp=False, qk_norm="", bias=True, gpt_oss=True),
    # MLA rounds to float16 more often than the others: F16 and quantized files flip
    # near-ties between llama.cpp's own batched and token-by-token runs, so these rows
    # are held to issue 13's gate, llama.cpp's own flips + 1% (self_flips; test_parity)
    "deepseek2-lite": dict(
        moe=True, shexp=True, qk_norm="", bias=False, tied=False, mla="lite", self_flips=True
    ),
    "deepseek2": dict(
        moe=True, shexp=True, qk_norm="", bias=False, tied=False, mla="v3", self_flips=True
    ),
    "gemma3": dict(moe=False, shexp=False, qk_norm="head", bias=False, tied=True, gemma=True),
    "gemma3-4b": dict(moe=False, shexp=False, qk_norm="head", bias=False, tied=True, gemma=True),
    # SmallThinker (PowerInfer/SmallThinker-4BA0.6B): ReLU experts, router on the layer
    # input; without sliding_window (then llama.cpp has no NoPE layers either)
    "smallthinker": dict(
        moe=True, shexp=False, qk_norm="", bias=False, smallthinker=True, self_flips=True
    ),
}

# Not parity rows of their own (test_deepseek2 compares them): the older attn_kv_b form
EXTRA_ARCHS = {
    "deepseek2-kvb": dict(moe=True, shexp=True, qk_norm="", bias=False, tied=False, mla="kv_b"),
}

# Arch names in ARCHS that write another general.architecture
GGUF_ARCH = {
    "llama-moe": "llama",
    "granitemoe-shared": "granitemoe",
    "deepseek2-lite": "deepseek2",
    "deepseek2-kvb": "deepseek2",
    "gemma3-4b": "gemma3",
}

# Gemma 3 1B (26 layers, 4 heads, 1 KV head of 256 > n_embd/n_head, window 512) and 4B
# (8 heads, 4 KV heads, window 1024, linear RoPE scaling 8 on the global layers) scaled
# down: 7 layers so that llama.cpp's hard-coded pattern (every 6th layer global) has a
# global layer between SWA ones, windows shorter than the test contexts. Local RoPE base
# 10000 and global 1e6 as the converter writes them (rope.freq_base_swa, rope.freq_base).
GEMMA3 = {
    "gemma3": dict(
        shape=dict(n_layer=7, n_head=4, n_head_kv=1, head_dim=128, n_ff=512),
        window=32,
        rope_factor=None,
    ),
    "gemma3-4b": dict(
        shape=dict(n_layer=7, n_head=8, n_head_kv=4, head_dim=64, n_ff=512),
        window=48,
        rope_factor=8.0,
    ),
}

# Granite's multipliers (config.json: embedding_multiplier, residual_multiplier,
# attention_multiplier, logits_scaling), of the size granite-3.0-1b-a400m has; the
# attention scale differs from 1/sqrt(head_dim) on purpose. Granite files have a tied
# output head (no output.weight), as its converted files do.
GRANITE_SCALES = dict(embedding=12.0, residual=0.22, attention=0.0078125, logit=6.0)

# gpt-oss-20b's settings as convert_hf_to_gguf writes them (config.json: sliding_window,
# rope_theta, rope_scaling yarn factor 32 over 4096 positions, beta_fast/slow); its
# head count times head size differs from n_embd (64 x 64 vs 2880), so the test files
# use twice as many heads as n_embd / head_dim
GPT_OSS = dict(
    sliding_window=128, rope_base=150000.0, yarn_factor=32.0, n_ctx_orig=4096, rms_eps=1e-5
)


@dataclass(frozen=True)
class Mla:
    """DeepSeek-V2/V3 hyper-parameters (config.json names in comments), small sizes of
    the real ratios. q_lora_rank 0 is V2-Lite's attn_q; V2-Lite's file has no q_lora_rank
    key, but llama.cpp reads it unless block_count is 26/27 (its V2-Lite test), so the
    small file writes 0; meldlite treats an absent key as 0 (test_deepseek2)."""

    q_lora_rank: int = 0  # q_lora_rank
    kv_lora_rank: int = 128  # kv_lora_rank
    nope: int = 64  # qk_nope_head_dim
    rope: int = 32  # qk_rope_head_dim
    v_head: int = 64  # v_head_dim
    n_shared: int = 2  # n_shared_experts
    dense_lead: int = 1  # first_k_dense_replace
    gating: int = 1  # scoring_func: 1 softmax, 2 sigmoid (gguf ExpertGatingFuncType)
    norm: bool = False  # norm_topk_prob
    scale: float = 1.0  # routed_scaling_factor
    groups: tuple = (1, 1)  # n_group, topk_group
    probs_b: bool = False  # e_score_correction_bias (exp_probs_b)
    kv_b: bool = False  # the older converters' unsplit attn_kv_b
    # rope_scaling (type yarn): factor, original_max_position_embeddings, mscale_all_dim;
    # () none. V2-Lite: 40, 4096, 0.707; V3: 40, 4096, 1.0 (small here: 4, 32)
    yarn: tuple = ()


MLA = {
    "lite": Mla(yarn=(4.0, 32, 0.707)),
    "kv_b": Mla(kv_b=True),
    "v3": Mla(
        q_lora_rank=128,
        n_shared=1,
        gating=2,
        norm=True,
        scale=2.5,
        groups=(4, 2),
        probs_b=True,
        yarn=(4.0, 32, 1.0),
    ),
}


def vocab_fields(n_vocab=4096):
    """(key, value, value type, sub type) of the built-in model's tokenizer keys,
    padded with unused tokens up to n_vocab."""
    r = GGUFReader(default_model_path())
    out = []
    for key, field in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        main = field.types[0]
        if main == GGUFValueType.ARRAY:
            value = field.contents()
            extra = n_vocab - len(value)
            pad = {
                Keys.Tokenizer.LIST: [f"<unused{i}>" for i in range(extra)],
                Keys.Tokenizer.SCORES: [0.0] * extra,
                Keys.Tokenizer.TOKEN_TYPE: [int(TokenType.UNUSED)] * extra,
            }
            out.append((key, value + pad.get(key, []), main, field.types[1]))
        else:
            out.append((key, field.contents(), main, None))
    return out


def write_random_model(
    path,
    arch,
    shape=Shape(),
    dtype=np.float32,
    seed=0,
    tied=None,
    expert_type=None,
    rope=None,
    softcap=None,
):
    """Write a random-weight model of `arch` (a key of ARCHS) to `path`; `tied`: no
    output.weight (None: as the architecture's converted files); expert_type: a
    GGMLQuantizationType for the routed experts, quantized by gguf-py (None: dtype);
    rope: RoPE scaling keys as convert_hf_to_gguf writes them, dict(type="yarn" or
    "linear", factor, orig_ctx (yarn)) (None: none); softcap: a final_logit_softcapping
    value (gemma)."""
    spec = ARCHS.get(arch) or EXTRA_ARCHS[arch]
    if spec.get("gpt_oss"):
        return write_gpt_oss(path, shape, dtype, seed, expert_type)
    tied = spec.get("tied", False) if tied is None else tied
    gguf_arch = GGUF_ARCH.get(arch, arch)
    s = shape
    if arch == "olmoe":  # olmoe's q/k norms span the full projection: keep heads equal
        s = replace(s, n_head_kv=s.n_head)
    if spec.get("gemma") and shape == Shape():
        s = replace(s, **GEMMA3[arch]["shape"])
    rng = np.random.default_rng(seed)
    w = GGUFWriter(os.fspath(path), gguf_arch)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(
        s.n_ff_exp
        if spec["moe"] and gguf_arch in ("llama", "olmoe", "granitemoe", "smallthinker")
        else s.n_ff
    )
    w.add_head_count(s.n_head)
    if "mla" not in spec:
        w.add_head_count_kv(s.n_head_kv)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
    if spec.get("gemma"):  # as convert_hf_to_gguf's Gemma3Model writes them
        write_gemma3_keys(w, GEMMA3[arch], softcap)
    else:
        if "mla" not in spec and not spec.get("smallthinker"):
            w.add_rope_dimension_count(s.head_dim)
        w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(1 if dtype == np.float16 else 0)
    if rope:
        w.add_rope_scaling_type(gguf.RopeScalingType(rope["type"]))
        w.add_rope_scaling_factor(rope["factor"])
        if rope["type"] == "yarn":
            w.add_rope_scaling_orig_ctx_len(rope["orig_ctx"])
    if spec.get("granite"):  # as convert_hf_to_gguf writes Granite's multipliers
        w.add_embedding_scale(GRANITE_SCALES["embedding"])
        w.add_residual_scale(GRANITE_SCALES["residual"])
        w.add_attention_scale(GRANITE_SCALES["attention"])
        w.add_logit_scale(GRANITE_SCALES["logit"])
    mla = MLA[spec["mla"]] if "mla" in spec else None
    if mla:
        _mla_metadata(w, s, mla)
    if spec["moe"]:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        if gguf_arch in ("qwen3moe", "qwen2moe", "smallthinker"):
            w.add_expert_feed_forward_length(s.n_ff_exp)
        if spec.get("smallthinker"):  # its converter always writes the gating kind
            w.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX)
        if spec["shexp"] and not mla:
            w.add_expert_shared_feed_forward_length(s.n_ff_shexp)
    for key, value, vtype, sub in vocab_fields(s.n_vocab):
        w.add_key_value(key, value, vtype, sub_type=sub)

    def mat(name, *dims, scale=None, keep_f32=False):
        fan_in = dims[-1]
        a = rng.standard_normal(dims).astype(np.float32) * np.float32(scale or fan_in**-0.5)
        w.add_tensor(name, a if keep_f32 or a.ndim == 1 else a.astype(dtype))

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    e, hd = s.n_embd, s.head_dim
    # Granite's embedding multiplier brings its rows to the size of the others' rows,
    # so attention and experts weigh on the logits as much as in the other files
    embd_scale = 1.0 / GRANITE_SCALES["embedding"] if spec.get("granite") else 1.0
    if spec.get("gemma"):  # Gemma's sqrt(n_embd) scaling likewise, and its tied output
        embd_scale = e**-0.5  # head then gives logits of unit spread
    mat("token_embd.weight", s.n_vocab, e, scale=embd_scale)
    norm("output_norm.weight", e)
    if not tied:
        mat("output.weight", s.n_vocab, e, scale=2 * e**-0.5)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", e)
        if mla:
            _mla_tensors(mat, norm, p, s, mla)
            _mla_ffn(mat, norm, p, s, mla, i)
            continue
        mat(p + "attn_q.weight", s.n_head * hd, e)
        mat(p + "attn_k.weight", s.n_head_kv * hd, e)
        mat(p + "attn_v.weight", s.n_head_kv * hd, e)
        mat(p + "attn_output.weight", e, s.n_head * hd)
        if spec["bias"]:
            mat(p + "attn_q.bias", s.n_head * hd, scale=0.1)
            mat(p + "attn_k.bias", s.n_head_kv * hd, scale=0.1)
            mat(p + "attn_v.bias", s.n_head_kv * hd, scale=0.1)
        if spec["qk_norm"] == "head":
            norm(p + "attn_q_norm.weight", hd)
            norm(p + "attn_k_norm.weight", hd)
        elif spec["qk_norm"] == "full":
            norm(p + "attn_q_norm.weight", s.n_head * hd)
            norm(p + "attn_k_norm.weight", s.n_head_kv * hd)
        norm(p + "ffn_norm.weight", e)
        if spec.get("gemma"):
            norm(p + "post_attention_norm.weight", e)
            norm(p + "post_ffw_norm.weight", e)
        if spec["moe"]:
            mat(p + "ffn_gate_inp.weight", s.n_expert, e, scale=2 * e**-0.5, keep_f32=True)
            mat(p + "ffn_gate_exps.weight", s.n_expert, s.n_ff_exp, e)
            mat(p + "ffn_up_exps.weight", s.n_expert, s.n_ff_exp, e)
            mat(p + "ffn_down_exps.weight", s.n_expert, e, s.n_ff_exp)
            if spec["shexp"] and not spec.get("granite"):  # Granite's is not gated
                mat(p + "ffn_gate_inp_shexp.weight", e)
            if spec["shexp"]:
                mat(p + "ffn_gate_shexp.weight", s.n_ff_shexp, e)
                mat(p + "ffn_up_shexp.weight", s.n_ff_shexp, e)
                mat(p + "ffn_down_shexp.weight", e, s.n_ff_shexp)
        else:
            mat(p + "ffn_gate.weight", s.n_ff, e)
            mat(p + "ffn_up.weight", s.n_ff, e)
            mat(p + "ffn_down.weight", e, s.n_ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _mla_metadata(w, s, m):
    """The keys convert_hf_to_gguf's DeepseekV2Model writes (MLA as MQA with one KV head)."""
    w.add_leading_dense_block_count(m.dense_lead)
    w.add_vocab_size(s.n_vocab)
    w.add_q_lora_rank(m.q_lora_rank)
    w.add_kv_lora_rank(m.kv_lora_rank)
    if m.kv_b:  # older files: multi-head sizes, as many KV heads as heads
        w.add_head_count_kv(s.n_head)
        w.add_key_length(m.nope + m.rope)
        w.add_value_length(m.v_head)
    else:
        w.add_head_count_kv(1)
        w.add_key_length(m.kv_lora_rank + m.rope)
        w.add_value_length(m.kv_lora_rank)
        w.add_key_length_mla(m.nope + m.rope)
        w.add_value_length_mla(m.v_head)
    w.add_expert_feed_forward_length(s.n_ff_exp)
    w.add_expert_shared_count(m.n_shared)
    w.add_expert_weights_scale(m.scale)
    if m.norm:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(m.rope)
    w.add_expert_group_count(m.groups[0])
    w.add_expert_group_used_count(m.groups[1])
    w.add_expert_gating_func(ExpertGatingFuncType(m.gating))
    if m.yarn:  # as TextModel and DeepseekV2Model write rope_scaling
        factor, orig, mscale_all_dim = m.yarn
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_scaling_yarn_beta_fast(32.0)
        w.add_rope_scaling_yarn_beta_slow(1.0)
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all_dim)


def _mla_tensors(mat, norm, p, s, m):
    """One layer's MLA tensors in the converter's names and numpy shapes."""
    e, h, dk = s.n_embd, s.n_head, m.nope + m.rope
    if m.q_lora_rank:
        mat(p + "attn_q_a.weight", m.q_lora_rank, e)
        norm(p + "attn_q_a_norm.weight", m.q_lora_rank)
        mat(p + "attn_q_b.weight", h * dk, m.q_lora_rank)
    else:
        mat(p + "attn_q.weight", h * dk, e)
    mat(p + "attn_kv_a_mqa.weight", m.kv_lora_rank + m.rope, e)
    norm(p + "attn_kv_a_norm.weight", m.kv_lora_rank)
    if m.kv_b:
        mat(p + "attn_kv_b.weight", h * (m.nope + m.v_head), m.kv_lora_rank)
    else:
        mat(p + "attn_k_b.weight", h, m.kv_lora_rank, m.nope)
        mat(p + "attn_v_b.weight", h, m.v_head, m.kv_lora_rank)
    mat(p + "attn_output.weight", e, h * m.v_head)


def _mla_ffn(mat, norm, p, s, m, i):
    """Layer i's FFN: dense for the leading layers, else routed and shared experts."""
    e = s.n_embd
    norm(p + "ffn_norm.weight", e)
    if i < m.dense_lead:
        mat(p + "ffn_gate.weight", s.n_ff, e)
        mat(p + "ffn_up.weight", s.n_ff, e)
        mat(p + "ffn_down.weight", e, s.n_ff)
        return
    mat(p + "ffn_gate_inp.weight", s.n_expert, e, scale=2 * e**-0.5, keep_f32=True)
    if m.probs_b:
        mat(p + "exp_probs_b.bias", s.n_expert, scale=0.05, keep_f32=True)
    mat(p + "ffn_gate_exps.weight", s.n_expert, s.n_ff_exp, e)
    mat(p + "ffn_up_exps.weight", s.n_expert, s.n_ff_exp, e)
    mat(p + "ffn_down_exps.weight", s.n_expert, e, s.n_ff_exp)
    n_sh = m.n_shared * s.n_ff_exp
    mat(p + "ffn_gate_shexp.weight", n_sh, e)
    mat(p + "ffn_up_shexp.weight", n_sh, e)
    mat(p + "ffn_down_shexp.weight", e, n_sh)


def write_gpt_oss(path, shape=Shape(), dtype=np.float32, seed=0, expert_type=None):
    """A random-weight gpt-oss file with the keys, tensor names and types that
    convert_hf_to_gguf writes for gpt-oss-20b: sinks, post-attention norm, biases on
    q/k/v/o, the router and the experts (F32, 2-D for the experts), experts in
    `expert_type` (MXFP4 as in the published files; None: dtype; dtype "bf16": BF16
    for the other matrices, the converter's default). Gate and up have 2x
    the usual scale so that the clamped SwiGLU's limits (+-7) are reached (by ~0.05%
    of the values), down a quarter of it so that the experts' outputs keep the usual
    size (larger ones make the random model so sensitive that Q4_K moves its logits by
    a KL of 0.2 or more, against 0.06 for the other architectures' files)."""
    from gguf import GGMLQuantizationType
    from gguf import quants as gguf_quants

    s, g = replace(shape, n_head=2 * shape.n_embd // shape.head_dim), GPT_OSS
    rng = np.random.default_rng(seed)
    w = GGUFWriter(os.fspath(path), "gpt-oss")
    w.add_context_length(int(g["n_ctx_orig"] * g["yarn_factor"]))
    w.add_embedding_length(s.n_embd)
    w.add_block_count(s.n_layer)
    w.add_feed_forward_length(s.n_ff_exp)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_freq_base(g["rope_base"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(g["yarn_factor"])
    w.add_rope_scaling_orig_ctx_len(g["n_ctx_orig"])
    w.add_rope_scaling_yarn_beta_fast(32.0)
    w.add_rope_scaling_yarn_beta_slow(1.0)
    w.add_layer_norm_rms_eps(g["rms_eps"])
    w.add_expert_count(s.n_expert)
    w.add_expert_used_count(s.n_expert_used)
    w.add_sliding_window(g["sliding_window"])
    w.add_expert_feed_forward_length(s.n_ff_exp)
    mxfp4 = expert_type == GGMLQuantizationType.MXFP4  # as the converter labels such files
    w.add_file_type(
        gguf.LlamaFileType.MOSTLY_MXFP4_MOE if mxfp4 else 1 if dtype == np.float16 else 0
    )
    for key, value, vtype, sub in vocab_fields(s.n_vocab):
        w.add_key_value(key, value, vtype, sub_type=sub)

    def rand(*dims, scale):
        return rng.standard_normal(dims).astype(np.float32) * np.float32(scale)

    def mat(name, *dims, scale=None):
        a = rand(*dims, scale=scale or dims[-1] ** -0.5)
        if dtype == "bf16":  # the converter's default for gpt-oss's bf16 weights
            bf16 = GGMLQuantizationType.BF16
            w.add_tensor(name, gguf_quants.quantize(a, bf16), raw_dtype=bf16)
        else:
            w.add_tensor(name, a.astype(dtype))

    def f32(name, *dims, scale):
        w.add_tensor(name, rand(*dims, scale=scale))

    def experts(name, *dims, scale):
        a = rand(*dims, scale=scale)
        if expert_type is None:
            w.add_tensor(name, a.astype(dtype))
        else:
            q = gguf_quants.quantize(a, expert_type)
            w.add_tensor(name, q, raw_dtype=GGMLQuantizationType(expert_type))

    def norm(name, n):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))

    e, hd, x, f = s.n_embd, s.head_dim, s.n_expert, s.n_ff_exp
    # YaRN multiplies cos/sin by 1 + 0.1 ln(factor) (1.35): Q and K are scaled down by
    # as much, so that Q.K is as large as in the other files (at full size the random
    # model's attention turns so sharp that Q8_0 moves its logits by a KL of 0.06)
    qk = e**-0.5 / (1.0 + 0.1 * np.log(g["yarn_factor"]))
    mat("token_embd.weight", s.n_vocab, e, scale=1.0)
    norm("output_norm.weight", e)
    mat("output.weight", s.n_vocab, e, scale=2 * e**-0.5)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight", e)
        mat(p + "attn_q.weight", s.n_head * hd, e, scale=qk)
        mat(p + "attn_k.weight", s.n_head_kv * hd, e, scale=qk)
        mat(p + "attn_v.weight", s.n_head_kv * hd, e)
        mat(p + "attn_output.weight", e, s.n_head * hd)
        f32(p + "attn_q.bias", s.n_head * hd, scale=0.1)
        f32(p + "attn_k.bias", s.n_head_kv * hd, scale=0.1)
        f32(p + "attn_v.bias", s.n_head_kv * hd, scale=0.1)
        f32(p + "attn_output.bias", e, scale=0.1)
        f32(p + "attn_sinks.weight", s.n_head, scale=1.0)
        norm(p + "post_attention_norm.weight", e)
        f32(p + "ffn_gate_inp.weight", x, e, scale=2 * e**-0.5)
        f32(p + "ffn_gate_inp.bias", x, scale=0.5)
        experts(p + "ffn_gate_exps.weight", x, f, e, scale=2 * e**-0.5)
        experts(p + "ffn_up_exps.weight", x, f, e, scale=2 * e**-0.5)
        experts(p + "ffn_down_exps.weight", x, e, f, scale=f**-0.5 / 4)
        f32(p + "ffn_gate_exps.bias", x, f, scale=0.5)
        f32(p + "ffn_up_exps.bias", x, f, scale=0.5)
        f32(p + "ffn_down_exps.bias", x, e, scale=0.1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_gemma3_keys(w, spec, softcap=None):
    """Gemma 3's RoPE and sliding-window keys (no rope.dimension_count, no pattern key:
    llama.cpp's pattern 6 applies), plus linear RoPE scaling for the 4B-like file."""
    w.add_rope_freq_base(1_000_000.0)
    w.add_rope_freq_base_swa(10000.0)
    w.add_sliding_window(spec["window"])
    if spec["rope_factor"]:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec["rope_factor"])
    if softcap:
        w.add_final_logit_softcapping(softcap)


def llamacpp_quantize(src, dst, ftype_name, pure=False):
    """Quantize `src` to `dst` with llama.cpp's own quantizer (e.g. "Q4_K_M")."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = 2
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed: {rc}")
    return dst


def llamacpp_logits(path, tokens, n_ctx=256, n_threads=2):
    """llama.cpp's logits (len(tokens), n_vocab) for tokens from a fresh context."""
    import llama_cpp

    llm = llama_cpp.Llama(
        os.fspath(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_threads=n_threads,
        logits_all=True,
        verbose=False,
    )
    llm.eval(list(map(int, tokens)))
    out = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    return out


def llamacpp_step_logits(path, tokens, n_ctx=256, n_threads=2):
    """llama.cpp's logits (len(tokens), n_vocab) fed one token per batch: how far its
    own results move with the batch shape (its noise floor for argmax flips)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        os.fspath(path), n_ctx=n_ctx, n_batch=1, n_ubatch=1, n_threads=n_threads,
        logits_all=True, verbose=False,
    )  # fmt: skip
    rows = []
    for t in tokens:
        llm.eval([int(t)])
        rows.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32))
    llm.close()
    return np.array(rows)
