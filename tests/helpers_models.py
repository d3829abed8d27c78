"""Random-weight GGUF models of every supported architecture, for parity tests.

Written with gguf-py's GGUFWriter; the vocabulary is copied from the built-in
model so that llama.cpp (the reference) can load the files as they are.
"""

import ctypes
import os
from dataclasses import dataclass, replace

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter, Keys, RopeScalingType, TokenType

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
    "gemma3": dict(moe=False, shexp=False, qk_norm="head", bias=False, tied=True, gemma=True),
    "gemma3-4b": dict(moe=False, shexp=False, qk_norm="head", bias=False, tied=True, gemma=True),
}

# Arch names in ARCHS that write another general.architecture
GGUF_ARCH = {"llama-moe": "llama", "granitemoe-shared": "granitemoe", "gemma3-4b": "gemma3"}

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
    path, arch, shape=Shape(), dtype=np.float32, seed=0, tied=None, softcap=None
):
    """Write a random-weight model of `arch` (a key of ARCHS) to `path`; `tied`: no
    output.weight (None: as the architecture's converted files); softcap: a
    final_logit_softcapping value (gemma)."""
    spec = ARCHS[arch]
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
        s.n_ff_exp if spec["moe"] and gguf_arch in ("llama", "olmoe", "granitemoe") else s.n_ff
    )
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    if spec.get("gemma"):  # as convert_hf_to_gguf's Gemma3Model writes them
        write_gemma3_keys(w, GEMMA3[arch], softcap)
    else:
        w.add_rope_dimension_count(s.head_dim)
        w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(1 if dtype == np.float16 else 0)
    if spec.get("granite"):  # as convert_hf_to_gguf writes Granite's multipliers
        w.add_embedding_scale(GRANITE_SCALES["embedding"])
        w.add_residual_scale(GRANITE_SCALES["residual"])
        w.add_attention_scale(GRANITE_SCALES["attention"])
        w.add_logit_scale(GRANITE_SCALES["logit"])
    if spec["moe"]:
        w.add_expert_count(s.n_expert)
        w.add_expert_used_count(s.n_expert_used)
        if gguf_arch in ("qwen3moe", "qwen2moe"):
            w.add_expert_feed_forward_length(s.n_ff_exp)
        if spec["shexp"]:
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
