"""Options declared once (`meldlite.options`): `load`'s keywords, the groups'
validation, and the command-line options derived from them."""

import inspect

import pytest

import meldlite
from meldlite.errors import OptionError
from meldlite.options import POLICIES, Peers, Runtime, Sampler, Serve, Store, from_keywords

# `meldlite.load`'s keyword API, names and defaults, as it has been since the peers
# were added: a change here is a change of the public API.
LOAD_KEYWORDS = {
    "n_ctx": None,
    "n_threads": None,
    "n_batch": 512,
    "n_parallel": 1,
    "llama_numerics": True,
    "mem_budget": None,
    "mem_limit": None,
    "cache_policy": None,
    "prefetch": True,
    "min_expert_weight": None,
    "io_throttle": None,
    "cold": False,
    "profile": None,
    "expert_io": None,
    "peers": None,
    "placement": None,
    "wire": "f32",
    "exact": False,
    "fuse": 0.0,
    "link": None,
    "keys": None,
    "insecure": False,
    "peer_timeout": 10.0,
}


def test_load_keywords_and_defaults_are_pinned():
    params = inspect.signature(meldlite.load).parameters
    assert next(iter(params)) == "path" and params["path"].default is None
    got = {k: p.default for k, p in params.items() if k != "path"}
    assert got == LOAD_KEYWORDS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for k, p in params.items() if k != "path")
    with pytest.raises(TypeError, match="n_thread"):
        meldlite.load(n_thread=1)


def test_keywords_fill_the_groups():
    g = from_keywords({"n_ctx": 64, "mem_budget": "25%", "peers": "tcp://a:1,tcp://b:2"})
    assert g["runtime"] == Runtime(n_ctx=64)
    assert g["store"] == Store(mem_budget="25%")
    assert g["peers"].endpoints == ["tcp://a:1", "tcp://b:2"]
    assert g["peers"].timeout == 10.0
    assert from_keywords({"peer_timeout": 3.0})["peers"] is None  # peer options need peers


def test_sampler_defaults_are_declared_once():
    s = Sampler()
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty) == (
        0.8,
        40,
        0.95,
        0.05,
        1.0,
    )
    sig = inspect.signature(meldlite.api.Model.generate).parameters
    for name in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed"):
        assert sig[name].default == getattr(s, name)


@pytest.mark.parametrize(
    "group, options, match",
    [
        (Runtime, {"n_ctx": 0}, "n_ctx"),
        (Runtime, {"n_batch": 0}, "n_batch"),
        (Runtime, {"n_threads": 0}, "n_threads"),
        (Runtime, {"min_expert_weight": 1.0}, "min_expert_weight"),
        (Runtime, {"min_expert_weight": float("nan")}, "min_expert_weight"),
        (Store, {"mem_budget": 0}, "mem_budget"),
        (Store, {"mem_budget": "50%", "prefetch": 1}, "prefetch"),
        (Store, {"expert_io": "mmap"}, "mem_budget"),
        (Peers, {"endpoints": ""}, "peers"),
        (Peers, {"endpoints": ["tcp://a:1", "tcp://a:1"]}, "repeat"),
        (Peers, {"endpoints": "tcp://a:1", "wire": "f8"}, "wire"),
        (Peers, {"endpoints": "tcp://a:1", "timeout": 0}, "timeout"),
        (Sampler, {"top_p": 0}, "top_p"),
        (Sampler, {"top_k": 1.5}, "top_k"),
        (Serve, {"mem_budget": 0}, "mem_budget"),
        (Serve, {"heartbeat": 0}, "heartbeat"),
    ],
)
def test_groups_validate_once(group, options, match):
    with pytest.raises(OptionError, match=match):
        group(**options)


def test_min_expert_weight_zero_is_off():
    assert Runtime(min_expert_weight=0).min_expert_weight is None
    assert Runtime(min_expert_weight=0.25).min_expert_weight == 0.25


def test_peer_server_budget_is_parsed_as_load_parses_it(tmp_path):
    from meldlite.data import default_model_path
    from meldlite.transports.peer import PeerServer

    with pytest.raises(OptionError, match="mem_budget must be positive"):
        PeerServer(listen="tcp://127.0.0.1:0", mem_budget=0)
    with pytest.raises(OptionError, match="no model"):
        PeerServer(listen="tcp://127.0.0.1:0", mem_budget="25%")
    model = default_model_path()
    server = PeerServer(model, "tcp://127.0.0.1:0", mem_budget="25%")
    try:
        m = meldlite.load(model, n_ctx=16, mem_budget="25%")
        assert server.budget == m.stats()["budget_bytes"]
        m.close()
    finally:
        server.close()
    server = PeerServer(listen="tcp://127.0.0.1:0", mem_budget="64MB")
    try:
        assert server.budget == 64_000_000
    finally:
        server.close()


def test_cli_options_come_from_the_groups():
    import click

    from meldlite.cli import main

    def opts(command):
        return {p.name: p for p in main.commands[command].params if isinstance(p, click.Option)}

    run, peer = opts("run"), opts("peer")
    for name in ("n_threads", "mem_budget"):
        assert run[name].opts == peer[name].opts and run[name].help == peer[name].help
    assert run["n_threads"].opts == ["-t", "--threads"]
    for command in ("perplexity", "profile"):
        assert opts(command)["n_threads"].help == run["n_threads"].help
        assert opts(command)["n_ctx"].opts == ["-c", "--ctx-size"]
    assert run["temperature"].default == Sampler().temperature
    assert tuple(run["cache_policy"].type.choices) == POLICIES


def test_peer_server_on_a_busy_port_is_an_option_error():
    from meldlite.transports.peer import PeerServer

    first = PeerServer(listen="tcp://127.0.0.1:0")
    try:
        with pytest.raises(OptionError, match="cannot listen on"):
            PeerServer(listen=first.endpoint)
    finally:
        first.close()
