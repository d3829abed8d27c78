"""Sliding-window attention pieces: the window mask against the NumPy reference, the
window-only ring cache against a full cache (bit-identical), the per-segment RoPE and
attention of several sequences against the reference, and the SWA layer
patterns as llama.cpp's llama_hparams::set_swa_pattern lays them out. End-to-end
parity with llama.cpp on SWA models is in test_gemma3.py."""

import numpy as np
import pytest

from meldlite.config import ARCHITECTURES, ArchTraits, ModelConfig, _swa_layers
from meldlite.errors import FormatError
from meldlite.kernels import attention, attention_ref


def rel_err(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


def random_step(rng, n_tok, n_head, n_kv, d):
    q = rng.standard_normal((n_tok, n_head * d)).astype(np.float32)  # (T, H*D)
    k = rng.standard_normal((n_tok, n_kv * d)).astype(np.float32)  # (T, G*D)
    v = rng.standard_normal((n_tok, n_kv * d)).astype(np.float32)  # (T, G*D)
    return q, k, v


@pytest.mark.parametrize("window", [1, 5, 12])
def test_window_mask_matches_reference(window):
    rng = np.random.default_rng(60)
    n_tok, n_head, n_kv, d, pos0 = 6, 4, 2, 32, 9
    kc = rng.standard_normal((pos0 + n_tok, n_kv, d)).astype(np.float16)  # (S, G, D)
    vc = rng.standard_normal((pos0 + n_tok, n_kv, d)).astype(np.float16)  # (S, G, D)
    q = rng.standard_normal((n_tok, n_head * d)).astype(np.float32)  # (T, H*D)
    got = np.empty((n_tok, n_head * d), np.float32)  # (T, H*D)
    attention.attention_rows(
        q, kc.view(np.uint16), vc.view(np.uint16), pos0, n_head, 0.125, got, window
    )
    want = attention_ref.attention(q.reshape(n_tok, n_head, d), kc, vc, pos0, 0.125, window)
    assert rel_err(got, want) < 1e-5
    full = attention_ref.attention(q.reshape(n_tok, n_head, d), kc, vc, pos0, 0.125)
    assert window >= pos0 + n_tok or rel_err(got, full) > 1e-3  # the window matters


def test_ring_cache_gives_the_full_cache_bits():
    """A prefill longer than the ring, then single-token steps: the window-only ring
    (window + chunk - 1 rows) and a full cache give identical outputs."""
    rng = np.random.default_rng(61)
    n_head, n_kv, d, window, n_ctx = 4, 2, 32, 8, 64
    ring = (np.zeros((window + 3, n_kv, d), np.uint16), np.zeros((window + 3, n_kv, d), np.uint16))
    full = (np.zeros((n_ctx, n_kv, d), np.uint16), np.zeros((n_ctx, n_kv, d), np.uint16))
    pos = 0
    for n_tok in (29, 1, 1, 5, 1):
        q, k, v = random_step(rng, n_tok, n_head, n_kv, d)
        outs = []
        for kc, vc in (ring, full):
            out = np.empty((n_tok, n_head * d), np.float32)  # (T, H*D)
            attention.attend_cached(q, k, v, kc, vc, pos, n_head, 0.125, window, out)
            outs.append(out)
        np.testing.assert_array_equal(outs[0], outs[1])
        pos += n_tok


@pytest.mark.parametrize("window", [0, 8])
def test_segments_of_several_sequences_match_reference(window):
    """rope_segments and attend_segments (the kernels' per-segment RoPE, cache write and
    attention) against the reference: three sequences' prefills together, decode steps
    in another order, a decode token beside another sequence's prompt chunk; the
    kernels' sliding-window caches are rings, the reference's full size; with sinks."""
    from meldlite.kernels.mathops import rope_tables

    rng = np.random.default_rng(63)
    n_seq, n_head, n_kv, d, n_ctx = 3, 4, 2, 32, 64
    rows = window + 3 if window else n_ctx
    kc = np.zeros((n_seq, rows, n_kv, d), np.uint16)  # (N, C, G, D) float16 bits
    vc = np.zeros((n_seq, rows, n_kv, d), np.uint16)  # (N, C, G, D)
    k_ref = np.zeros((n_seq, n_ctx, n_kv, d), np.float16)  # (N, n_ctx, G, D)
    v_ref = np.zeros((n_seq, n_ctx, n_kv, d), np.float16)  # (N, n_ctx, G, D)
    cos, sin = rope_tables(n_ctx, d, 10000.0)  # (n_ctx, D/2)
    sinks = (3.0 * rng.standard_normal(n_head)).astype(np.float32)  # (H,)
    n_past = [0] * n_seq
    for step in ([(0, 13), (1, 21)], [(1, 1), (0, 1)], [(0, 1), (2, 9), (1, 1)], [(2, 1)]):
        segs = np.array([(s, n_past[s], n) for s, n in step], np.int64)  # (S, 3)
        n_tok = int(segs[:, 2].sum())
        q, k, v = random_step(rng, n_tok, n_head, n_kv, d)
        pos = np.concatenate([np.arange(p, p + n) for _, p, n in segs])  # (T,)
        want_q = attention_ref.rope(q.reshape(n_tok, n_head, d), cos[pos], sin[pos], d, True)
        want_k = attention_ref.rope(k.reshape(n_tok, n_kv, d), cos[pos], sin[pos], d, True)
        attention.rope_segments(q, n_head, d, cos, sin, segs, d, True)
        attention.rope_segments(k, n_kv, d, cos, sin, segs, d, True)
        np.testing.assert_array_equal(q, want_q.reshape(n_tok, -1))
        np.testing.assert_array_equal(k, want_k.reshape(n_tok, -1))
        got = np.empty((n_tok, n_head * d), np.float32)  # (T, H*D)
        attention.attend_segments(q, k, v, kc, vc, segs, n_head, 0.125, window, got, sinks)
        want = attention_ref.attention_segments(
            q.reshape(n_tok, n_head, d), k.reshape(n_tok, n_kv, d), v.reshape(n_tok, n_kv, d),
            k_ref, v_ref, segs, 0.125, window, sinks,
        )  # fmt: skip
        assert rel_err(got, want) < 1e-5
        for s, _, n in segs:
            n_past[s] += n


def test_ring_too_small_for_the_positions_raises():
    q = random_step(np.random.default_rng(62), 4, 2, 1, 8)[0]
    kc = np.zeros((3, 1, 8), np.uint16)
    with pytest.raises(ValueError):
        attention.attention_rows(q, kc, kc, 0, 2, 1.0, np.empty((4, 16), np.float32), 8)


def llama_cpp_pattern(n_layer, n_pattern, dense_first):
    """llama_hparams::set_swa_pattern, written out."""
    if dense_first:
        return tuple(int(n_pattern == 0 or il % n_pattern != 0) for il in range(n_layer))
    return tuple(int(n_pattern == 0 or il % n_pattern < n_pattern - 1) for il in range(n_layer))


def test_swa_patterns():
    every6 = ArchTraits(True, "", False, "", "", swa_pattern=6)
    assert _swa_layers(None, 13, every6) == (1, 1, 1, 1, 1, 0) * 2 + (1,)
    dense_first4 = ArchTraits(True, "", False, "", "", swa_pattern=4, swa_dense_first=True)
    assert _swa_layers(None, 9, dense_first4) == (0, 1, 1, 1, 0, 1, 1, 1, 0)
    assert _swa_layers(2, 5, every6) == (1, 0, 1, 0, 1)  # the key's n_pattern wins
    assert _swa_layers(0, 3, every6) == (1, 1, 1)  # 0: every layer SWA
    assert _swa_layers([True, False, True], 3, every6) == (1, 0, 1)  # per-layer array
    for n_pattern, dense_first in ((6, False), (4, True), (2, False), (3, True)):
        traits = ArchTraits(
            True, "", False, "", "", swa_pattern=n_pattern, swa_dense_first=dense_first
        )
        want = llama_cpp_pattern(26, n_pattern, dense_first)
        assert _swa_layers(None, 26, traits) == want
    with pytest.raises(FormatError):
        _swa_layers([1, 0], 3, every6)
    with pytest.raises(FormatError):
        _swa_layers(-1, 3, every6)


def test_existing_architectures_have_no_swa():
    for name in ("qwen3moe", "qwen2moe", "olmoe", "llama", "qwen2", "qwen3", "granitemoe"):
        assert ARCHITECTURES[name].swa_pattern == -1


def metadata(arch, **keys):
    """A small dense model's metadata plus `keys` (names after "{arch}.")."""
    base = {
        "embedding_length": 64,
        "block_count": 8,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 500000.0,
        **keys,
    }
    return {"general.architecture": arch, **{f"{arch}.{k}": v for k, v in base.items()}}


def test_swa_rope_global_with_nope_layers(monkeypatch):
    """gpt-oss/smallthinker style: SWA layers keep the global base and scale unless
    rope.freq_base_swa is given; a forced window; NoPE on every 4th layer (dense first)."""
    traits = ArchTraits(
        True, "", False, "", "", swa_pattern=4, swa_dense_first=True, swa_window=4096, nope_step=4
    )
    monkeypatch.setitem(ARCHITECTURES, "swa-test", traits)
    md = metadata("swa-test", **{"attention.sliding_window": 128, "rope.scaling.factor": 4.0})
    cfg = ModelConfig.from_metadata(md, n_vocab=32)
    assert cfg.n_swa == 4096
    assert cfg.swa_layers == (0, 1, 1, 1, 0, 1, 1, 1)
    assert cfg.rope_of(0) == (500000.0, 0.25, 0)  # global, NoPE
    assert cfg.rope_of(1) == (500000.0, 0.25, 16)
    md["swa-test.rope.freq_base_swa"] = 10000.0
    assert ModelConfig.from_metadata(md, n_vocab=32).rope_of(1) == (10000.0, 0.25, 16)
    no_window = ModelConfig.from_metadata(metadata("swa-test"), n_vocab=32)
    assert no_window.n_swa == 0 and no_window.swa_layers == () and no_window.nope_layers == ()
    assert no_window.rope_of(0) == (500000.0, 1.0, 16)


def test_gemma3_without_a_window_has_no_swa():
    md = metadata("gemma3", **{"rope.freq_base_swa": 10000.0})
    cfg = ModelConfig.from_metadata(md, n_vocab=32)
    assert cfg.n_swa == 0 and not any(cfg.is_swa(i) for i in range(cfg.n_layer))
    assert cfg.rope_of(3) == (500000.0, 1.0, 16)
