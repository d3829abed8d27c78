"""Runs shared by the per-architecture tests: the logits of a prompt and a few greedy
steps, all-resident, under a memory budget or with expert peers (whose bits must equal
the all-resident ones)."""

import numpy as np

import meldlite
from meldlite.api import Model
from meldlite.options import Peers, Runtime


def steps(m, tokens, n_decode=3):
    """Prefill logits, then greedy decode steps' logits, from an empty cache."""
    m.cache.reset()
    out = [m._eval(tokens, all_logits=True)]
    for _ in range(n_decode):
        out.append(m._eval([int(np.argmax(out[-1][-1]))], all_logits=True))
    return out


def budget_steps(path, tokens, budget):
    """(steps, expert misses) of `path` loaded with mem_budget=budget."""
    m = meldlite.load(path, n_ctx=64, n_threads=1, mem_budget=budget)
    try:
        return steps(m, tokens), m.stats()["expert_misses"]
    finally:
        m.close()


def peer_steps(path, tokens, model=None, n_peers=2):
    """(steps, peer requests) of `path` with n_peers local peers in exact mode; `model`:
    the peers' own copy of the file (None: they receive the experts)."""
    from meldlite.transports.local_peer import LocalPeer

    peers = LocalPeer.start(n_peers, model=model)
    try:
        opts = Peers([p.endpoint for p in peers], exact=True, timeout=30.0, connect_timeout=120.0)
        m = Model(path, runtime=Runtime(n_ctx=64, n_threads=1), peers=opts)
        try:
            return steps(m, tokens), m.store.stats()["peers_requests"]
        finally:
            m.close()
    finally:
        for p in peers:
            p.stop()


PROMPT = [1, 450, 2217, 310, 263, 931, 1892, 727, 471, 263, 2217, 1024, 77]


def quantized_pair(f16, out_dir, bpw=5.0):
    """(uniform Q4_K file, mixed file of `bpw` from a short profile) of `f16`, by
    `meldlite quantize`'s library calls."""
    import meldlite
    from meldlite.compress.quantize import quantize_model
    from meldlite.experts.profile import build_profile

    uniform = quantize_model(f16, out_dir / "q4k.gguf", qtype="Q4_K").path
    m = meldlite.load(f16, n_ctx=64)
    prof = build_profile(m, "Once upon a time there was a little girl. " * 8)
    m.close()
    return uniform, quantize_model(f16, out_dir / "mixed.gguf", bpw=bpw, profile=prof).path


def check_info_and_profile(path, out_dir, arch):
    """`meldlite info` names the architecture; `meldlite profile` writes its file."""
    from click.testing import CliRunner

    from meldlite.cli import main

    r = CliRunner().invoke(main, ["info", str(path)])
    assert r.exit_code == 0, r.output
    assert arch in r.output
    text = out_dir / "t.txt"
    text.write_text("Once upon a time there was a little girl named Lily.\n" * 4)
    out = out_dir / "prof.json"
    r = CliRunner().invoke(main, ["profile", str(path), str(text), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists()


def resident_steps(path, tokens):
    """`steps` of `path` loaded all-resident (the bits budgets and peers must give)."""
    m = meldlite.load(path, n_ctx=64, n_threads=1)
    try:
        return steps(m, tokens)
    finally:
        m.close()


def stacked_and_packed(d, arch, shape, seed=5):
    """{"arch", "f16": a random F16 file of `arch` in directory d, "packed": its
    per-expert layout}."""
    from helpers_models import write_random_model

    from meldlite.formats import pack

    f16 = write_random_model(d / "f16.gguf", arch, shape, np.float16, seed=seed)
    pack(f16, d / "packed.gguf", "SRC")
    return {"arch": arch, "f16": f16, "packed": d / "packed.gguf"}
