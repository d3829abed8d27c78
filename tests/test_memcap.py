"""benchmarks/memcap.py's pure logic: the budget rule, caps, run status, the report's
medians and ratios, /proc cgroup parsing (no cgroup is made here)."""

import signal
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import memcap

MIB = 2**20


def test_budget_rule_subtracts_runtime_weights_kv_and_margin():
    budget, note = memcap.fit_budget(
        500 * MIB, 200 * MIB, 60 * MIB, 2 * MIB, 32 * MIB, 5 * MIB, 800 * MIB
    )
    assert (budget, note) == (206 * MIB, "")


def test_budget_rule_clamps_to_all_experts_and_to_the_minimum():
    args = (200 * MIB, 60 * MIB, 2 * MIB, 32 * MIB, 5 * MIB)
    assert memcap.fit_budget(2000 * MIB, *args, 800 * MIB) == (800 * MIB, "all")
    assert memcap.fit_budget(298 * MIB, *args, 800 * MIB) == (5 * MIB, "min")
    assert memcap.fit_budget(None, *args, 800 * MIB) == (None, "none")


def test_caps_are_fractions_percentages_sizes_or_none():
    assert memcap.parse_cap("0.25", 1000) == 250
    assert memcap.parse_cap("1.0", 1000) == 1000
    assert memcap.parse_cap("40%", 1000) == 400
    assert memcap.parse_cap("300MB", 1000) == 300_000_000
    assert memcap.parse_cap("1GiB", 1000) == 2**30
    assert memcap.parse_cap("none", 1000) is None


def test_run_status():
    done = ["model loaded", "prefill", "decode", "done"]
    assert memcap.run_status(0, 0, False, done) == "ok"
    assert memcap.run_status(-signal.SIGKILL, 0, False, ["model loaded"]) == (
        "killed (model loaded)"
    )
    assert memcap.run_status(1, 1, False, []) == "killed (starting)"  # the cgroup's count
    assert memcap.run_status(-signal.SIGKILL, 0, True, ["prefill"]) == "timeout (prefill)"
    assert memcap.run_status(1, 0, False, ["imported"]) == "failed (imported)"
    assert memcap.run_status(0, 0, False, ["prefill"]) == "failed (prefill)"  # no "done"
    assert memcap.run_status(-signal.SIGKILL, 0, True, done) == "ok"  # measured, slow exit


def run(status, decode=None, peak=100, read=1000):
    return dict(
        status=status,
        peak=peak,
        prefill_tok_s=None if decode is None else 10 * decode,
        decode_tok_s=decode,
        read_bytes=read,
        decode_read_per_token=None if decode is None else 50.0,
    )


def test_summarize_takes_medians_of_finished_runs_and_the_largest_peak():
    row = memcap.summarize([run("ok", 1.0, 90), run("ok", 3.0, 120), run("ok", 2.0, None)])
    assert row["status"] == "ok" and row["decode_tok_s"] == 2.0 and row["peak"] == 120
    row = memcap.summarize([run("ok", 4.0), run("killed (prefill)", peak=500, read=7)])
    assert row["status"] == "killed (prefill), 1/2 ok"
    assert row["decode_tok_s"] == 4.0 and row["read_bytes"] == 1000 and row["peak"] == 500
    row = memcap.summarize([run("killed (starting)", read=7)])
    assert row["decode_tok_s"] is None and row["read_bytes"] == 7


def summary(status, decode):
    return memcap.summarize([run(status, decode)])


def test_ratio_is_over_the_best_llamacpp_configuration_that_survived():
    rows = {
        "meldlite": summary("ok", 8.0),
        "llama.cpp repack": summary("killed (model loaded)", None),
        "llama.cpp no repack": summary("ok", 0.5),
    }
    assert memcap.ratio_cells(rows) == ["8.00", "llama.cpp no repack", "0.50", "16.00x", "16.00x"]
    rows["llama.cpp repack"] = summary("ok", 2.0)
    assert memcap.ratio_cells(rows)[1:4] == ["llama.cpp repack", "2.00", "4.00x"]
    # a configuration killed in one repetition does not count as surviving
    rows["llama.cpp repack"] = memcap.summarize([run("ok", 9.0), run("killed (decode)")])
    assert memcap.ratio_cells(rows)[1] == "llama.cpp no repack"


def test_ratio_without_survivors():
    killed = summary("killed (starting)", None)
    rows = {"meldlite": summary("ok", 8.0), "llama.cpp repack": killed}
    assert memcap.ratio_cells(rows) == ["8.00", "all killed or failed", "-", "-", "-"]
    rows = {"meldlite": killed, "llama.cpp repack": summary("ok", 2.0)}
    assert memcap.ratio_cells(rows) == ["killed (starting)", "llama.cpp repack", "2.00", "-", "-"]


def test_table_row_storage_bound_is_bandwidth_over_bytes_per_token():
    row = dict(summary("ok", 2.0), decode_read_per_token=4e6, read_bytes=5e7, peak=300 * MIB)
    cells = memcap.table_row("edge-q4", "0.5", "meldlite", "80.0 MB", row, 200e6).split(" | ")
    assert cells[-4:] == ["50.0", "4.00", "50.0", "300 |"]
    killed = memcap.table_row("m", "0.25", "llama.cpp repack", "-", summary("killed", None), 1e8)
    assert killed.count("| - |") >= 1 and "killed" in killed


def test_proc_cgroup_v1_memory_line_else_v2_unified_line():
    v1 = "9:name=systemd:/\n4:memory:/process_api/abc\n3:cpuset:/\n0::/\n"
    assert memcap.parse_proc_cgroup(v1) == (1, "/process_api/abc")
    assert memcap.parse_proc_cgroup("5:cpu,cpuacct:/x\n0::/user.slice/s\n") == (
        2,
        "/user.slice/s",
    )
    assert memcap.parse_proc_cgroup("5:cpu:/x\n") is None


def test_cgroup_counter_reads_oom_kills():
    text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"
    assert memcap.cgroup_counter(text, "oom_kill") == 3
    assert memcap.cgroup_counter("low 0\nmax 2\n", "oom_kill") == 0


def test_shape_overrides():
    assert memcap.shape_overrides("n_layer=2, n_expert=16,") == {"n_layer": 2, "n_expert": 16}


def test_f16_size_estimate_matches_a_written_file(tmp_path):
    from gguf import GGUFReader
    from helpers_models import Shape, write_random_model

    shape = Shape(n_vocab=4096, n_embd=256, n_layer=2, n_expert=8, n_expert_used=2, n_ff_exp=256)
    path = write_random_model(tmp_path / "m.gguf", "qwen3moe", shape=shape, dtype=np.float16)
    tensors = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
    assert memcap.f16_bytes(shape) == pytest.approx(tensors, rel=0.01)
