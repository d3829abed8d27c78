"""Checks every MoE architecture's files go through (issue 13, item 7): the same logits
bits under memory budgets and with peers in exact mode, info and profile commands."""

import numpy as np
from click.testing import CliRunner

import meldlite
from meldlite.api import Model
from meldlite.cli import main
from meldlite.options import Peers, Runtime

PROMPT = [1, 450, 2217, 310, 263, 931, 1892, 727, 471, 263, 2217, 1024, 77]


def steps(m, tokens=PROMPT, n_decode=3):
    """Prefill logits, then greedy decode steps' logits, from an empty cache."""
    m.cache.reset()
    out = [m._eval(tokens, all_logits=True)]
    for _ in range(n_decode):
        out.append(m._eval([int(np.argmax(out[-1][-1]))], all_logits=True))
    return out


def budget_steps(path, budget):
    """(steps' logits, expert misses) of `path` under a memory budget."""
    m = meldlite.load(path, n_ctx=64, n_threads=1, mem_budget=budget)
    try:
        return steps(m), m.stats()["expert_misses"]
    finally:
        m.close()


def peer_steps(packed):
    """(steps' logits, peer requests) of a per-expert file served by two local peers."""
    from meldlite.transports.local_peer import LocalPeer

    peers = LocalPeer.start(2)
    try:
        opts = Peers([p.endpoint for p in peers], exact=True, timeout=30.0, connect_timeout=120.0)
        m = Model(packed, runtime=Runtime(n_ctx=64, n_threads=1), peers=opts)
        try:
            return steps(m), m.store.stats()["peers_requests"]
        finally:
            m.close()
    finally:
        for p in peers:
            p.stop()


def info_and_profile(path, tmp_path):
    """(`meldlite info` output, whether `meldlite profile` wrote its file)."""
    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 0, r.output
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl named Lily.\n" * 4)
    out = tmp_path / "prof.json"
    p = CliRunner().invoke(main, ["profile", str(path), str(text), "-o", str(out)])
    assert p.exit_code == 0, p.output
    return r.output, out.exists()
