"""Activation rounding (kernels/actquant.py): the jitted code against its NumPy
reference bit for bit, and a single quantized matmul against llama.cpp's."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from helpers_models import Shape, llamacpp_logits, llamacpp_quantize, write_random_model
from numba import njit

from meldlite.kernels.actquant import _f16_round, round_activations, round_activations_reference

TYPES = [
    T.F32,
    T.F16,
    T.BF16,
    T.Q4_0,
    T.Q4_1,
    T.Q5_0,
    T.Q5_1,
    T.Q8_0,
    T.Q2_K,
    T.Q3_K,
    T.Q4_K,
    T.Q5_K,
    T.Q6_K,
    T.IQ4_NL,
    T.IQ4_XS,
    T.MXFP4,
]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_jitted_rounding_equals_numpy_reference(qtype):
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((5, 512)) * np.exp(rng.uniform(-12, 10, (5, 512)))).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1, :4] = [65519.0, -65520.0, 6e-5, 2.0**-25]  # f16 edges
    ours = round_activations(x, qtype)
    ref = round_activations_reference(x, qtype)
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_q8_rounding_keeps_block_max_and_127_levels():
    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    r = round_activations(x, T.Q8_0)
    for b in range(0, 256, 32):
        blk, rb = x[0, b : b + 32], r[0, b : b + 32]
        step = np.float32(np.float16(np.abs(blk).max() / 127))
        np.testing.assert_allclose(rb / step, np.rint(rb / step), atol=1e-4)
        assert np.abs(rb - blk).max() <= step * 0.5 + 1e-6


def _output_only_model(path, zero_blocks=True):
    """A 1-layer model whose blocks are all zero: logits = output @ norm(embedding)."""
    import helpers_models as H

    add = H.GGUFWriter.add_tensor

    def zeroing(self, name, a, *args, **kw):
        if zero_blocks and name.startswith("blk.") and a.ndim >= 2:
            a = np.zeros_like(a)
        return add(self, name, a, *args, **kw)

    H.GGUFWriter.add_tensor = zeroing
    try:
        return write_random_model(path, "qwen3", shape=Shape(n_layer=1))
    finally:
        H.GGUFWriter.add_tensor = add


@pytest.mark.parametrize(
    "ftype",
    ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K_S", "Q4_K_S", "Q5_K_S"]
    + ["Q6_K", "IQ4_XS"],
)
def test_one_quantized_matmul_equals_llamacpp(tmp_path, ftype):
    """With blocks zeroed, a model's logits are one quantized matmul (output x
    normed embedding row): llama.cpp's must match meldlite's to float rounding."""
    pytest.importorskip("llama_cpp")
    import meldlite

    src = _output_only_model(tmp_path / "src.gguf")
    path = llamacpp_quantize(src, tmp_path / f"{ftype}.gguf", ftype, pure=True)
    ids = [1] + np.random.default_rng(1).integers(3, 4096, 31).tolist()
    ref = llamacpp_logits(path, ids)
    ours = meldlite.load(path, n_ctx=64).logits(ids)
    assert np.abs(ours - ref).max() <= 2e-6 * np.abs(ref).max()
    floats = meldlite.load(path, n_ctx=64, llama_numerics=False).logits(ids)
    assert np.abs(floats - ref).max() > 1e-4 * np.abs(ref).max()  # rounding is what matches


@njit
def _f16_rounded(x, out):
    for i in range(x.shape[0]):
        out[i] = _f16_round(x[i])


def test_f16_round_equals_numpy_float16_bit_for_bit():
    """The bit-twiddling float16 rounding (also the attention's Q and probabilities)
    against NumPy's float32 -> float16 -> float32, on 4M random bit patterns and the edge
    cases: both sides of every float16 binade boundary, ties, subnormals, overflow, +-0,
    +-inf. (All 2^32 float32 values were checked once; too slow for the suite.)"""
    rng = np.random.default_rng(16)
    bits = rng.integers(0, 2**32, 1 << 22, dtype=np.uint64).astype(np.uint32)
    half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    edges = half[np.isfinite(half)].astype(np.float32).view(np.uint32)
    near = np.concatenate(
        [edges - np.uint32(1), edges, edges + np.uint32(1), edges ^ np.uint32(0x1000)]
    )
    special = np.float32([65504, 65519.99, 65520, 6e-8, 2.0**-14, 2.0**-25, np.inf, 0.0])
    x = np.concatenate([bits, near, special.view(np.uint32)]).view(np.float32)
    x = np.concatenate([x, -x[np.isfinite(x)]])
    x = x[~np.isnan(x)]
    got = np.empty_like(x)
    _f16_rounded(x, got)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
