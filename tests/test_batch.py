"""Continuous batching: several sequences' tokens in one forward pass (`forward(...,
seqs=...)`, `Model._eval_seqs`), each sequence in its own slot of the KV cache. Every
sequence's logits equal the same sequence run alone, bit for bit, whatever the other
sequences in the batch and however its prompt is cut (prefills together, a decode token
next to another sequence's prompt chunk, batched decode steps in any order), on files of
every attention kind: grouped-query with qk-norm (qwen3moe), sliding window past the
ring (gemma3), latent attention (deepseek2), sinks and sliding window (gpt-oss, F32 and
MXFP4 experts), and the built-in quantized model (Q4_K_M), whose batched greedy tokens equal llama.cpp's continuations."""

from dataclasses import replace

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from helpers_models import Shape, write_random_model

import meldlite
from meldlite.data import default_model_path
from meldlite.errors import OptionError
from meldlite.model import KVCache, forward

N_CTX = 128
N_SEQ = 4
N_DECODE = 8
SMALL_MOE = Shape(n_expert=16, n_expert_used=4, n_ff_exp=128, n_ctx=N_CTX)
FILES = {  # arch: (write_random_model arguments, prompt lengths of the four sequences)
    "qwen3moe": (dict(arch="qwen3moe", seed=1), (13, 7, 21, 4)),
    # window 32, a ring of 63 rows: the third prompt and the decode steps pass it
    "gemma3": (dict(arch="gemma3", dtype=np.float16, seed=3), (40, 25, 70, 9)),
    "deepseek2": (
        dict(arch="deepseek2", shape=replace(SMALL_MOE, n_layer=3), seed=2),
        (13, 7, 21, 4),
    ),
    "gpt-oss": (dict(arch="gpt-oss", shape=SMALL_MOE, seed=4), (13, 7, 21, 4)),
    "gpt-oss-mxfp4": (  # the published files' expert type: integer dot products
        dict(arch="gpt-oss", shape=SMALL_MOE, seed=4, expert_type=GGMLQuantizationType.MXFP4),
        (13, 7, 21, 4),
    ),
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch")
    out = {name: write_random_model(d / f"{name}.gguf", **kw) for name, (kw, _) in FILES.items()}
    out["builtin"] = default_model_path()
    return out


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 4000, n).tolist() for n in lengths]


def alone(m, prompt, n_decode):
    """Sequence 0 run by itself (the single-sequence path): the logits (n_decode + 1, V)
    after the prompt and after each greedy token, and the greedy tokens."""
    m.cache.reset()
    rows = [m._eval(prompt, all_logits=False)[-1]]
    tokens = []
    for _ in range(n_decode):
        tokens.append(int(np.argmax(rows[-1])))
        rows.append(m._eval([tokens[-1]], all_logits=False)[-1])
    return np.array(rows), tokens


def batched(m, prompts, n_decode):
    """The four prompts through shared forward passes: sequences 0 and 1 prefill
    together; then 0's first decode token, 2's first prompt half and 1's token; then 2's
    rest, all of 3 and 0's token (1 waits); then decode steps of every sequence in a
    shuffled order. Returns per sequence its logits (n_decode + 1, V) and greedy tokens."""
    for j in range(N_SEQ):
        m.cache.seq(j).reset()
    rows = [[] for _ in prompts]
    toks = [[] for _ in prompts]

    def step(parts):
        ids = [t for _, seg, _ in parts for t in seg]
        logits = m._eval_seqs(ids, [(s, len(seg)) for s, seg, _ in parts])  # (S, V)
        assert logits.shape == (len(parts), m.cfg.n_vocab)
        for (s, _, ends), row in zip(parts, logits):
            if ends:  # the segment ends the prompt or is a decode token
                rows[s].append(row)

    def next_token(s):
        if len(toks[s]) < n_decode and len(rows[s]) > len(toks[s]):
            toks[s].append(int(np.argmax(rows[s][-1])))
            return [toks[s][-1]]
        return None

    half = len(prompts[2]) // 2
    step([(0, prompts[0], True), (1, prompts[1], True)])
    step([(0, next_token(0), True), (2, prompts[2][:half], False), (1, next_token(1), True)])
    step([(2, prompts[2][half:], True), (3, prompts[3], True), (0, next_token(0), True)])
    order = np.random.default_rng(5).permutation(N_SEQ)
    while any(len(t) < n_decode for t in toks):
        parts = [(int(s), next_token(s), True) for s in order]
        step([p for p in parts if p[1] is not None])
        order = np.roll(order, 1)
    return [np.array(r) for r in rows], toks


