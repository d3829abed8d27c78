"""Memory under a cap (issue 16 item 4): with a memory budget the non-expert weights are
copies in anonymous memory, not pages of the file the kernel may reclaim and read again
every token; `mem_limit` derives the expert budget from a limit on the whole process
(experts/limit.py, docs/experts.md "Sizing the budget from a memory limit")."""

import json
import os
import re

import numpy as np
import pytest
from helpers_models import Shape, write_random_model
from test_expert_cache import RSS_SHAPE, TEXT, fsynced, meldlite_cli, write_small

import meldlite
from meldlite.errors import OptionError
from meldlite.experts import io as eio
from meldlite.experts.limit import (
    MARGIN_FIXED,
    MARGIN_PER_TOKEN_VALUES,
    LimitSizing,
    margin_bytes,
)
from meldlite.formats import pack, read_gguf
from meldlite.formats.pack import non_expert_names
from meldlite.options import Store
from meldlite.units import parse_limit
from meldlite.weights import Weights

MADV_PAGEOUT = 21  # Linux 5.4
FIXED = ("limit_runtime_bytes", "limit_weights_bytes", "limit_kv_bytes", "limit_margin_bytes")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """test_expert_cache's small random qwen3moe (F16), per-expert layout."""
    return write_small(tmp_path_factory.mktemp("limit"))["packed"]


# -- non-expert weights copied into memory under a budget -----------------------------------


def map_views(m):
    """{name: whether the loaded weight's bytes are the memory map's} of 2-D non-expert
    tensors."""
    out = {}
    for name in non_expert_names(m.gguf):
        w = m.weights[name]
        if hasattr(w, "raw"):
            out[name] = np.shares_memory(w.raw, m.gguf.tensor(name).raw)
    return out


def test_a_budget_copies_the_non_expert_weights_out_of_the_map(model):
    g = read_gguf(model)
    sizes = {n: g.tensor(n).nbytes for n in non_expert_names(g)}
    m = meldlite.load(model, n_ctx=32, mem_budget="25%")
    views = map_views(m)
    copied = m.stats()["weights_resident_bytes"]
    m.close()
    # the embedding, read a row per token, stays in the map (the output head is its own)
    assert views.pop("token_embd.weight") and not any(views.values())
    assert copied == sum(sizes.values()) - sizes["token_embd.weight"]
    r = meldlite.load(model, n_ctx=32)
    assert all(map_views(r).values()) and r.stats()["weights_resident_bytes"] == 0
    r.close()


def storage_reads():
    """Bytes this process had read from storage (/proc/self/io), None without it."""
    try:
        with open("/proc/self/io") as f:
            return int(dict(line.split(":") for line in f)["read_bytes"])
    except (OSError, KeyError):
        return None


