"""Model.chat (meldlite.chat): replies equal llama.cpp's greedy continuation of the
same prompt ids, multi-turn chat reuses the KV cache and gives the fresh run's
reply, stop strings, finish reasons, usage and errors."""

import numpy as np
import pytest
from helpers_serve import llamacpp_greedy

import meldlite
from meldlite.chat import _split_stop
from meldlite.errors import OptionError
from meldlite.tokenizer.chat import prompt_ids

TURN1 = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def model():
    m = meldlite.load(n_ctx=256)
    yield m
    m.close()


def test_greedy_reply_equals_llama_cpp(model):
    r = model.chat(TURN1, max_tokens=16, temperature=0)
    text = "".join(r)
    ids = prompt_ids(model.tokenizer, model.chat_template.render(TURN1))
    ref = llamacpp_greedy(ids, 16)
    assert model.detokenize(ref) == text == r.text
    assert r.finish_reason == "length"
    assert r.usage == {
        "prompt_tokens": len(ids),
        "completion_tokens": 16,
        "total_tokens": len(ids) + 16,
        "cached_tokens": 0,
    }


def test_second_turn_reuses_the_cache_and_equals_a_fresh_run(model):
    first = model.chat(TURN1, max_tokens=12, temperature=0)
    turn2 = [*TURN1, {"role": "assistant", "content": "".join(first)}]
    turn2.append({"role": "user", "content": "What happened next?"})
    again = model.chat(turn2, max_tokens=12, temperature=0)
    text = "".join(again)
    assert again.usage["cached_tokens"] > first.usage["prompt_tokens"] // 2
    fresh = meldlite.load(n_ctx=256)
    try:
        want = "".join(fresh.chat(turn2, max_tokens=12, temperature=0))
    finally:
        fresh.close()
    assert text == want


def test_stop_strings_end_the_reply_and_are_not_sent(model):
    full = "".join(model.chat(TURN1, max_tokens=24, temperature=0))
    stop = full[10:13]
    r = model.chat(TURN1, max_tokens=24, temperature=0, stop=[stop])
    pieces = list(r)
    assert "".join(pieces) == full[: full.find(stop)] and r.finish_reason == "stop"


def test_split_stop_holds_back_a_possible_start():
    assert _split_stop("hello wor", ["world"]) == ("wor", "hello ", False)
    assert _split_stop("hello world!", ["world"]) == ("", "hello ", True)
    assert _split_stop("abc", ["x"]) == ("", "abc", False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"content": "x"}]), "role"),
        (dict(messages=TURN1, max_tokens=-1), "max_tokens"),
        (dict(messages=TURN1, stop=[""]), "stop"),
    ],
)
def test_bad_chat_arguments_are_option_errors(model, kwargs, match):
    with pytest.raises(OptionError, match=match):
        model.chat(**kwargs)


def test_sliding_window_cache_rewinds_only_while_the_ring_holds_the_window(tmp_path):
    from helpers_models import write_random_model

    path = write_random_model(tmp_path / "gemma3.gguf", "gemma3")  # window 32
    m = meldlite.load(path, n_ctx=256)
    try:
        ids = [int(t) for t in np.random.default_rng(0).integers(3, 4000, 100)]
        m.cache.reset()
        m._eval(ids, all_logits=False)
        m.cache.tokens = list(ids)
        assert not m.cache.rewind(100 - 40) and m.cache.n_past == 100  # ring lost them
        assert m.cache.rewind(100 - 10) and m.cache.tokens == ids[:90]
        got = m._eval(ids[90:], all_logits=True)  # (10, V)
        m.cache.reset()
        want = m._eval(ids, all_logits=True)[90:]  # (10, V)
        np.testing.assert_array_equal(got, want)
    finally:
        m.close()


def test_cli_chat_streams_replies_resets_and_quits(model):
    from click.testing import CliRunner

    from meldlite.cli import main

    want = "".join(model.chat(TURN1, max_tokens=10, temperature=0))
    hi = "".join(model.chat([{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0))
    inp = f"{TURN1[0]['content']}\n/reset\nHi\n/exit\nnot read\n"
    res = CliRunner().invoke(main, ["chat", "--temp", "0", "-n", "10"], input=inp)
    assert res.exit_code == 0, res.output
    assert want in res.output and hi in res.output  # after /reset: a fresh conversation


def test_cli_chat_bad_template_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from meldlite.cli import main

    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    res = CliRunner().invoke(main, ["chat", "--chat-template", str(bad)], input="hi\n")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "chat template does not parse" in res.output
