"""Sliding-window attention pieces: the window mask against the NumPy reference, the
window-only ring cache against a full cache (bit-identical), and the SWA layer
patterns as llama.cpp's llama_hparams::set_swa_pattern lays them out. End-to-end
parity with llama.cpp on SWA models is in test_gemma3.py."""

import numpy as np
import pytest

from meldlite.config import ARCHITECTURES, ArchTraits, _swa_layers
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
