"""Gemma 3 (dense, interleaved sliding-window and global layers) against llama.cpp.

The files are Gemma 3 1B and 4B scaled down (tests/helpers_models.py GEMMA3): the keys,
tensor names and types convert_hf_to_gguf writes (no output.weight, post-attention and
post-FFN norms, per-head Q/K norms, rope.freq_base 1e6 and rope.freq_base_swa 1e4, a
sliding window shorter than the contexts used here; the 4B-like file also has linear
RoPE scaling 8). F32/F16/Q8_0/Q4_0/Q4_K_M logit parity is in test_parity.py (both
files are in ARCHS); here: the configuration, greedy generation, decode against prefill
across the window, final logit softcapping, and the window-only KV cache."""

import numpy as np
import pytest
from helpers_models import GEMMA3, llamacpp_logits, write_random_model

import meldlite
from meldlite import model as model_mod
from meldlite.metrics import kl_divergence

N_CTX = 160
PROMPT = [2] + np.random.default_rng(7).integers(3, 4096, 47).tolist()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma3")
    return {
        arch: write_random_model(d / f"{arch}.gguf", arch, dtype=np.float16, seed=3)
        for arch in GEMMA3
    }


@pytest.mark.parametrize("arch", list(GEMMA3))
def test_config_reads_gemma3_keys(files, arch):
    spec = GEMMA3[arch]
    cfg = meldlite.load(files[arch], n_ctx=64).cfg
    assert cfg.arch == "gemma3"
    assert cfg.n_swa == spec["window"]
    assert cfg.swa_layers == (1, 1, 1, 1, 1, 0, 1)  # llama.cpp's pattern 6
    scale = 1.0 / spec["rope_factor"] if spec["rope_factor"] else 1.0
    assert cfg.rope_of(0) == (10000.0, 1.0, cfg.head_dim_k)  # local layers: unscaled
    assert cfg.rope_of(5) == (1_000_000.0, scale, cfg.head_dim_k)
    assert cfg.embedding_scale == np.sqrt(np.float32(cfg.n_embd))
    assert cfg.q_scale == np.float32(1.0) / np.sqrt(np.float32(cfg.head_dim_k))
    assert cfg.attention_scale == 1.0 and cfg.logit_softcap == 0.0


def llamacpp_greedy(path, prompt, n):
    """llama.cpp's greedy continuation: prefill, then one token per eval."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, logits_all=True, verbose=False
    )
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    llm.close()
    return out


def meldlite_greedy(m, prompt, n):
    m.cache.reset()
    logits = m._eval(prompt, all_logits=False)[-1]
    out = []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = m._eval([out[-1]], all_logits=False)[-1]
    return out


@pytest.mark.parametrize("arch", list(GEMMA3))
def test_greedy_generation_matches_llamacpp(files, arch):
    """48 prompt tokens and 56 generated: past the window and around the ring."""
    pytest.importorskip("llama_cpp")
    want = llamacpp_greedy(files[arch], PROMPT, 56)
    got = meldlite_greedy(meldlite.load(files[arch], n_ctx=N_CTX), PROMPT, 56)
    assert got == want


def test_decode_matches_prefill_across_the_window(files):
    m = meldlite.load(files["gemma3"], n_ctx=N_CTX)
    ids = PROMPT + PROMPT[1:30]  # 77 tokens: the ring (63 rows) wraps
    batch = m.logits(ids)
    m.cache.reset()
    steps = np.concatenate([m._eval([t], all_logits=True) for t in ids])
    np.testing.assert_allclose(steps, batch, rtol=0, atol=1e-4 * np.abs(batch).max())


def test_window_only_cache_gives_the_full_cache_bits(files, monkeypatch):
    """SWA layers keep window + 31 rows; llama.cpp's default full-size SWA cache gives
    the same logits bit for bit (same positions, same order)."""
    ids = PROMPT + PROMPT[1:40]
    runs = {}
    for chunk in (model_mod.SWA_CHUNK, 1 << 20):  # ring, full-size
        monkeypatch.setattr(model_mod, "SWA_CHUNK", chunk)
        m = meldlite.load(files["gemma3-4b"], n_ctx=N_CTX)
        first = m.logits(ids[:70])  # prefill longer than the ring
        rest = np.concatenate([m._eval([t], all_logits=True) for t in ids[70:]])
        runs[chunk] = (np.concatenate([first, rest]), m.cache.nbytes)
    (ring, ring_bytes), (full, full_bytes) = runs.values()
    np.testing.assert_array_equal(ring, full)
    cfg = m.cfg
    row = 2 * cfg.n_head_kv * cfg.head_dim_k * 2  # K and V, float16
    n_swa_layers = sum(cfg.swa_layers)
    assert full_bytes == cfg.n_layer * N_CTX * row
    assert ring_bytes == full_bytes - n_swa_layers * (N_CTX - cfg.n_swa - 31) * row


def test_final_logit_softcapping_matches_llamacpp(tmp_path):
    """Gemma 3 files have no final_logit_softcapping; llama.cpp applies it when given."""
    pytest.importorskip("llama_cpp")
    path = write_random_model(tmp_path / "cap.gguf", "gemma3", seed=4, softcap=30.0)
    ids = PROMPT + PROMPT[1:20]
    ref = llamacpp_logits(path, ids, n_ctx=N_CTX)
    m = meldlite.load(path, n_ctx=N_CTX)
    assert m.cfg.logit_softcap == 30.0
    ours = m.logits(ids)
    assert np.abs(ref).max() <= 30.0
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()
    assert kl_divergence(ref, ours).mean() <= 1e-6


def test_info_shows_the_sliding_window(files):
    from click.testing import CliRunner

    from meldlite.cli import main

    r = CliRunner().invoke(main, ["info", str(files["gemma3"])])
    assert r.exit_code == 0, r.output
    assert "gemma3" in r.output
    assert "sliding window 32 on 6 of 7 layers" in r.output


def test_gelu_follows_ggmls_f16_table():
    """ggml_vec_gelu_f32 with GGML_GELU_FP16: 0 at x <= -10, x at x >= 10, else the
    half-precision table at f16(x) (so inputs rounding to the same half agree)."""
    from meldlite.kernels.mathops import gelu

    x = np.linspace(-12, 12, 20001, dtype=np.float32)  # (N,)
    exact = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    got = gelu(x)
    inside = np.abs(x) < 10
    np.testing.assert_array_equal(got[x >= 10], x[x >= 10])
    assert not got[x <= -10].any()
    assert np.array_equal(got[inside], got[inside].astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(got[inside], exact[inside], rtol=2**-10, atol=2**-14)
    nudged = np.nextafter(x, np.float32(np.inf))  # same half value mostly
    same_half = (nudged.astype(np.float16) == x.astype(np.float16)) & inside
    np.testing.assert_array_equal(gelu(nudged)[same_half], got[same_half])
