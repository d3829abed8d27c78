"""Sampling filters against llama.cpp's own samplers (through llama-cpp-python's
low-level API): the same logits must keep the same candidate set."""

import ctypes

import numpy as np
import pytest

from meldlite import sampling
from meldlite.errors import OptionError
from meldlite.options import Sampler

llama_cpp = pytest.importorskip("llama_cpp")

V = 300


def logits(seed):
    return (np.random.default_rng(seed).standard_normal(V) * 3).astype(np.float32)


def llama_apply(sampler, x, accept=()):
    """Run one llama.cpp sampler over logits x; return the surviving ids and their logits."""
    data = (llama_cpp.llama_token_data * len(x))(
        *[llama_cpp.llama_token_data(i, float(v), 0.0) for i, v in enumerate(x)]
    )
    arr = llama_cpp.llama_token_data_array(data, len(x), -1, False)
    for t in accept:
        llama_cpp.llama_sampler_accept(sampler, t)
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(arr))
    llama_cpp.llama_sampler_free(sampler)
    kept = {data[i].id: data[i].logit for i in range(arr.size) if np.isfinite(data[i].logit)}
    return kept


def penalties(last_n, repeat):
    """llama.cpp's repetition-penalty sampler (frequency and presence off)."""
    return llama_cpp.llama_sampler_init_penalties(V, last_n, repeat, 0.0, 0.0)


def ours_kept(y):
    return {i: v for i, v in enumerate(y) if np.isfinite(v)}


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_matches_llamacpp(seed, k):
    x = logits(seed)
    assert set(ours_kept(sampling.top_k(x, k))) == set(
        llama_apply(llama_cpp.llama_sampler_init_top_k(k), x)
    )


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.95])
def test_top_p_matches_llamacpp(seed, p):
    x = logits(seed)
    ref = llama_apply(llama_cpp.llama_sampler_init_top_p(p, 1), x)
    assert set(ours_kept(sampling.top_p(x, p))) == set(ref)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.01, 0.05, 0.3])
def test_min_p_matches_llamacpp(seed, p):
    x = logits(seed)
    ref = llama_apply(llama_cpp.llama_sampler_init_min_p(p, 1), x)
    assert set(ours_kept(sampling.min_p(x, p))) == set(ref)


@pytest.mark.parametrize("penalty", [1.1, 1.5])
def test_repetition_penalty_matches_llamacpp(penalty):
    x = logits(7)
    recent = [3, 5, 5, 17, 200, 299]
    ref = llama_apply(penalties(64, penalty), x, recent)
    ours = sampling.repetition_penalty(x, recent, penalty)
    np.testing.assert_allclose([ours[i] for i in range(V)], [ref[i] for i in range(V)], rtol=1e-6)


def test_greedy_is_argmax_and_ignores_rng():
    x = logits(3)
    params = Sampler(temperature=0.0)
    assert sampling.sample(x, params, np.random.default_rng(0)) == int(np.argmax(x))


def test_seeded_sampling_is_reproducible_and_follows_distribution():
    x = logits(4)
    params = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    draw = [sampling.sample(x, params, np.random.default_rng(42)) for _ in range(3)]
    assert len(set(draw)) == 1
    rng = np.random.default_rng(0)
    counts = np.bincount([sampling.sample(x, params, rng) for _ in range(4000)], minlength=V)
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    top = np.argsort(-probs)[:3]
    np.testing.assert_allclose(counts[top] / 4000, probs[top], atol=0.03)


def test_bad_params_raise_option_error():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(min_p=2), dict(top_k=-3)):
        with pytest.raises(OptionError):
            Sampler(**bad)
