"""RoPE scaling: linear and YaRN tables against their one-angle-at-a-time reference
(ggml's rope cache and rope_yarn), and models with rope.scaling.* keys against
llama.cpp at positions past YaRN's original context."""

import numpy as np
import pytest
from helpers_models import Shape, llamacpp_logits, write_random_model

import meldlite
from meldlite.kernels.attention_ref import rope_tables_ref
from meldlite.kernels.mathops import rope_tables

SCALINGS = [
    dict(),
    dict(freq_scale=0.25),
    dict(freq_scale=1 / 32, ext_factor=1.0, attn_factor=0.9, n_ctx_orig=4096),
    dict(freq_scale=1 / 40, ext_factor=0.5, n_ctx_orig=4096, beta_fast=16, beta_slow=2),
]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_tables_match_the_reference(scaling):
    for base, n_rot in ((10000.0, 64), (150000.0, 64), (1e6, 128)):
        got = rope_tables(300, n_rot, base, **scaling)
        want = rope_tables_ref(300, n_rot, base, **scaling)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize(
    "arch, rope",
    [
        ("qwen3", dict(type="yarn", factor=4.0, orig_ctx=32)),
        ("llama", dict(type="linear", factor=2.0)),
    ],
)
def test_scaled_models_match_llamacpp(tmp_path, arch, rope):
    pytest.importorskip("llama_cpp")
    path = write_random_model(tmp_path / "m.gguf", arch, Shape(n_ctx=128), seed=2, rope=rope)
    ids = [1] + np.random.default_rng(1).integers(3, 4096, 95).tolist()
    m = meldlite.load(path, n_ctx=128)
    assert m.cfg.rope_scale == np.float32(1 / rope["factor"])
    ours = m.logits(ids)
    ref = llamacpp_logits(path, ids, n_ctx=128)
    d = np.abs(ours - ref)
    print(f"{arch} {rope}: max {d.max() / np.abs(ref).max():.2e}")
    assert d.max() <= 1e-3 * np.abs(ref).max()
    assert np.median(d) <= 5e-4 * np.abs(ref).max()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
