"""The memory-budgeted expert store (meldlite.experts): budgets, policies,
prefetch, bit-identity with the all-resident run, memory and page-cache
promises, measurement aids, errors and the CLI options."""

import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers_models import Shape, write_random_model

import meldlite
from meldlite import kernels
from meldlite.errors import BudgetError, OptionError
from meldlite.experts.cache import READY
from meldlite.experts.io import Throttle, drop_file_cache, page_cache_fraction
from meldlite.formats import pack, read_gguf
from meldlite.model import skip_light_experts
from meldlite.units import parse_budget, parse_rate, parse_size

SMALL = Shape(
    n_vocab=4096,
    n_embd=128,
    n_layer=3,
    n_head=2,
    n_head_kv=1,
    head_dim=64,
    n_ff=128,
    n_expert=8,
    n_expert_used=2,
    n_ff_exp=64,
    n_ctx=128,
)
TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside "
    "in the park with her friends and her dog."
)
POLICIES = ("lru", "lfu", "forecast")


def fsynced(path):
    """Flush a freshly written file so its page-cache pages are clean (droppable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def write_small(d):
    """{"stacked": path, "packed": path} of a small random qwen3moe (F16) in directory d,
    fsynced (their pages clean)."""
    stacked = write_random_model(d / "small.gguf", "qwen3moe", shape=SMALL, dtype=np.float16)
    packed = d / "small-packed.gguf"
    pack(stacked, packed, "SRC")
    return {"stacked": fsynced(stacked), "packed": fsynced(packed)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_small(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def reference(models):
    """Resident logits: the prompt at once, then token by token."""
    m = meldlite.load(models["packed"], n_ctx=64)
    ids = m.tokenize(TEXT)[:24]
    batch = m.logits(ids)
    m.cache.reset()
    single = np.concatenate([m._eval([t], all_logits=True) for t in ids])
    m.close()
    return ids, batch, single


def run_both(m, ids):
    batch = m.logits(ids)
    m.cache.reset()
    single = np.concatenate([m._eval([t], all_logits=True) for t in ids])
    return batch, single


# -- parsing and option errors ----------------------------------------------------


def test_parse_sizes_rates_and_percentages():
    assert parse_size("64MB") == 64_000_000
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("4096") == 4096 and parse_size(4096) == 4096
    assert parse_budget("25%", 1000) == 250
    assert parse_budget("100%", 1000) == 1000
    assert parse_budget(" 12.5 % ", 800) == 100
    assert parse_budget(None, 1000) is None
    assert parse_rate("200MB/s") == 200e6
    assert parse_rate("1.5GiB/s") == 1.5 * 2**30
    assert parse_rate(None) is None


@pytest.mark.parametrize(
    "bad",
    ["lots", "-5MB", "0", "0%", "150%", "-1%", "12 parsecs", "", "nan", "inf", True, -3, [64]],
)
def test_bad_budgets_are_option_errors(bad):
    with pytest.raises(OptionError, match="mem_budget"):
        parse_budget(bad, 10**6)


@pytest.mark.parametrize("bad", ["fast", "200MB", "-5MB/s", "0/s", "MB/s"])
def test_bad_rates_are_option_errors(bad):
    with pytest.raises(OptionError, match="io_throttle"):
        parse_rate(bad)


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"mem_budget": "lots"}, "mem_budget"),
        ({"mem_budget": -1}, "mem_budget"),
        ({"mem_budget": "101%"}, "mem_budget"),
        ({"mem_budget": "50%", "cache_policy": "mru"}, "cache_policy"),
        ({"mem_budget": "50%", "expert_io": "odirect"}, "expert_io"),
        ({"mem_budget": "50%", "io_throttle": "fast"}, "io_throttle"),
        ({"mem_budget": "50%", "prefetch": "yes"}, "prefetch"),
        ({"min_expert_weight": 1.5}, "min_expert_weight"),
        ({"min_expert_weight": "x"}, "min_expert_weight"),
        ({"cache_policy": "lru"}, "mem_budget"),
        ({"io_throttle": "200MB/s"}, "mem_budget"),
    ],
)
def test_load_rejects_bad_options(models, opts, match):
    with pytest.raises(OptionError, match=match):
        meldlite.load(models["packed"], n_ctx=32, **opts)


def test_too_small_budget_says_the_minimum(models):
    with pytest.raises(BudgetError, match=r"at least .*\(\d+ bytes") as err:
        meldlite.load(models["packed"], n_ctx=32, mem_budget=1000)
    minimum = int(str(err.value).split("(")[1].split(" bytes")[0])
    m = meldlite.load(models["packed"], n_ctx=32, mem_budget=minimum)  # exactly enough runs
    assert m.stats()["min_budget_bytes"] == minimum
    m.close()
    with pytest.raises(BudgetError):
        meldlite.load(models["packed"], n_ctx=32, mem_budget=minimum - 1)


# -- bit-identical results --------------------------------------------------------


def minimum_budget(path):
    m = meldlite.load(path, n_ctx=32, mem_budget="100%", prefetch=False)
    b = m.stats()["min_budget_bytes"]
    m.close()
    return b


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("policy", POLICIES)
def test_logits_bit_identical_for_every_budget(models, reference, policy, prefetch):
    ids, ref_batch, ref_single = reference
    for budget in (minimum_budget(models["packed"]), "12.5%", "25%", "50%", "100%"):
        m = meldlite.load(
            models["packed"], n_ctx=64, mem_budget=budget, cache_policy=policy, prefetch=prefetch
        )
        batch, single = run_both(m, ids)
        stats = m.stats()
        m.close()
        assert np.array_equal(batch, ref_batch), (budget, policy, prefetch)
        assert np.array_equal(single, ref_single), (budget, policy, prefetch)
        assert stats["expert_misses"] > 0 and stats["bytes_read"] > 0


@pytest.mark.parametrize("layout", ["packed", "stacked"])
@pytest.mark.parametrize("mechanism", ["pread", "mmap"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_other_mechanisms_bit_identical(models, reference, layout, mechanism, prefetch):
    ids, ref_batch, ref_single = reference
    for budget in ("25%", "100%"):
        m = meldlite.load(
            models[layout], n_ctx=64, mem_budget=budget, expert_io=mechanism, prefetch=prefetch
        )
        batch, single = run_both(m, ids)
        assert m.stats()["expert_io"] == mechanism
        m.close()
        assert np.array_equal(batch, ref_batch) and np.array_equal(single, ref_single)


def test_direct_reads_whole_blocks_into_aligned_slots(models):
    m = meldlite.load(models["packed"], n_ctx=32, mem_budget="25%")
    st = m.store
    assert st.stats()["expert_io"] == "direct"
    assert st.reader.file.direct  # this file system allows it
    for reads in st.plan.reads:
        for off, nb, at, need in reads:
            assert off % 4096 == 0 and nb % 4096 == 0 and at % 4096 == 0 and need <= nb
    assert all(p.slot_bytes % 4096 == 0 for p in st.pools)
    m.close()


def test_stacked_layout_reads_three_ranges_per_expert(models, reference):
    ids, ref_batch, _ = reference
    m = meldlite.load(models["stacked"], n_ctx=64, mem_budget="25%", prefetch=False)
    assert np.array_equal(m.logits(ids), ref_batch)
    assert all(len(r) == 3 for r in m.store.plan.reads)
    m.close()
    p = meldlite.load(models["packed"], n_ctx=64, mem_budget="25%", prefetch=False)
    assert all(len(r) == 1 for r in p.store.plan.reads)  # one read per expert
    p.close()


def test_float_activations_flow_through(models, reference):
    ids = reference[0]
    ref = meldlite.load(models["packed"], n_ctx=64, llama_numerics=False)
    want = ref.logits(ids)
    assert not np.array_equal(want, reference[1])
    for prefetch in (False, True):
        m = meldlite.load(
            models["packed"], n_ctx=64, llama_numerics=False, mem_budget="25%", prefetch=prefetch
        )
        assert np.array_equal(m.logits(ids), want)
        m.close()


def test_prefill_in_small_batches_with_minimum_budget_splits_groups(models, reference):
    ids, ref_batch, _ = reference
    budget = minimum_budget(models["packed"])
    for prefetch in (False, True):
        m = meldlite.load(
            models["packed"], n_ctx=64, n_batch=7, mem_budget=budget, prefetch=prefetch
        )
        assert np.array_equal(m.logits(ids), ref_batch)
        assert m.stats()["groups_split"] > 0  # a layer's experts did not fit at once
        m.close()


# -- bit-identical results on quantized files (integer-dot experts) -------------------

QSHAPE = replace(SMALL, n_embd=256, n_ff=256, n_ff_exp=256)  # K-quant rows: 256 values
N_DECODE = 6
MIX = "Q4_K,1.*=Q8_0,0.2=F16,0.5=Q8_0,2.1=Q6_K,2.6=Q6_K"  # per-expert types (pack SPEC)
# a budget that evicts; the mix's four size classes need one slot each, 1.02 of its 4.0 MB
QBUDGET = {"Q4_K_M": "25%", "Q8_0": "25%", "mixed": "50%"}


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """{name: per-expert path}: llama.cpp's Q4_K_M (Q4_K experts, Q6_K ffn_down in the
    last layer), Q8_0, and a per-expert mix of Q4_K, Q6_K, Q8_0 and F16 experts."""
    pytest.importorskip("llama_cpp")
    from helpers_models import llamacpp_quantize

    d = tmp_path_factory.mktemp("quantized")
    f16 = write_random_model(d / "f16.gguf", "qwen3moe", shape=QSHAPE, dtype=np.float16, seed=2)
    src = {t: llamacpp_quantize(f16, d / f"{t}.gguf", t) for t in ("Q4_K_M", "Q8_0", "Q6_K")}
    out = {}
    for t in ("Q4_K_M", "Q8_0"):
        out[t] = d / f"{t}-packed.gguf"
        pack(src[t], out[t], "SRC")
    out["mixed"] = d / "mixed.gguf"
    pack(src["Q4_K_M"], out["mixed"], MIX, {"Q8_0": src["Q8_0"], "Q6_K": src["Q6_K"], "F16": f16})
    return {k: fsynced(v) for k, v in out.items()}


def prefill_and_decode(m, ids, n_decode=N_DECODE):
    """(prefill logits (T, V), decode logits (n_decode, V)): the prompt in one batch,
    then n_decode greedy tokens one at a time."""
    m.cache.reset()
    prefill = m._eval(ids, all_logits=True)  # (T, V)
    steps, token = [], int(np.argmax(prefill[-1]))
    for _ in range(n_decode):
        row = m._eval([token], all_logits=True)  # (1, V)
        steps.append(row[0])
        token = int(np.argmax(row[0]))
    return prefill, np.stack(steps)


def test_quantized_files_have_the_types_they_should(quantized):
    types = {k: {t for L in range(QSHAPE.n_layer) for e in read_gguf(p).expert_types(L)
                 for t in e} for k, p in quantized.items()}  # fmt: skip
    assert types == {"Q4_K_M": {"Q4_K", "Q6_K"}, "Q8_0": {"Q8_0"},
                     "mixed": {"Q4_K", "Q6_K", "Q8_0", "F16"}}  # fmt: skip


@pytest.mark.parametrize("name", ["Q4_K_M", "Q8_0", "mixed"])
def test_quantized_files_bit_identical_under_a_budget(quantized, name):
    """The integer-dot path of quantized experts (llama.cpp's activation rounding):
    prefill and decode logits under budgets that evict equal the all-resident run's."""
    path = quantized[name]
    ref = meldlite.load(path, n_ctx=64)
    ids = ref.tokenize(TEXT)[:16]
    want_prefill, want_decode = prefill_and_decode(ref, ids)
    ref.close()
    for budget in (minimum_budget(path), QBUDGET[name]):
        for prefetch in (False, True):
            for policy in ("forecast", "lru"):
                m = meldlite.load(
                    path, n_ctx=64, mem_budget=budget, prefetch=prefetch, cache_policy=policy
                )
                try:
                    prefill, decode = prefill_and_decode(m, ids)
                    stats = m.stats()
                finally:
                    m.close()
                where = (name, budget, prefetch, policy)
                assert np.array_equal(prefill, want_prefill), where
                assert np.array_equal(decode, want_decode), where
                assert stats["evictions"] > 0, where
                if budget != QBUDGET[name]:  # the minimum: experts computed in groups
                    assert stats["groups_split"] > 0, where


def test_pairs_add_in_slot_order_like_the_kernel():
    # the cache computes (token, slot) pairs in groups into rows t * k + j of Y and
    # sums them with kernels.sum_slots: the order of moe_ffn's own sum
    rng = np.random.default_rng(0)
    ids = np.array([[1, 0, -1], [2, 2, 1]], np.int32)
    w = rng.random((2, 3)).astype(np.float32)
    Y = rng.standard_normal((2, 3, 5)).astype(np.float32)
    out = kernels.sum_slots(ids, w, Y.reshape(6, 5), np.arange(6).reshape(2, 3))
    want = np.zeros((2, 5), np.float32)
    for t in range(2):
        for j in range(3):
            if ids[t, j] >= 0:
                want[t] = want[t] + w[t, j] * Y[t, j]
    assert np.array_equal(out, want)


# -- statistics, prefetch, prefill ---------------------------------------------------

REQUIRED = (
    "expert_hits",
    "expert_misses",
    "bytes_read",
    "prefetch_issued",
    "prefetch_useful",
    "stall_seconds",
    "peak_rss_bytes",
)


def test_stats_have_the_required_keys_and_add_up(models, reference):
    ids = reference[0]
    res = meldlite.load(models["packed"], n_ctx=64)
    res.logits(ids)
    assert set(REQUIRED) <= set(res.stats()) and res.stats()["expert_misses"] == 0
    m = meldlite.load(models["packed"], n_ctx=64, mem_budget="25%", prefetch=False)
    run_both(m, ids)
    s = m.stats()
    assert set(REQUIRED) <= set(s)
    assert s["expert_hits"] + s["expert_misses"] == s["expert_uses"]
    assert s["loads"] == s["expert_misses"]  # on demand: one load per miss
    size = int(m.store.plan.read_bytes[0])  # whole 4 kB blocks with O_DIRECT
    assert s["bytes_read"] == s["loads"] * size
    assert s["prefetch_issued"] == 0 and s["stall_seconds"] > 0
    assert s["experts_cached"] * int(m.store.plan.nbytes[0]) <= s["budget_bytes"]
    m.close()


def test_prefetch_loads_in_the_background_and_measures_itself(models, reference):
    ids = reference[0]
    m = meldlite.load(models["packed"], n_ctx=64, mem_budget="50%", prefetch=True)
    run_both(m, ids)
    s = m.stats()
    m.close()
    assert s["prefetch_issued"] > 0
    assert 0 <= s["prefetch_useful"] <= s["prefetch_issued"]
    for key in ("prefetch_precision", "prefetch_recall", "predictor_precision", "predictor_recall"):
        assert 0 <= s[key] <= 1
    assert s["loads"] == s["expert_misses"] - s["prefetch_late"] + s["prefetch_issued"]


def test_trained_model_prediction_is_far_above_chance(shared_models):
    m = meldlite.load(shared_models / "tinystories-moe-f16.gguf", n_ctx=128, mem_budget="50%")
    ids = m.tokenize(TEXT)
    m.cache.reset()
    for t in ids:
        m._eval([t], all_logits=False)
    s = m.stats()
    m.close()
    # README: applying layer L+1's router to layer L's state finds ~80% of its top-4 (chance 12.5%)
    assert s["predictor_precision"] > 0.6 and s["predictor_recall"] > 0.6


def test_prefill_keeps_decode_experts_of_every_layer(models):
    m = meldlite.load(
        models["packed"], n_ctx=128, mem_budget="50%", cache_policy="lru", prefetch=False
    )
    ids = m.tokenize(TEXT + " " + TEXT)[:60]
    seen = {}

    def spy(layer, x, i, w):
        seen[layer] = np.unique(np.asarray(i)[-1])  # the prompt's last token

    m.route_observers.append(spy)
    m.logits(ids)
    m.route_observers.remove(spy)
    store = m.store
    X = m.cfg.n_expert
    for layer in range(m.cfg.n_layer):
        # plain LRU after a 60-token prefill would have kept only the last layers' experts
        assert (store.table.state[layer * X + seen[layer]] == READY).all(), layer
    m.close()


def test_hint_loads_experts_in_the_background(models):
    m = meldlite.load(models["packed"], n_ctx=32, mem_budget="100%", prefetch=True)
    m.store.hint(1, [0, 3, 5])
    t0 = time.time()
    while (m.store.table.state[8 + np.array([0, 3, 5])] != READY).any() and time.time() - t0 < 10:
        time.sleep(0.01)
    assert (m.store.table.state[8 + np.array([0, 3, 5])] == READY).all()
    m.close()


def test_close_stops_the_loader_thread(models):
    m = meldlite.load(models["packed"], n_ctx=32, mem_budget="50%", prefetch=True)
    loader = m.store.loader
    assert loader.is_alive()
    m.close()
    assert not loader.is_alive()
    assert not any(
        t.name == "meldlite-expert-loader" and t is loader for t in threading.enumerate()
    )


@pytest.mark.parametrize("prefetch", [False, True])
def test_read_error_reaches_the_caller(models, reference, prefetch):
    m = meldlite.load(models["packed"], n_ctx=64, mem_budget="25%", prefetch=prefetch)

    def broken(buf, offset, need=None):
        raise OSError(5, "Input/output error (injected)")

    m.store.reader.file.read_into = broken
    with pytest.raises(OSError, match="injected"):
        m.logits(reference[0])
    m.close()


# -- adaptive top-k -----------------------------------------------------------------


def test_skip_light_experts():
    ids = np.array([[3, 1, 0, 2], [5, 4, -1, -1]], np.int32)
    w = np.array([[0.6, 0.3, 0.06, 0.04], [0.9, 0.1, 0, 0]], np.float32)
    new_ids, new_w = skip_light_experts(ids, w, 0.1)
    assert new_ids.tolist() == [[3, 1, -1, -1], [5, 4, -1, -1]]
    assert np.allclose(new_w, [[0.6, 0.3, 0, 0], [0.9, 0.1, 0, 0]])  # kept weights unchanged
    top, _ = skip_light_experts(ids, w, 0.99)  # the heaviest always stays
    assert top.tolist() == [[3, -1, -1, -1], [5, -1, -1, -1]]
    same_ids, _same_w = skip_light_experts(ids, w, 0.01)
    assert same_ids is ids


def test_min_expert_weight_skips_loads_and_agrees_across_stores(models, reference):
    ids = reference[0]
    res = meldlite.load(models["packed"], n_ctx=64, min_expert_weight=0.45)
    want = res.logits(ids)
    assert res.stats()["experts_skipped"] > 0
    assert not np.array_equal(want, reference[1])
    # adaptive top-k is applied once, in the forward pass: the cached store is
    # handed the routing without the light experts and neither loads nor computes them
    m = meldlite.load(models["packed"], n_ctx=64, min_expert_weight=0.45, mem_budget="25%")
    assert np.array_equal(m.logits(ids), want)
    assert m.stats()["experts_skipped"] == res.stats()["experts_skipped"]
    assert m.stats()["expert_uses"] == res.stats()["expert_uses"]
    m.close()


# -- storage realism ----------------------------------------------------------------


def test_throttle_emulates_bandwidth_across_threads():
    th = Throttle(10e6)  # 10 MB/s
    t0 = time.perf_counter()
    th.transfer(500_000, lambda: None)
    assert time.perf_counter() - t0 >= 0.049
    t0 = time.perf_counter()
    threads = [threading.Thread(target=th.transfer, args=(300_000, lambda: None)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.perf_counter() - t0 >= 0.089  # one device: 3 x 30 ms in a row


def test_io_throttle_bounds_read_time(models, reference):
    m = meldlite.load(
        models["packed"], n_ctx=64, mem_budget="25%", prefetch=False, io_throttle="20MB/s"
    )
    m.logits(reference[0])
    s = m.stats()
    m.close()
    assert s["io_seconds"] >= s["bytes_read"] / 20e6 * 0.95
    assert s["io_throttle_bytes_per_s"] == 20e6


def test_cold_drops_the_file_from_the_page_cache(models, tmp_path):
    path = tmp_path / "cold.gguf"
    path.write_bytes(Path(models["packed"]).read_bytes())
    fsynced(path)
    os.pread(os.open(path, os.O_RDONLY), path.stat().st_size, 0)  # now cached
    assert page_cache_fraction(path) > 0.9
    before, after = drop_file_cache(path)
    assert before > 0.9 and after < 0.05
    m = meldlite.load(path, n_ctx=32, cold=True)
    assert m.cold_cache[1] < 0.05
    m.close()


@pytest.mark.parametrize("mechanism", ["direct", "pread", "mmap"])
def test_expert_pages_do_not_stay_in_the_page_cache(models, tmp_path, mechanism):
    path = tmp_path / "pc.gguf"
    path.write_bytes(Path(models["packed"]).read_bytes())
    fsynced(path)
    drop_file_cache(path)
    g = read_gguf(path)
    ranges = [
        r
        for L in range(SMALL.n_layer)
        for e in range(SMALL.n_expert)
        for r in g.expert_ranges(L, e)
    ]
    m = meldlite.load(path, n_ctx=64, mem_budget="25%", expert_io=mechanism)
    m.logits(m.tokenize(TEXT)[:24])
    m.close()  # no background read in flight
    cached = page_cache_fraction(path, ranges)
    # direct reads bypass the page cache, pread drops every range it read, the map
    # keeps only what the budget holds
    limit = 0.25 + 0.1 if mechanism == "mmap" else 0.05
    assert cached <= limit, cached


# -- memory: peak RSS measured in a fresh process -------------------------------------

RSS_SHAPE = replace(
    SMALL,
    n_embd=512,
    n_layer=4,
    n_head=8,
    n_head_kv=2,
    n_expert=8,
    n_expert_used=2,
    n_ff_exp=512,
    n_ctx=64,
)

RSS_SCRIPT = r"""
import json, sys, gc
from meldlite.experts.io import memory_status, reset_peak_rss
import meldlite
opts = json.loads(sys.argv[2])
# load the kernels this configuration runs first: a kernel loaded later maps LLVM's pages
# again, which Model releases after its first forward pass (kernels/_memory.py)
warm = meldlite.load(sys.argv[1], n_ctx=64, **opts)
warm.logits(list(range(1, 40))); warm.close(); del warm; gc.collect()
reset_peak_rss()
r0 = memory_status()["VmRSS"]
m = meldlite.load(sys.argv[1], n_ctx=64, **opts)
for t in range(3):
    m.logits(list(range(1, 40)))
s = m.stats()
m.close()
print(json.dumps({"r0": r0, "peak": memory_status()["VmHWM"], "budget": s.get("budget_bytes"),
                  "cache": s.get("cache_bytes"), "expert_bytes": s.get("expert_bytes")}))
"""


def peak_rss(path, opts):
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), json.dumps(opts)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_peak_rss_stays_within_the_budget_promise(tmp_path):
    stacked = write_random_model(
        tmp_path / "rss.gguf", "qwen3moe", shape=RSS_SHAPE, dtype=np.float16
    )
    path = tmp_path / "rss-packed.gguf"
    pack(stacked, path, "SRC")
    fsynced(path)
    g = read_gguf(path)
    expert = sum(
        n
        for L in range(RSS_SHAPE.n_layer)
        for e in range(RSS_SHAPE.n_expert)
        for _, n in g.expert_ranges(L, e)
    )
    non_expert = path.stat().st_size - expert
    resident = peak_rss(path, {})
    overhead = 8 * 2**20  # measured ~2-5 MiB: KV cache, activations, bookkeeping
    for opts in (
        {"mem_budget": "25%", "prefetch": False},
        {"mem_budget": "25%"},
        {"mem_budget": "25%", "expert_io": "mmap"},
    ):
        r = peak_rss(path, opts)
        promise = r["r0"] + non_expert + r["budget"] + overhead
        assert r["peak"] <= promise, (opts, r, promise)
        # and the experts outside the budget really stayed out of memory
        assert resident["peak"] - r["peak"] >= 0.8 * (expert - r["budget"]), (opts, r, resident)


# -- a compressed file's popularity (issue 8 item 5) ----------------------------------


def with_expert_metadata(src, out, popularity, sensitivity=None, pruned=None):
    """A copy of the per-expert file `src` with the popularity / sensitivity / pruned
    keys `meldlite quantize` writes (flat, layer-major), through pack's writer."""
    from gguf import GGUFValueType as V

    from meldlite.formats import layout
    from meldlite.formats.pack import TensorOut, write_atomic

    g = read_gguf(src)
    tensors = [TensorOut.copy(n, g.tensor(n)) for n in g.tensor_names()]
    meta = [
        (k, g.metadata[k], *g.metadata_types[k])
        for k in (layout.KEY_LAYOUT, layout.KEY_ORDER, layout.KEY_ORDER_POLICY)
    ]
    for key, a, sub in (
        (layout.KEY_POPULARITY, popularity, V.FLOAT32),
        (layout.KEY_SENSITIVITY, sensitivity, V.FLOAT32),
        (layout.KEY_PRUNED, pruned, V.UINT8),
    ):
        if a is not None:
            meta.append((key, [x.item() for x in np.asarray(a).reshape(-1)], V.ARRAY, sub))
    write_atomic(out, g, tensors, meta)
    return fsynced(out)


def test_file_popularity_keeps_the_most_popular_experts_resident(models, tmp_path):
    L, X = SMALL.n_layer, SMALL.n_expert
    rng = np.random.default_rng(5)
    pop = rng.choice([0.05, 0.1, 0.2, 0.4], size=(L, X)).astype(np.float32)  # many ties
    sens = rng.permutation(L * X).reshape(L, X).astype(np.float32)  # breaks them
    pruned = np.zeros((L, X), np.uint8)
    pruned[1, int(np.argmax(pop[1]))] = 1  # the most popular of layer 1, yet pruned
    path = with_expert_metadata(models["packed"], tmp_path / "mixed.gguf", pop, sens, pruned)
    # expected, computed here: popularity descending, then sensitivity descending
    ranked = sorted(
        (g for g in range(L * X) if not pruned.flat[g]), key=lambda g: (-pop.flat[g], -sens.flat[g])
    )
    ref = meldlite.load(path, n_ctx=64)
    ids = ref.tokenize(TEXT)[:16]
    want = ref.logits(ids)
    ref.close()
    m = meldlite.load(path, n_ctx=64, mem_budget="25%", prefetch=False)
    try:
        st = m.store
        n_slots = sum(p.n_slots for p in st.pools)
        assert 0 < n_slots < L * X
        assert set(np.flatnonzero(st.table.state == READY)) == set(ranked[:n_slots])
        assert m.stats()["loads_preload"] == n_slots
        p = st.policy.p.reshape(L, X)  # forecast's P(picked), seeded
        assert np.all(
            np.argsort(-p, axis=1, kind="stable")[:, 0]
            == np.argmax(np.where(pruned, -1, pop + 1e-3 * sens / sens.max()), axis=1)
        )
        assert np.array_equal(m.logits(ids), want)  # bit-identical to the resident run
    finally:
        m.close()
    # an explicit profile overrides the file's popularity: nothing is preloaded
    prof = {"model": {"n_layer": L, "n_expert": X}, "layers": [{"share": [1 / X] * X}] * L}
    m = meldlite.load(path, n_ctx=64, mem_budget="25%", prefetch=False, profile=prof)
    assert m.stats()["loads_preload"] == 0 and not (m.store.table.state == READY).any()
    m.close()


def test_bad_popularity_metadata_is_a_format_error(models, tmp_path):
    from meldlite.errors import FormatError

    path = with_expert_metadata(models["packed"], tmp_path / "bad.gguf", np.ones(5, np.float32))
    with pytest.raises(FormatError, match="expert_popularity has 5 values"):
        meldlite.load(path, n_ctx=64, mem_budget="50%")


# -- a pruned per-expert file (pruned experts left out) ---------------------------------

N_PRUNED = 3  # of SMALL's 8 experts per layer (k = 2)


@pytest.fixture(scope="module")
def pruned(models, tmp_path_factory):
    """(path, flags (L, X) bool, ids, resident batch logits, resident token-by-token logits)
    of a copy of the small model with its N_PRUNED least popular experts per layer
    pruned and left out (`prune_file`, as `meldlite pack/quantize --prune-experts`);
    test_prune checks such a file's resident logits against llama.cpp."""
    from meldlite.compress.prune import prune_file
    from meldlite.formats.profile import FORMAT, READS

    d = tmp_path_factory.mktemp("pruned")
    pop = np.random.default_rng(7).random((SMALL.n_layer, SMALL.n_expert))  # (L, X)
    prof = {
        "format": FORMAT,
        "version": max(READS),
        "model": {"n_layer": SMALL.n_layer, "n_expert": SMALL.n_expert},
        "layers": [{"share": list(map(float, row))} for row in pop],
    }
    path = fsynced(prune_file(models["stacked"], d / "pruned.gguf", prof, N_PRUNED).path)
    f = read_gguf(path)
    flags = np.array(
        [[not f.expert_present(L, e) for e in range(SMALL.n_expert)] for L in range(SMALL.n_layer)]
    )
    assert (flags.sum(axis=1) == N_PRUNED).all()
    m = meldlite.load(path, n_ctx=64)
    ids = m.tokenize(TEXT)[:24]
    batch, single = run_both(m, ids)
    m.close()
    return path, flags, ids, batch, single


def run_recording_loads(m, ids):
    """run_both, recording every expert the store reads after the load (g ids)."""
    loads, seen = m.store.loads, []
    read = loads.read

    def recording(g):
        seen.append(g)
        return read(g)

    loads.read = recording  # the loader thread calls loads.read too
    batch, single = run_both(m, ids)
    return batch, single, seen


def check_no_pruned_load(m, flags, seen):
    st, stats = m.store, m.stats()
    gone = np.flatnonzero(flags.reshape(-1))  # pruned g
    tab = st.table
    assert stats["loads_pruned"] == 0 and not tab.load_count[gone].any()
    assert not np.isin(seen, gone).any() and not (tab.state[gone] != 0).any()
    assert not tab.served[gone].any() and stats["experts_present"] == flags.size - gone.size
    assert stats["loads"] > 0


def test_pruned_file_budgeted_bit_identical_and_never_loads_pruned(pruned):
    path, flags, ids, ref_batch, ref_single = pruned
    f = read_gguf(path)
    present_bytes = sum(
        nb
        for L in range(SMALL.n_layer)
        for e in range(SMALL.n_expert)
        if not flags[L, e]
        for _, nb in f.expert_ranges(L, e)
    )
    minimum = minimum_budget(path)
    for budget in (minimum, "25%", "50%", "100%"):
        for policy in POLICIES:
            for prefetch in (False, True):
                m = meldlite.load(
                    path, n_ctx=64, mem_budget=budget, cache_policy=policy, prefetch=prefetch
                )
                try:
                    batch, single, seen = run_recording_loads(m, ids)
                    stats = m.stats()
                    where = (budget, policy, prefetch)
                    assert np.array_equal(batch, ref_batch), where
                    assert np.array_equal(single, ref_single), where
                    check_no_pruned_load(m, flags, seen)
                    assert stats["expert_bytes"] == present_bytes
                    if budget == "25%":  # a share of the experts present
                        assert stats["budget_bytes"] == int(present_bytes * 0.25)
                finally:
                    m.close()


def test_pruned_file_minimum_budget_counts_present_experts(pruned):
    path, flags, *_ = pruned
    m = meldlite.load(path, n_ctx=32, mem_budget="100%", prefetch=False, expert_io="pread")
    st = m.store
    sizes = st.pools.sizes.reshape(SMALL.n_layer, SMALL.n_expert)
    want = max(
        int(np.sort(row[~gone])[::-1][: SMALL.n_expert_used].sum())
        for row, gone in zip(sizes, flags)
    )
    want = max(want, int(np.unique(sizes[~flags]).sum()))  # one slot per size class
    assert st.pools.minimum == want and (sizes[flags] == 0).all()
    assert sum(p.capacity for p in st.pools) <= st.pools.budget
    m.close()
    with pytest.raises(BudgetError, match="needs at least"):
        meldlite.load(path, n_ctx=32, mem_budget=want - 1)


@pytest.mark.parametrize("mechanism", ["pread", "mmap"])
def test_pruned_file_other_mechanisms_and_preload(pruned, tmp_path, mechanism):
    """With popularity metadata that ranks the pruned experts first: preload, guesses
    and the policy still never touch them."""
    path, flags, ids, ref_batch, ref_single = pruned
    pop = np.where(flags, 1.0, 0.1).astype(np.float32)
    seeded = with_expert_metadata(
        path, tmp_path / "seeded.gguf", pop, pruned=flags.astype(np.uint8)
    )
    m = meldlite.load(seeded, n_ctx=64, mem_budget="50%", expert_io=mechanism)
    try:
        assert m.stats()["loads_preload"] > 0
        batch, single, seen = run_recording_loads(m, ids)
        assert np.array_equal(batch, ref_batch) and np.array_equal(single, ref_single)
        check_no_pruned_load(m, flags, seen)
    finally:
        m.close()


# -- a budgeted store as a peer coordinator's local store -------------------------------


def test_local_store_of_a_coordinator_prefetches_only_local_experts(models, reference):
    from meldlite.transports.local_peer import LocalPeer
    from meldlite.transports.placement import Placement

    ids, _, _ = reference
    L, X = SMALL.n_layer, SMALL.n_expert
    experts = [[[0] if e % 2 else [1] for e in range(X)] for _ in range(L)]  # odd: peer0
    pl = Placement(
        [{"name": "peer0", "budget": None}, {"name": "local", "budget": None}], experts, "test"
    )
    peer = LocalPeer.start(1)[0]
    try:
        m = meldlite.load(
            models["packed"],
            n_ctx=64,
            mem_budget="100%",
            peers=[peer.endpoint],
            placement=pl,
            exact=True,
            peer_timeout=30.0,
        )
        try:
            local = m.store.local
            for t in ids[:12]:
                m._eval([t], all_logits=False)
            here = np.arange(L * X) % 2 == 0
            assert local.stats()["prefetch_issued"] > 0
            assert not (local.table.state[~here] == READY).any()  # nothing of peer0's was read
        finally:
            m.close()
    finally:
        peer.stop()


# -- CLI ----------------------------------------------------------------------------


def meldlite_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "meldlite", *map(str, args)], capture_output=True, text=True
    )