@pytest.mark.parametrize("name", [*FILES, "builtin"])
def test_each_sequence_equals_its_run_alone(paths, name):
    lengths = FILES[name][1] if name in FILES else (13, 7, 21, 4)
    ps = prompts(lengths)
    m = meldlite.load(paths[name], n_ctx=N_CTX, n_parallel=N_SEQ, n_threads=2)
    try:
        want = [alone(m, p, N_DECODE) for p in ps]
        got_rows, got_toks = batched(m, ps, N_DECODE)
        for j, (rows, toks) in enumerate(want):
            assert got_toks[j] == toks, f"sequence {j}"
            assert np.array_equal(got_rows[j], rows), f"sequence {j}: logits differ"
            assert m.cache.seq(j).n_past == len(ps[j]) + N_DECODE
    finally:
        m.close()
    if name == "builtin":  # the tokens, alone or batched, are llama.cpp's continuations
        for j, p in enumerate(ps):
            assert llamacpp_greedy(paths[name], p, N_DECODE) == got_toks[j], f"sequence {j}"


def llamacpp_greedy(path, ids, n):
    """llama.cpp's greedy continuation (n ids) of `ids`."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=N_CTX, n_threads=2, verbose=False, logits_all=True)
    try:
        out = []
        llm.eval(ids)
        for _ in range(n):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([out[-1]])
        return out
    finally:
        llm.close()


@pytest.mark.parametrize("where", ["budget", "peers"])
def test_a_budgeted_store_and_peers_batch_like_alone(paths, where):
    """Batched steps (several tokens, one per sequence) through the memory-budgeted
    expert cache, and through two local peers in exact mode, give the all-resident
    single-sequence logits."""
    from meldlite.api import Model
    from meldlite.options import Peers, Runtime, Store
    from meldlite.transports.local_peer import LocalPeer

    ps = prompts(FILES["qwen3moe"][1], seed=2)
    resident = meldlite.load(paths["qwen3moe"], n_ctx=N_CTX, n_threads=2)
    want = [alone(resident, p, 4) for p in ps]
    resident.close()
    runtime = Runtime(n_ctx=N_CTX, n_threads=2, n_parallel=N_SEQ)
    peers = LocalPeer.start(2) if where == "peers" else []
    try:
        if where == "peers":
            opts = Peers([p.endpoint for p in peers], exact=True, timeout=30.0)
            m = Model(paths["qwen3moe"], runtime=runtime, peers=opts)
        else:
            m = Model(paths["qwen3moe"], runtime=runtime, store=Store(mem_budget="40%"))
        try:
            rows, toks = batched(m, ps, 4)
            counts = m.stats()
        finally:
            m.close()
    finally:
        for p in peers:
            p.stop()
    for j, (w_rows, w_toks) in enumerate(want):
        assert toks[j] == w_toks and np.array_equal(rows[j], w_rows), f"sequence {j}"
    assert counts["peers_requests" if where == "peers" else "expert_misses"] > 0


@pytest.fixture(scope="module")
def gemma(paths):
    m = meldlite.load(paths["gemma3"], n_ctx=N_CTX, n_parallel=3, n_threads=2)
    yield m
    m.close()


def test_rewind_and_reset_of_one_sequence_leave_the_others(gemma):
    m = gemma
    p0, p1 = prompts((20, 30), seed=7)
    want0, _ = alone(m, p0, 2)
    want1, _ = alone(m, p1, 0)
    for j in range(3):
        m.cache.seq(j).reset()
    first = m._eval_seqs(p0 + p1, [(0, len(p0)), (1, len(p1))])  # (2, V)
    assert np.array_equal(first[0], want0[0]) and np.array_equal(first[1], want1[0])
    s0, s1 = m.cache.seq(0), m.cache.seq(1)
    s0.tokens, s1.tokens = list(p0), list(p1)
    assert m.cache.tokens is s0.tokens and m.cache.n_past == len(p0)
    # sequence 1 forgets its last 12 positions and runs them again; sequence 0 decodes
    assert s1.rewind(len(p1) - 12) and s1.tokens == p1[:-12] and s1.n_past == len(p1) - 12
    assert s0.n_past == len(p0) and s0.tokens == p0
    tok = int(np.argmax(want0[0]))
    again = m._eval_seqs([*p1[-12:], tok], [(1, 12), (0, 1)])  # (2, V)
    assert np.array_equal(again[0], want1[0]) and np.array_equal(again[1], want0[1])
    # sequences 1 and 2 start over: 0 goes on
    m.cache.seq(2).reset()
    assert s1.rewind(0) and s1.tokens == [] and s0.n_past == len(p0) + 1
    tok = int(np.argmax(want0[1]))
    assert np.array_equal(m._eval_seqs([tok], [(0, 1)])[0], want0[2])


def test_all_logits_of_segments_are_each_sequences_rows(gemma):
    """all_logits=True returns (T, V): the rows of each segment are its sequence's
    logits at those positions, as `Model.logits` of the prompt alone gives them."""
    m = gemma
    p0, p1 = prompts((11, 70), seed=9)
    want0, want1 = m.logits(p0), m.logits(p1)  # (11, V), (70, V)
    for j in range(3):
        m.cache.seq(j).reset()
    got = forward(m.cfg, m.weights, m.store, m.cache, p1 + p0, seqs=[(2, 70), (1, 11)])
    assert got.shape == (81, m.cfg.n_vocab)
    assert np.array_equal(got[:70], want1) and np.array_equal(got[70:], want0)
    assert (m.cache.seq(1).n_past, m.cache.seq(2).n_past) == (11, 70)


def test_a_ring_rewinds_per_sequence(gemma):
    """The sliding-window rule applies to each sequence's own history: a long sequence
    can no longer rewind far, a short one next to it can."""
    m = gemma
    for j in range(3):
        m.cache.seq(j).reset()
    long, short = prompts((100, 20), seed=8)
    m._eval_seqs(long + short, [(0, 100), (1, 20)])
    assert not m.cache.seq(0).rewind(100 - 40) and m.cache.seq(0).n_past == 100
    assert m.cache.seq(1).rewind(2) and m.cache.seq(1).n_past == 2
    assert m.cache.seq(0).rewind(100 - 10) and m.cache.rewind(100 - 20)
    assert m.cache.n_past == 80 and m.cache.seq(1).n_past == 2


def test_bad_segments_raise_and_change_nothing(gemma):
    m = gemma
    for j in range(3):
        m.cache.seq(j).reset()
    m._eval_seqs(list(range(3, 13)), [(0, 10)])
    held = [m.cache.seq(j).n_past for j in range(3)]
    bad = [
        ([5, 6], [(0, 1), (0, 1)], "repeated"),
        ([5], [(3, 1)], "not in 0..2"),
        ([5], [(-1, 1)], "not in 0..2"),
        ([5, 6], [(1, 0), (2, 2)], "at least 1"),
        ([5, 6, 7], [(1, 2)], "hold 2 tokens, not 3"),
        (list(range(3, N_CTX - 5)), [(0, N_CTX - 8)], "do not fit"),
        ([5, m.cfg.n_vocab], [(1, 2)], "token ids"),
    ]
    for ids, seqs, match in bad:
        with pytest.raises(OptionError, match=match):
            m._eval_seqs(ids, seqs)
    with pytest.raises(OptionError, match="overflow"):  # forward's own check
        forward(m.cfg, m.weights, m.store, m.cache, np.arange(N_CTX - 8) + 3, seqs=[(0, N_CTX - 8)])
    with pytest.raises(OptionError, match="sequence 3"):
        m.cache.seq(3)
    assert [m.cache.seq(j).n_past for j in range(3)] == held


def test_cache_shapes_and_bytes(paths):
    m = meldlite.load(paths["qwen3moe"], n_ctx=32, n_parallel=3)
    one = KVCache(m.cfg, 32)
    try:
        assert one.n_seq == 1 and one.k[0].shape[0] == 1
        assert m.cache.n_seq == 3 and m.cache.k[0].shape == (3, *one.k[0].shape[1:])
        assert m.cache.nbytes == 3 * one.nbytes
        assert m.stats()["kv_bytes"] == m.info()["kv_bytes"] == m.cache.nbytes
        assert m.stats()["n_parallel"] == 3
    finally:
        m.close()
    with pytest.raises(OptionError, match="n_parallel"):
        meldlite.load(paths["qwen3moe"], n_parallel=0)