def reads_after_reclaim(m, path, tokens):
    """Bytes read from storage by one decode step, besides the expert loads, after this
    process's map of the model is paged out (MADV_PAGEOUT, what reclaim under memory
    pressure does) and the file is dropped from the page cache."""
    t = m.gguf.tensor(m.gguf.tensor_names()[0])
    base = t.raw.ctypes.data - t.offset  # byte 0 of the map
    m.logits(tokens)
    length = -(-os.path.getsize(path) // eio.PAGE) * eio.PAGE
    try:
        eio.madvise(base, length, MADV_PAGEOUT)
    except OSError as e:
        pytest.skip(f"MADV_PAGEOUT: {e}")
    eio.drop_file_cache(path)
    before, experts = storage_reads(), m.stats()["bytes_read"]
    m._eval([tokens[-1]], all_logits=False)
    return storage_reads() - before - (m.stats()["bytes_read"] - experts)


def test_copied_weights_are_not_read_again_after_reclaim(model, monkeypatch):
    if storage_reads() is None:
        pytest.skip("no /proc/self/io")
    tokens = list(range(1, 17))
    m = meldlite.load(model, n_ctx=64, mem_budget="25%", prefetch=False)
    copied = reads_after_reclaim(m, model, tokens)
    m.close()
    monkeypatch.setattr(Weights, "keep_resident", lambda self, skip=(): None)  # the old way
    r = meldlite.load(model, n_ctx=64, mem_budget="25%", prefetch=False)
    mapped = reads_after_reclaim(r, model, tokens)
    r.close()
    head = read_gguf(model).tensor("output.weight").nbytes
    assert mapped >= head, (mapped, head)  # the output head (and more) read back
    assert copied <= 2 * eio.PAGE, copied  # an embedding row


# -- mem_limit: options --------------------------------------------------------------------


def test_parse_limit():
    assert parse_limit("340MB") == 340_000_000
    assert parse_limit("1GiB") == 2**30
    assert parse_limit(4096) == 4096 and parse_limit(None) is None


@pytest.mark.parametrize("bad", ["25%", "lots", "", "0", -1, 0, True, "nan", [1]])
def test_bad_limits_are_option_errors(bad):
    with pytest.raises(OptionError, match="mem_limit"):
        parse_limit(bad)
    with pytest.raises(OptionError, match="mem_limit"):
        Store(mem_limit=bad)


def test_limit_and_budget_together_is_an_error():
    with pytest.raises(OptionError, match="not both"):
        Store(mem_limit="300MB", mem_budget="25%")
    assert Store(mem_limit="300MB", cache_policy="lru").budgeted  # a limit is a budget
    with pytest.raises(OptionError, match="mem_budget or mem_limit"):
        Store(cache_policy="lru")


def test_limit_on_a_dense_model_is_an_error(tmp_path):
    dense = Shape(n_vocab=4096, n_embd=128, n_layer=1, n_head=2, n_head_kv=1, head_dim=64)
    path = write_random_model(tmp_path / "dense.gguf", "qwen3", shape=dense)
    with pytest.raises(OptionError, match="mem_limit apply to Mixture-of-Experts"):
        meldlite.load(path, n_ctx=32, mem_limit="1GB")


# -- mem_limit: the arithmetic ---------------------------------------------------------------


def test_sizing_arithmetic_and_message():
    s = LimitSizing(limit=300_000_000, resident=120_000_000, weights=20_000_000,
                    kv=8_000_000, margin=40_000_000)  # fmt: skip
    assert s.budget == 300_000_000 - 120_000_000 - 8_000_000 - 40_000_000
    assert s.needed(5_000_000) == 120_000_000 + 8_000_000 + 40_000_000 + 5_000_000
    msg = str(s.too_small(5_000_000))
    assert "\n" not in msg and "173000000 bytes" in msg
    for part in ("runtime 100.0 MB", "weights 20.0 MB", "KV cache 8.0 MB", "margin 40.0 MB"):
        assert part in msg
    assert s.stats() == {
        "mem_limit_bytes": 300_000_000,
        "limit_runtime_bytes": 100_000_000,
        "limit_weights_bytes": 20_000_000,
        "limit_kv_bytes": 8_000_000,
        "limit_margin_bytes": 40_000_000,
    }


def test_margin_grows_with_the_chunk_and_the_width(model):
    cfg = meldlite.load(model, n_ctx=32).cfg
    width = cfg.n_embd + cfg.n_expert_used * cfg.n_ff_exp + cfg.n_ff_shexp
    assert margin_bytes(cfg, 0) == MARGIN_FIXED
    assert margin_bytes(cfg, 100) - MARGIN_FIXED == 4 * MARGIN_PER_TOKEN_VALUES * 100 * width


def test_load_with_a_limit_derives_the_budget(model, monkeypatch):
    ref = meldlite.load(model, n_ctx=64)
    ids = ref.tokenize(TEXT)[:24]
    want = ref.logits(ids)
    ref.close()
    probe = meldlite.load(model, n_ctx=64, mem_limit="100GB")
    s = probe.stats()
    probe.close()
    assert s["budget_bytes"] == s["expert_bytes"]  # a generous limit: every expert fits
    assert s["limit_weights_bytes"] == s["weights_resident_bytes"] > 0
    assert s["limit_kv_bytes"] == s["kv_bytes"] and s["limit_runtime_bytes"] > 0
    assert s["limit_margin_bytes"] == margin_bytes(probe.cfg, 64)  # n_batch 512 > n_ctx
    # the RSS at sizing made steady, the budget is what the limit leaves, to the byte
    resident = 150_000_000
    monkeypatch.setattr("meldlite.api.memory_status", lambda: {"VmRSS": resident})
    quarter = s["expert_bytes"] // 4
    limit = resident + s["kv_bytes"] + s["limit_margin_bytes"] + quarter
    m = meldlite.load(model, n_ctx=64, mem_limit=limit, prefetch=False)
    got = m.logits(ids)
    s = m.stats()
    m.close()
    assert s["budget_bytes"] == quarter and s["evictions"] > 0
    assert s["limit_runtime_bytes"] == resident - s["weights_resident_bytes"]
    assert np.array_equal(got, want)


def test_too_small_a_limit_says_what_is_needed(model):
    with pytest.raises(OptionError, match=r"mem_limit .* too small: .* at least") as err:
        meldlite.load(model, n_ctx=32, mem_limit="20MB")
    need = int(re.search(r"\((\d+) bytes", str(err.value)).group(1))
    assert need > 20_000_000
    m = meldlite.load(model, n_ctx=32, mem_limit=need + 16 * 2**20)  # enough, with RSS drift
    assert m.stats()["budget_bytes"] >= m.stats()["min_budget_bytes"]
    m.close()


# -- mem_limit: the CLI (its errors: test_expert_cache's test_cli_bad_budget...) ---------------------------------------------------------------------


def stats_of(stderr):
    return dict(re.findall(r"^(\w+): (\S+)$", stderr, re.M))


def test_run_under_a_limit_peaks_below_it(tmp_path):
    """`meldlite run --mem-limit` on a model of 48 MiB of experts: the limit is set so
    that the experts get about a quarter of their bytes; the run's peak RSS (VmHWM,
    its own process) stays under the limit."""
    stacked = write_random_model(tmp_path / "rss.gguf", "qwen3moe", shape=RSS_SHAPE,
                                 dtype=np.float16)  # fmt: skip
    path = tmp_path / "rss-packed.gguf"
    pack(stacked, path, "SRC")
    fsynced(path)
    run = ("run", path, "-n", "16", "--temp", "0", "--stats", "-c", "64")
    warm = meldlite_cli(*run, "--mem-budget", "25%")  # compiles what a cold cache lacks
    assert warm.returncode == 0, warm.stderr
    probe = meldlite_cli(*run, "--mem-limit", "100GB")  # the split, for this model
    assert probe.returncode == 0, probe.stderr
    s = {k: int(v) for k, v in stats_of(probe.stderr).items() if v.isdigit()}
    limit = sum(s[k] for k in FIXED) + s["expert_bytes"] // 4
    p = meldlite_cli(*run, "--mem-limit", limit)
    assert p.returncode == 0, p.stderr
    peak = float(re.search(r"peak RSS: ([0-9.]+) MiB", p.stderr).group(1)) * 2**20
    got = {k: int(v) for k, v in stats_of(p.stderr).items() if v.isdigit()}
    assert got["budget_bytes"] < got["expert_bytes"] // 2 and got["evictions"] > 0
    assert peak <= limit, (peak, limit, got)
    print(json.dumps({"limit": limit, "peak": peak, **got}))


@pytest.mark.parametrize("command", ["run", "chat", "serve"])
def test_cli_batch_size_reaches_the_model(command, monkeypatch):
    """`-b` (the prompt chunk, which the mem_limit margin grows with) is an option of
    run, chat and serve, and reaches the Model's runtime; the run stops at the Model."""
    from click.testing import CliRunner

    from meldlite import api
    from meldlite.cli import main

    seen = {}

    def record(self, path=None, runtime=None, **kw):
        seen["n_batch"] = runtime.n_batch
        raise OptionError("stopped by the test")

    monkeypatch.setattr(api.Model, "__init__", record)
    res = CliRunner().invoke(main, [command, "-b", "16"], input="")
    assert res.exit_code == 2 and "stopped by the test" in res.output, res.output
    assert seen == {"n_batch": 16}
