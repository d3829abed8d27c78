"""The continuous-batching scheduler (meldlite.scheduler): more requests than slots all
finish, each with the reply it gets alone (greedy and seeded sampling; Model.complete's
greedy replies equal llama.cpp's, tests/test_chat.py); cancelling frees a slot; a new
request reuses the slot that holds its prefix; a failing step ends only its requests."""

import threading

import pytest

import meldlite
from meldlite.chat import Decoding
from meldlite.errors import ContextError
from meldlite.options import Sampler
from meldlite.scheduler import Scheduler

PROMPTS = [f"Once upon a time{' there was' * i} a" for i in range(7)]
N_CTX = 128


class Listener:
    """The events of one request."""

    def __init__(self, cancel_after=None):
        self.pieces, self.result, self.error = [], None, None
        self.ended, self.cancel_after, self.request = threading.Event(), cancel_after, None

    def __call__(self, kind, data):
        if kind == "piece":
            self.pieces.append(data)
            if self.cancel_after and len(self.pieces) >= self.cancel_after:
                self.request.cancel()
        elif kind == "done":
            self.result = data
            self.ended.set()
        else:
            self.error = data
            self.ended.set()

    @property
    def text(self):
        return "".join(self.pieces)


@pytest.fixture(scope="module")
def alone():
    """Replies of a single-sequence model, one request at a time."""
    m = meldlite.load(n_ctx=N_CTX)
    yield m
    m.close()


@pytest.fixture
def served():
    m = meldlite.load(n_ctx=N_CTX, n_parallel=3)
    s = Scheduler(m)
    yield m, s
    s.close()
    m.close()


def submit(s, m, prompt, max_tokens=16, cancel_after=None, **sampling):
    listen = Listener(cancel_after)
    params = Sampler(**{"temperature": 0.0, **sampling})
    listen.request = s.submit(m.tokenize(prompt), params, max_tokens, (), listen)
    return listen


def test_more_requests_than_slots_get_the_replies_they_get_alone(served, alone):
    m, s = served
    greedy = [submit(s, m, p) for p in PROMPTS]
    sampled = [submit(s, m, p, temperature=0.9, seed=i) for i, p in enumerate(PROMPTS[:4])]
    for listen in greedy + sampled:
        assert listen.ended.wait(120) and listen.error is None
    for p, listen in zip(PROMPTS, greedy):
        assert listen.text == "".join(alone.complete(p, max_tokens=16, temperature=0))
        assert listen.result.usage["completion_tokens"] == 16
        assert listen.result.finish_reason == "length"
    for i, (p, listen) in enumerate(zip(PROMPTS, sampled)):
        want = alone.complete(p, max_tokens=16, sampler=Sampler(temperature=0.9, seed=i))
        assert listen.text == "".join(want)
    assert s.stats() == {"slots": 3, "active": 0, "waiting": 0}
    assert s.steps < 16 * len(greedy + sampled)  # steps were shared


def test_cancelling_frees_the_slot_at_once(served):
    m, s = served
    listen = submit(s, m, PROMPTS[0], max_tokens=100, cancel_after=3)
    other = submit(s, m, PROMPTS[1], max_tokens=40)
    assert other.ended.wait(120)
    assert not listen.ended.is_set() and len(listen.pieces) == 3
    assert s.stats()["active"] == 0


def test_a_follow_up_reuses_the_slot_holding_its_prefix(served):
    m, s = served
    first = [submit(s, m, p, max_tokens=4) for p in PROMPTS[:3]]
    for listen in first:
        assert listen.ended.wait(120)
    follow = PROMPTS[2] + first[2].text + " and then"
    again = submit(s, m, follow, max_tokens=4)
    assert again.ended.wait(120)
    n_prompt = len(m.tokenize(PROMPTS[2]))
    assert again.result.usage["cached_tokens"] >= n_prompt


def test_a_failing_step_ends_its_requests_and_the_next_ones_run(served, alone):
    m, s = served
    real = m._eval_seqs
    calls = {"n": 0}

    def flaky(tokens, seqs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a peer went away")
        return real(tokens, seqs)

    m._eval_seqs = flaky
    try:
        bad = submit(s, m, PROMPTS[0], max_tokens=8)
        assert bad.ended.wait(120) and isinstance(bad.error, RuntimeError)
        good = submit(s, m, PROMPTS[1], max_tokens=8)
        assert good.ended.wait(120) and good.error is None
    finally:
        m._eval_seqs = real
    assert good.text == "".join(alone.complete(PROMPTS[1], max_tokens=8, temperature=0))


def test_long_prompts_and_closing(served):
    m, s = served
    with pytest.raises(ContextError):
        s.submit(list(range(N_CTX + 1)), Sampler(temperature=0.0), 4, (), lambda *a: None)
    waiting = [submit(s, m, p, max_tokens=100) for p in PROMPTS]
    s.close()
    for listen in waiting:
        assert listen.ended.wait(30)
    assert any(listen.error is not None for listen in waiting)


class _Tokens:
    """A tokenizer of three pieces: 0 "a\\n", 1 "\\n", 2 end of generation."""

    def is_eog(self, t):
        return t == 2

    def token_to_piece(self, t):
        return [b"a\n", b"\n"][t]


def test_decoding_sends_held_text_at_the_end_of_generation():
    d = Decoding(_Tokens(), ["\n\n"], 10)
    assert d.push(0, room=10) == "a"  # "\n" may begin the stop string
    assert d.push(2, room=10) == "\n" and d.finish_reason == "stop"
    d = Decoding(_Tokens(), ["\n\n"], 10)
    assert d.push(0, room=10) + d.push(1, room=10) == "a" and d.finish_reason == "stop"
    d = Decoding(_Tokens(), [], 2)
    assert d.push(0, room=10) + d.push(0, room=10) == "a\na\n" and d.finish_reason == "length"
    d = Decoding(_Tokens(), ["\n\n"], 10)
    assert d.push(0, room=0) == "a\n" and d.finish_reason == "length"  # the context is full
