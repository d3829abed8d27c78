"""Logit parity with llama.cpp on random-weight models of every architecture.

The reference is llama.cpp through llama-cpp-python (`logits_all=True`) on the
same file. F32/F16 files must agree to 1e-3 of the largest logit with the same
argmax everywhere; llama.cpp-quantized files (whose dot products quantize the
activations too) to a mean KL divergence below 1e-3 with >= 98% argmax
agreement.
"""

import numpy as np
import pytest

from helpers_models import ARCHS, llamacpp_logits, llamacpp_quantize, write_random_model

pytest.importorskip("llama_cpp")
import meldlite  # noqa: E402

N_TOKENS = 48


def tokens(seed=1):
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, 4096, N_TOKENS - 1).tolist()


def kl_per_position(ref, ours):
    """KL(ref || ours) of the softmax distributions, per position."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(ours)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    made = {}

    def get(arch, kind):
        key = (arch, kind)
        if key not in made:
            if kind in ("F32", "F16"):
                dtype = np.float32 if kind == "F32" else np.float16
                made[key] = write_random_model(root / f"{arch}-{kind}.gguf", arch, dtype=dtype)
            else:
                src = get(arch, "F32")
                made[key] = llamacpp_quantize(src, root / f"{arch}-{kind}.gguf", kind)
        return made[key]
    return get


@pytest.mark.parametrize("kind", ["F32", "F16"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_float_logits_match_llamacpp(models, arch, kind):
    path = models(arch, kind)
    ids = tokens()
    ref = llamacpp_logits(path, ids)                                          # (T, V)
    ours = meldlite.load(path, n_ctx=256).logits(ids)                         # (T, V)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-3, f"max |diff| / max |logit| = {rel:.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_K_M"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_quantized_logits_match_llamacpp(models, arch, kind):
    path = models(arch, kind)
    ids = tokens()
    ref = llamacpp_logits(path, ids)
    ours = meldlite.load(path, n_ctx=256).logits(ids)
    kl = kl_per_position(ref, ours).mean()
    agree = (ours.argmax(-1) == ref.argmax(-1)).mean()
    assert kl <= 1e-3, f"mean KL {kl:.2e}"
    assert agree >= 0.98, f"argmax agreement {agree:.3f}"


def test_decode_matches_prefill(models):
    """Token-by-token decoding gives the logits of one batched pass."""
    m = meldlite.load(models("qwen3moe", "Q4_K_M"), n_ctx=256)
    ids = tokens()[:12]
    batch = m.logits(ids)
    m.cache.reset()
    steps = np.concatenate([m._eval([t], all_logits=True) for t in ids])
    np.testing.assert_allclose(steps, batch, rtol=0, atol=1e-4 * np.abs(batch).max())
