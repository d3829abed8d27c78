"""A live `meldlite serve` (a subprocess on a random loopback port) driven by the official
`openai` client: chat and completions, streamed and whole, equal the single-sequence
engine's greedy replies, whose every token is llama.cpp's greedy choice or a near-tie; concurrent streams (more than the slots) all finish with their own replies;
a client that leaves mid-stream frees its slot at once; bad requests get 4xx answers
in OpenAI's error shape; a soak of a few hundred requests leaves memory flat."""

import concurrent.futures
import json
import time

import httpx
import numpy as np
import openai
import pytest
from helpers_serve import LiveServer, greedy_reply_ids, llamacpp_gaps

import meldlite
from meldlite.tokenizer.chat import prompt_ids

KEY = "sk-test-meldlite"
NAME = "meldlite-builtin"
SLOTS = 4
N_CTX = 256
PROMPTS = [
    "Tell me a story about a cat.",
    "Once there was a little dog. What did it do?",
    "Why is the sky blue?",
    "Lily had a red ball.",
    "Write about a big tree.",
    "Tim and Sam went to the park.",
    "What is your favourite toy?",
    "The sun was hot and the bird was sad.",
]
COMPLETE = "Once upon a time"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["--parallel", str(SLOTS), "-c", str(N_CTX), "--api-key", KEY]
    s = LiveServer(args, log)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    yield c
    c.close()


@pytest.fixture(scope="module")
def reference():
    """Per prompt: (prompt ids, the single-sequence engine's greedy reply ids of 24 tokens
    and their text)."""
    m = meldlite.load(n_ctx=N_CTX)
    try:
        out = {}
        for p in PROMPTS:
            msgs = [{"role": "user", "content": p}]
            out[p] = prompt_ids(m.tokenizer, m.chat_template.render(msgs))
        out[COMPLETE] = m.tokenize(COMPLETE)
        for p, ids in out.items():
            reply = greedy_reply_ids(m, ids, 24)
            out[p] = (ids, reply, m.detokenize(reply))
        return out
    finally:
        m.close()


def test_the_reference_replies_are_llama_cpps_greedy_choices(reference):
    """Every reference token is llama.cpp's argmax too, or within 0.1 of it (a near-tie
    that rounding may decide either way: the engines' logits differ by up to ~0.05)."""
    gaps = np.concatenate([llamacpp_gaps(ids, reply) for ids, reply, _ in reference.values()])
    assert gaps.max() < 0.1
    assert np.mean(gaps == 0) > 0.9


def check(text, reference):
    assert text == reference[2]


def chat(client, prompt, **kw):
    msgs = [{"role": "user", "content": prompt}]
    return client.chat.completions.create(model=NAME, messages=msgs, **{"temperature": 0, **kw})


def streamed_text(stream):
    """(text, finish_reason, usage) of a streamed chat completion."""
    text, finish, usage = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, usage


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    h = server.health()
    assert h["status"] == "ok" and h["slots"] == SLOTS


def test_chat_and_completion_equal_llama_cpp_whole_and_streamed(client, reference):
    p = PROMPTS[0]
    r = chat(client, p, max_tokens=24)
    check(r.choices[0].message.content, reference[p])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 24
    s = chat(client, p, max_tokens=24, stream=True, stream_options={"include_usage": True})
    text, finish, usage = streamed_text(s)
    check(text, reference[p])
    assert (finish, usage.completion_tokens) == ("length", 24)
    c = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=24,
                                  temperature=0)  # fmt: skip
    check(c.choices[0].text, reference[COMPLETE])
    pieces = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=24,
                                       temperature=0, stream=True)  # fmt: skip
    text = "".join(ch.choices[0].text for ch in pieces if ch.choices)
    check(text, reference[COMPLETE])


def test_a_follow_up_turn_reuses_the_cached_prefix(client):
    first = chat(client, PROMPTS[3], max_tokens=8)
    msgs = [
        {"role": "user", "content": PROMPTS[3]},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    again = client.chat.completions.create(model=NAME, messages=msgs, temperature=0, max_tokens=4)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1


def test_more_concurrent_streams_than_slots_all_finish_with_their_own_replies(
    server, client, reference
):
    def one(p):
        s = chat(client, p, max_tokens=24, stream=True, stream_options={"include_usage": True})
        return streamed_text(s)

    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = dict(zip(PROMPTS, pool.map(one, PROMPTS)))
    for p in PROMPTS:
        text, finish, usage = got[p]
        check(text, reference[p])
        assert finish == "length" and usage.completion_tokens == 24
    assert server.health()["active"] == 0


def test_a_client_that_leaves_mid_stream_frees_its_slot(server, client, reference):
    body = {"model": NAME, "messages": [{"role": "user", "content": PROMPTS[1]}],
            "max_tokens": 200, "temperature": 0, "stream": True}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers=headers, timeout=60) as r:  # fmt: skip
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
    assert got[0].startswith("data: ")
    deadline = time.monotonic() + 10
    while server.health()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["active"] == 0
    again = chat(client, PROMPTS[0], max_tokens=24)
    check(again.choices[0].message.content, reference[PROMPTS[0]])


BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "colour": 1}, 400, "colour"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "model": "gpt-9"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "temperature": -1}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "top_p": 2}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "seed": "x"}, 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x " * 2000}, 400, "prompt"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x " * 2000}]},
        400,
        "messages",
    ),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", [1, 2], 400, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD)
def test_bad_requests_get_4xx_in_openais_error_shape(server, path, body, status, param):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=data, headers=headers, timeout=60)
    err = r.json()["error"]
    assert r.status_code == status and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param


def test_keys_sizes_methods_and_paths(server):
    url = server.url
    r = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    headers = {"Authorization": f"Bearer {KEY}"}
    big = b'{"prompt": "' + b"a" * (9 << 20) + b'"}'
    r = httpx.post(url + "/v1/completions", content=big, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["message"]
    r = httpx.get(url + "/v1/chat/completions", headers=headers, timeout=30)
    assert r.status_code == 405 and r.json()["error"]["message"]
    assert httpx.get(url + "/v2/nothing", timeout=30).status_code == 404
    assert server.health()["status"] == "ok"


def test_a_soak_of_300_requests_leaves_resident_memory_flat(server, client):
    def request(i):
        p = PROMPTS[i % len(PROMPTS)]
        if i % 3 == 0:
            return streamed_text(chat(client, p, max_tokens=4, stream=True))[0]
        if i % 3 == 1:
            return chat(client, p, max_tokens=4, seed=i, temperature=0.8).choices[0].message.content
        return client.completions.create(model=NAME, prompt=p, max_tokens=4).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(isinstance(t, str) for t in pool.map(request, range(40)))
        before = server.rss_bytes()
        assert all(isinstance(t, str) for t in pool.map(request, range(40, 340)))
    after = server.rss_bytes()
    assert after < before * 1.05, (before, after)
    assert server.health()["active"] == 0
