"""meldlite serve's OpenAI-compatible API (meldlite.server) through Starlette's test
client: replies equal Model.chat / Model.complete (whose greedy output tests/test_chat
compares with llama.cpp), streamed and whole, usage and finish reasons, errors."""

import json

import pytest
from starlette.testclient import TestClient

import meldlite
from meldlite.server import create_app

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]


@pytest.fixture(scope="module")
def served():
    m = meldlite.load(n_ctx=256)
    with TestClient(create_app(m, "tiny")) as client:
        yield m, client
    m.close()


def test_health_and_models(served):
    _, c = served
    assert c.get("/health").json() == {"status": "ok", "slots": 1, "active": 0, "waiting": 0}
    data = c.get("/v1/models").json()["data"]
    assert [d["id"] for d in data] == ["tiny"]


def test_chat_completion_equals_model_chat(served):
    m, c = served
    want = m.chat(MESSAGES, max_tokens=12, temperature=0)
    text = "".join(want)
    r = c.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 12,
                                              "temperature": 0})  # fmt: skip
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["prompt_tokens"] == want.usage["prompt_tokens"]


def test_streamed_chat_gives_the_same_text_and_done(served):
    m, c = served
    text = "".join(m.chat(MESSAGES, max_tokens=12, temperature=0))
    req = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True,
           "stream_options": {"include_usage": True}}  # fmt: skip
    with c.stream("POST", "/v1/chat/completions", json=req) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    got = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks if ch["choices"])
    assert got == text
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_completion_with_stop_and_seed(served):
    m, c = served
    full = "".join(m.complete("Once upon a time", max_tokens=20, temperature=0))
    stop = full[8:11]
    r = c.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 20,
                                         "temperature": 0, "stop": stop})  # fmt: skip
    choice = r.json()["choices"][0]
    assert choice["text"] == full[: full.find(stop)] and choice["finish_reason"] == "stop"
    req = {"prompt": "Once", "max_tokens": 8, "temperature": 0.9, "seed": 7}
    a, b = (c.post("/v1/completions", json=req).json()["choices"][0]["text"] for _ in "ab")
    assert a == b


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": []}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "many"}),
        ("/v1/chat/completions", {"messages": MESSAGES, "temperature": "hot"}),
        ("/v1/completions", {"prompt": 5}),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
    ],
)
def test_bad_requests_are_400_with_a_message(served, path, body):
    _, c = served
    r = c.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_a_body_that_is_not_json_is_400(served):
    _, c = served
    r = c.post("/v1/completions", content=b"{not json")
    assert r.status_code == 400
