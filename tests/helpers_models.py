"""Random-weight GGUF models of every supported architecture, for parity tests.

Written with gguf-py's GGUFWriter; the vocabulary is copied from the built-in
model so that llama.cpp (the reference) can load the files as they are.
"""

import ctypes
import os
from dataclasses import dataclass, replace

import numpy as np
from gguf import ExpertGatingFuncType, GGUFReader, GGUFValueType, GGUFWriter, Keys, TokenType

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
    # SmallThinker (PowerInfer/SmallThinker-4BA0.6B): ReLU experts, router on the layer
    # input; without sliding_window (then llama.cpp has no NoPE layers either)
    "smallthinker": dict(moe=True, shexp=False, qk_norm="", bias=False, smallthinker=True),
}

# Arch names in ARCHS that write another general.architecture
GGUF_ARCH = {"llama-moe": "llama", "granitemoe-shared": "granitemoe"}

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


def write_random_model(path, arch, shape=Shape(), dtype=np.float32, seed=0, tied=None):
    """Write a random-weight model of `arch` (a key of ARCHS) to `path`; `tied`: no
    output.weight (None: as the architecture's converted files)."""
    spec = ARCHS[arch]
    tied = spec.get("tied", False) if tied is None else tied
    gguf_arch = GGUF_ARCH.get(arch, arch)
    s = shape
    if arch == "olmoe":  # olmoe's q/k norms span the full projection: keep heads equal
        s = replace(s, n_head_kv=s.n_head)
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
    w.add_head_count_kv(s.n_head_kv)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    if not spec.get("smallthinker"):  # SmallThinker's converter writes no rope dimension
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
        if gguf_arch in ("qwen3moe", "qwen2moe", "smallthinker"):
            w.add_expert_feed_forward_length(s.n_ff_exp)
        if spec.get("smallthinker"):  # its converter always writes the gating kind
            w.add_expert_gating_func(ExpertGatingFuncType.SOFTMAX)
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


# -- shared checks of the per-architecture test files (test_granitemoe, test_smallthinker)

PROMPT = [1, 450, 2217, 310, 263, 931, 1892, 727, 471, 263, 2217, 1024, 77]


def decode_steps(m, tokens=PROMPT, n_decode=3):
    """Prefill logits, then greedy decode steps' logits, from an empty cache."""
    m.cache.reset()
    out = [m._eval(tokens, all_logits=True)]
    for _ in range(n_decode):
        out.append(m._eval([int(np.argmax(out[-1][-1]))], all_logits=True))
    return out


def peer_steps(path, n_peers=2):
    """(decode_steps of `path` with its experts on n_peers local peers in exact mode,
    requests the peers served)."""
    from meldlite.api import Model
    from meldlite.options import Peers, Runtime
    from meldlite.transports.local_peer import LocalPeer

    peers = LocalPeer.start(n_peers)
    try:
        opts = Peers([p.endpoint for p in peers], exact=True, timeout=30.0, connect_timeout=120.0)
        m = Model(path, runtime=Runtime(n_ctx=64, n_threads=1), peers=opts)
        try:
            return decode_steps(m), m.store.stats()["peers_requests"]
        finally:
            m.close()
    finally:
        for p in peers:
            p.stop()


def quantized_pair(f16, out_dir, bpw=5.0):
    """(uniform Q4_K file, mixed file of `bpw` from a short profile) of `f16`, by
    `meldlite quantize`'s library calls."""
    import meldlite
    from meldlite.compress.quantize import quantize_model
    from meldlite.experts.profile import build_profile

    uniform = quantize_model(f16, out_dir / "q4k.gguf", qtype="Q4_K").path
    m = meldlite.load(f16, n_ctx=64)
    prof = build_profile(m, "Once upon a time there was a little girl. " * 8)
    m.close()
    return uniform, quantize_model(f16, out_dir / "mixed.gguf", bpw=bpw, profile=prof).path


def check_info_and_profile(path, out_dir, arch):
    """`meldlite info` names the architecture; `meldlite profile` writes its file."""
    from click.testing import CliRunner

    from meldlite.cli import main

    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 0, r.output
    assert arch in r.output
    text = out_dir / "t.txt"
    text.write_text("Once upon a time there was a little girl named Lily.\n" * 4)
    out = out_dir / "prof.json"
    r = CliRunner().invoke(main, ["profile", str(path), str(text), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists()
