"""The runtime on the trained model, against llama.cpp on the same files."""

import math

import numpy as np
import pytest
from conftest import valid_stories
from helpers_models import llamacpp_quantize

llama_cpp = pytest.importorskip("llama_cpp")
import meldlite  # noqa: E402
from meldlite.errors import OptionError  # noqa: E402
from meldlite.metrics import log_softmax  # noqa: E402


@pytest.fixture(scope="module")
def trained(shared_models, tmp_path_factory):
    """{"F16": path, "Q4_K_M": path} of the trained model."""
    f16 = shared_models / "tinystories-moe-f16.gguf"
    q4 = llamacpp_quantize(f16, tmp_path_factory.mktemp("q") / "q4_k_m.gguf", "Q4_K_M")
    return {"F16": f16, "Q4_K_M": q4}


def story_nll(logits, ids):
    logp = log_softmax(logits)
    return -logp[np.arange(len(ids) - 1), ids[1:]].sum()


def llamacpp_perplexity(path, stories, n_ctx=512):
    """llama.cpp's perplexity with meldlite's definition: each story alone as
    BOS + story; a story longer than the context in windows of n_ctx tokens
    overlapping by one, each from a fresh context, every token scored once."""
    llm = llama_cpp.Llama(
        str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False
    )
    nll, n = 0.0, 0
    for story in stories:
        ids = llm.tokenize(story.encode(), add_bos=True)
        for start in range(0, len(ids) - 1, n_ctx - 1):
            window = ids[start : start + n_ctx]
            llm.reset()
            llm._ctx.kv_cache_clear()
            llm.eval(window)
            nll += story_nll(np.array(llm.scores[: len(window)]), np.array(window))
            n += len(window) - 1
    llm.close()
    return math.exp(nll / n)


@pytest.mark.parametrize("kind", ["F16", "Q4_K_M"])
def test_perplexity_on_50_stories_within_half_percent_of_llamacpp(trained, shared_models, kind):
    stories = valid_stories(shared_models, 50)
    ref = llamacpp_perplexity(trained[kind], stories)
    ours = meldlite.load(trained[kind], n_ctx=512).perplexity(
        "\n<|endoftext|>\n".join(stories), separator="<|endoftext|>"
    )
    assert abs(ours / ref - 1) <= 0.005, f"meldlite {ours:.4f} vs llama.cpp {ref:.4f}"


def test_greedy_generation_matches_llamacpp(trained):
    prompt = "Once upon a time"
    llm = llama_cpp.Llama(str(trained["F16"]), n_ctx=512, n_threads=2, verbose=False)
    ref = llm.create_completion(
        prompt, max_tokens=40, temperature=0.0, top_k=1, repeat_penalty=1.0
    )["choices"][0]["text"]
    llm.close()
    ours = "".join(meldlite.load(trained["F16"]).generate(prompt, max_tokens=40, temperature=0.0))
    assert ours == ref


def test_default_model_loads_and_generates_reproducibly():
    m = meldlite.load()
    assert m.info()["architecture"] == "qwen3moe"
    a = "".join(m.generate("Once upon a time", max_tokens=16, seed=3))
    b = "".join(m.generate("Once upon a time", max_tokens=16, seed=3))
    assert a == b and len(a) > 0
    assert m.timings["prefill_tokens"] == len(m.tokenize("Once upon a time"))


def test_logits_shape_and_fresh_context():
    m = meldlite.load()
    ids = m.tokenize("Tom had a big red ball.")
    a = m.logits(ids)
    b = m.logits(ids)
    assert a.shape == (len(ids), m.cfg.n_vocab) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_bad_arguments_raise_option_error():
    m = meldlite.load(n_ctx=8)
    with pytest.raises(OptionError):
        m.logits(list(range(1, 20)))  # longer than the context
    with pytest.raises(OptionError):
        m.logits([1, 10**6])  # id out of range
    with pytest.raises(OptionError):
        list(m.generate("hi", top_p=0))
    with pytest.raises(OptionError):
        meldlite.load(n_threads=999)