def test_cli_run_with_budget_prints_stats(models):
    p = meldlite_cli(
        "run",
        models["packed"],
        "-n",
        "4",
        "--seed",
        "1",
        "--mem-budget",
        "25%",
        "--policy",
        "lru",
        "--no-prefetch",
        "--io-throttle",
        "100MB/s",
        "--cold",
        "--stats",
        "--min-expert-weight",
        "0.1",
    )
    assert p.returncode == 0, p.stderr
    for key in REQUIRED:
        assert f"{key}: " in p.stderr
    assert "cache_policy: lru" in p.stderr and "prefetch: False" in p.stderr


@pytest.mark.parametrize(
    "args, match",
    [
        (["--mem-budget", "lots"], "mem_budget"),
        (["--mem-budget", "150%"], "mem_budget"),
        (["--mem-budget", "1"], "too small"),
        (["--mem-budget", "50%", "--io-throttle", "fast"], "io_throttle"),
        (["--mem-limit", "lots"], "mem_limit 'lots' is not a size"),
        (["--mem-limit", "25%"], "must be a size"),
        (["--mem-limit", "20MB"], "too small"),
        (["--mem-limit", "1GB", "--mem-budget", "25%"], "not both"),
    ],
)
def test_cli_bad_budget_is_one_line_exit_2(models, args, match):
    p = meldlite_cli("run", models["packed"], "-n", "2", *args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meldlite: error:") and match in lines[0]


def test_demand_read_computes_background_loads_that_landed(models):
    """A demand read whose pool is full of this layer's background loads that ended
    meanwhile (READY, pinned by the call, not yet in its ready list) computes them
    to free a slot, and the output equals the kernel's (it used to raise 'no slot
    can be freed')."""
    m = meldlite.load(models["packed"], n_ctx=32, mem_budget=minimum_budget(models["packed"]),
                      prefetch=False)  # fmt: skip
    store, tab = m.store, m.store.table
    ids = np.array([[0, 1], [2, 0]], np.int32)  # (T, k): the pool holds two of the three
    weights = np.array([[0.6, 0.4], [0.7, 0.3]], np.float32)  # (T, k)
    x = np.random.default_rng(0).standard_normal((2, SMALL.n_embd)).astype(np.float32)
    with tab.cond:
        for g in range(tab.state.size):
            if tab.state[g] == READY:
                tab.evict(g)
        assert tab.make_room(0, speculative=True)  # experts 0 and 1 of layer 0: in flight
        assert tab.make_room(1, speculative=True)
    landed = []
    demand = store.loads.read_demand

    def land_then_demand(absent, ready, inflight, flush):
        if not landed:  # the background reads end before the demand read of expert 2
            for g in (0, 1):
                store.loads.read(g)
                with tab.cond:
                    tab.loaded(g, speculative=True)
                landed.append(g)
        return demand(absent, ready, inflight, flush)

    store.loads.read_demand = land_then_demand
    got = store.moe(0, x, ids, weights)  # (T, E)
    m.close()
    full = meldlite.load(models["packed"], n_ctx=32)
    want = full.store.moe(0, x, ids, weights)  # (T, E)
    full.close()
    assert landed
    np.testing.assert_array_equal(got, want)
