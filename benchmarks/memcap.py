"""meldlite and llama.cpp under the same memory cap: one fresh process per run in a memory cgroup.

    python benchmarks/memcap.py [--models edge-q4] [--big] [--caps 1.0,0.75,0.5,0.4,0.25]
        [--reps 3] [--prompt 32] [--decode 24] [--threads 2] [--margin 32MiB] [--timeout 900]
        [--big-shape n_layer=2,n_expert=16,...] [--mem-limit]

Models: names of benchmarks/generate.py (`edge-q4`, ...; generated into benchmarks/out/ when
absent), `builtin` (a copy of the built-in model, which itself warms meldlite's kernels), `big` (also --big) or a GGUF path. `big` is a
random-weight qwen3moe shaped like Qwen3-30B-A3B scaled down (generate.py's edge shape with
BIG's layers and experts: 32 layers of 128 experts of 384, top-8; about 3.0 GB in Q4_K_M),
written once by tests/helpers_models.py's generator in F16 and quantized by llama.cpp. The F16
intermediate is held in memory while it is written and needs as much disk (~10 GB each; the
script checks both first). --big-shape overrides Shape fields (a small shape exercises the
code path in seconds; its file gets its own name).

Caps: a bare number is a fraction of the model file's size, `40%` likewise, `300MB` /
`1.5GiB` an absolute limit, `none` no limit (the cgroup only measures).

Each (model, cap, repetition, engine) runs in a fresh process placed in a new child memory
cgroup of this process's own (cgroup v1: the `memory` line of /proc/self/cgroup under
/sys/fs/cgroup/memory, memory.limit_in_bytes and memory.memsw.limit_in_bytes; cgroup v2:
memory.max, memory.swap.max 0) by a shell launcher that writes its pid to cgroup.procs and
then execs Python, so the interpreter, the libraries, the model's pages in the page cache
and every allocation count against the cap. The model file is dropped from the page cache
(POSIX_FADV_DONTNEED, meldlite.experts.io.drop_file_cache) before each run. Engines:

- meldlite: kernels loaded first from Numba's cache (offload.load_kernels: the built-in model
  run once), then the model opened with the memory budget of the rule below;
- llama.cpp repack: llama-cpp-python as it loads by default (CPU weight repacking, which
  copies the weights into anonymous memory);
- llama.cpp no repack: llama.cpp's --no-repack (generate.disable_repack), the weights a plain
  memory map the kernel pages in and out.

Each engine prefills the same --prompt random token ids (generate.prompt_ids) and decodes
--decode tokens greedily. Measured: prefill and decode tokens/s, bytes read from storage
(the whole process: the child's rusage ru_inblock x 512, which is /proc/<pid>/io read_bytes,
also known for a killed child; and the decode phase's share from /proc/self/io per token),
the cgroup's peak usage (v1 memory.max_usage_in_bytes, v2 memory.peak; page cache
included), and whether the run was killed (SIGKILL or the cgroup's oom_kill count). A run
that is killed, fails or passes --timeout is reported as such, and the remaining repetitions
of that (model, cap, engine) are skipped. Rows are medians over the repetitions that
finished. "storage bound" is the cold random-read bandwidth of the file at one expert's size
(offload.disk_bandwidth) over the decode bytes read per token. Per model and cap, the summary
gives meldlite / the best llama.cpp configuration that survived the cap (decode; prefill
against the best surviving prefill).

The budget rule (meldlite's --mem-budget for a cap): B = cap - R0 - N - K - M, where R0 is the
runtime's resident memory (VmRSS of a process with meldlite imported and its kernels loaded,
measured once per model in an uncapped probe process that also compiles any kernel the model
needs), N the model file's bytes that are not experts (embeddings, attention, norms, routers,
output, the header: read every token, mapped), K the KV cache's bytes at the run's context,
and M a margin (--margin, default 32 MiB: the tokenizer, activations, scratch, the store's
bookkeeping, reads in flight; docs/experts.md measured 13-18 MiB above R0 + N + B for the
edge model). B is clamped to [the store's minimum (one layer's top-k experts), all expert
bytes]; a budget raised to the minimum is marked "min" (the cap is then too small for the
rule, and the run shows what happens). Without a cap meldlite runs without a budget.
With --mem-limit, meldlite instead gets the cap itself as `mem_limit` (the library sizes
the budget from its own RSS, KV cache and margin, docs/experts.md; the prompt is one
chunk) and the budget column shows what it chose.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))  # this working tree's meldlite, not an installed copy

from generate import EDGE, ENGINES, OUT, disable_repack, llamacpp_env, prompt_ids  # noqa: E402

CAPS = "1.0,0.75,0.5,0.4,0.25"
BIG = dict(n_layer=32, n_expert=128, n_ff_exp=384)  # over generate.EDGE: ~3.1 GB in Q4_K_M
MIB = 2**20


# -- the budget rule and the report (pure) ------------------------------------------


def parse_cap(text, file_bytes):
    """Bytes of a cap: "0.5" or "50%" of the file, "300MB" absolute, "none" None."""
    from meldlite.units import parse_size

    text = text.strip()
    if text.lower() == "none":
        return None
    if text.endswith("%"):
        return int(float(text[:-1]) / 100 * file_bytes)
    if re.fullmatch(r"[0-9]*\.?[0-9]+", text):
        return int(float(text) * file_bytes)
    return parse_size(text, "cap")


def fit_budget(cap, runtime, non_expert, kv, margin, minimum, experts):
    """(budget bytes, note) that the budget rule gives for `cap` bytes: cap - runtime -
    non-expert bytes - KV cache - margin, within [minimum, experts]; None without a cap."""
    if cap is None:
        return None, "none"
    budget = cap - runtime - non_expert - kv - margin
    if budget >= experts:
        return experts, "all"
    if budget < minimum:
        return minimum, "min"
    return budget, ""


def run_status(exit_code, oom_kills, timed_out, phases):
    """The status of a finished child: ok once it reported everything ("done"), else
    killed, timeout or failed with the last phase it reached."""
    if "done" in phases:
        return "ok"
    if timed_out:
        kind = "timeout"
    elif exit_code == -signal.SIGKILL or oom_kills:
        kind = "killed"
    else:
        kind = "failed"
    return f"{kind} ({phases[-1] if phases else 'starting'})"


def summarize(runs):
    """One row from the runs of a (model, cap, engine): status, medians of the runs that
    finished, the largest cgroup peak."""
    ok = [r for r in runs if r["status"] == "ok"]
    status = "ok" if len(ok) == len(runs) else runs[-1]["status"]
    if ok and len(ok) < len(runs):
        status += f", {len(ok)}/{len(runs)} ok"
    peaks = [r["peak"] for r in runs if r["peak"] is not None]
    row = {"status": status, "n_ok": len(ok), "peak": max(peaks) if peaks else None}
    for key in ("prefill_tok_s", "decode_tok_s", "read_bytes", "decode_read_per_token"):
        vals = [r[key] for r in (ok or runs) if r.get(key) is not None]
        row[key] = statistics.median(vals) if vals else None
    return row


def best_llamacpp(rows, key):
    """(engine, value) of the llama.cpp configuration with the highest `key` among those
    whose every run finished, or (None, None) when none did."""
    alive = [
        (e, r[key]) for e, r in rows.items() if e != "meldlite" and r["status"] == "ok" and r[key]
    ]
    return max(alive, key=lambda kv: kv[1]) if alive else (None, None)


def ratio_cells(rows):
    """Summary cells of one cap: meldlite decode, the best surviving llama.cpp and its
    decode, meldlite / it for decode and for prefill ("-" where either side is missing)."""
    mine = rows.get("meldlite")
    engine, theirs = best_llamacpp(rows, "decode_tok_s")
    _, theirs_pf = best_llamacpp(rows, "prefill_tok_s")
    ok = mine is not None and mine["status"] == "ok"

    def ratio(a, b):
        return f"{a / b:.2f}x" if ok and b else "-"

    return [
        f"{mine['decode_tok_s']:.2f}" if ok else (mine["status"] if mine else "-"),
        engine or "all killed or failed",
        f"{theirs:.2f}" if theirs else "-",
        ratio(mine and mine["decode_tok_s"], theirs),
        ratio(mine and mine["prefill_tok_s"], theirs_pf),
    ]


def fmt(value, spec, scale=1.0):
    return "-" if value is None else format(value / scale, spec)


def table_row(model, cap_label, engine, budget, row, bandwidth):
    """One markdown row of the main table."""
    per_tok = row["decode_read_per_token"]
    bound = bandwidth / per_tok if per_tok else None
    return (
        f"| {model} | {cap_label} | {engine} | {budget} | {row['status']} | "
        f"{fmt(row['prefill_tok_s'], '.2f')} | {fmt(row['decode_tok_s'], '.2f')} | "
        f"{fmt(row['read_bytes'], '.1f', 1e6)} | {fmt(per_tok, '.2f', 1e6)} | "
        f"{fmt(bound, '.1f')} | {fmt(row['peak'], '.0f', MIB)} |"
    )


HEADER = (
    "| model | cap | engine | meldlite budget | status | prefill tok/s | decode tok/s | "
    "MB read | decode MB read/token | storage bound tok/s | cgroup peak MiB |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)
SUMMARY_HEADER = (
    "| model | cap | meldlite decode tok/s | best llama.cpp surviving | its decode tok/s | "
    "meldlite / best, decode | meldlite / best, prefill |\n|---|---|---|---|---|---|---|"
)


def parse_proc_cgroup(text):
    """(1, path) of the v1 `memory` controller's line of /proc/<pid>/cgroup, else (2, path)
    of the v2 unified line `0::path`, else None."""
    unified = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if "memory" in controllers.split(","):
            return 1, path
        if hierarchy == "0" and controllers == "":
            unified = path
    return None if unified is None else (2, unified)


def cgroup_counter(text, key):
    """The value of `key` in a "key value" per line file (memory.oom_control, memory.events)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return 0


# -- memory cgroups -------------------------------------------------------------------

CGROUP_FS = Path("/sys/fs/cgroup")
# per version: limit, swap limit, peak, (file, key) of the OOM kill count
CGROUP_FILES = {
    1: (
        "memory.limit_in_bytes",
        "memory.memsw.limit_in_bytes",
        "memory.max_usage_in_bytes",
        ("memory.oom_control", "oom_kill"),
    ),
    2: ("memory.max", "memory.swap.max", "memory.peak", ("memory.events", "oom_kill")),
}
# The launcher: joins the cgroup ($0 is its cgroup.procs), then becomes the child
JOIN = 'echo $$ > "$0" || exit 97; exec "$@"'


class CgroupUnavailable(Exception):
    pass


def cgroup_base():
    """(version, directory) of this process's memory cgroup, in which children can be made
    (checked by making one); CgroupUnavailable with the reason otherwise."""
    found = parse_proc_cgroup(Path("/proc/self/cgroup").read_text())
    if found is None:
        raise CgroupUnavailable("/proc/self/cgroup names no memory cgroup")
    version, path = found
    if version == 1:
        base = CGROUP_FS / "memory" / path.lstrip("/")
    elif (CGROUP_FS / "cgroup.controllers").exists():
        base = CGROUP_FS / path.lstrip("/")
        try:  # children get the memory controller only if the parent hands it down
            (base / "cgroup.subtree_control").write_text("+memory")
        except OSError as e:
            raise CgroupUnavailable(f"cannot enable memory for children of {base}: {e}") from e
    else:
        raise CgroupUnavailable("no v1 memory controller and no cgroup v2 hierarchy")
    probe = base / f"memcap-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        raise CgroupUnavailable(f"cannot make a child cgroup under {base}: {e}") from e
    return version, base


class MemoryCgroup:
    """A child memory cgroup with a limit (None: none), removed on exit."""

    def __init__(self, version, base, name, limit):
        self.version, self.dir, self.limit = version, base / name, limit
        self.files = CGROUP_FILES[version]

    def __enter__(self):
        self.dir.mkdir()
        try:
            if self.limit is not None:
                limit_file, swap_file = self.files[:2]
                (self.dir / limit_file).write_text(str(self.limit))
                if (self.dir / swap_file).exists():  # no swapping around the cap
                    (self.dir / swap_file).write_text(str(self.limit if self.version == 1 else 0))
        except BaseException:
            self.dir.rmdir()
            raise
        return self

    def launcher(self, argv):
        """argv prefixed by a shell that moves itself into the cgroup, then execs argv."""
        return ["/bin/sh", "-c", JOIN, str(self.dir / "cgroup.procs"), *argv]

    def peak(self):
        try:
            return int((self.dir / self.files[2]).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self):
        name, key = self.files[3]
        try:
            return cgroup_counter((self.dir / name).read_text(), key)
        except OSError:
            return 0

    def __exit__(self, *exc):
        for _ in range(50):  # the last task may take a moment to leave after being reaped
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        self.dir.rmdir()


# -- runs (parent) ---------------------------------------------------------------------


@dataclass
class Setup:
    version: int
    base: Path
    timeout: float
    threads: int
    n_prompt: int
    n_decode: int
    mem_limit: bool = False  # meldlite sized by the library's mem_limit, not the rule
    runs: int = 0


def spawn(argv, env, timeout):
    """(exit code, rusage, stdout, stderr, timed out) of a child run to its end."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        deadline, timed_out = time.monotonic() + timeout, False
        try:
            while True:
                pid, status, usage = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    break
                if not timed_out and time.monotonic() > deadline:
                    os.kill(p.pid, signal.SIGKILL)
                    timed_out = True
                time.sleep(0.05)
        except BaseException:  # interrupted: no child left behind in the cgroup
            os.kill(p.pid, signal.SIGKILL)
            os.wait4(p.pid, 0)
            p.returncode = -signal.SIGKILL
            raise
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return p.returncode, usage, out.read().decode(), err.read().decode(), timed_out


def run_capped(setup, spec, limit):
    """Measurements of one run of `spec` in a fresh cgroup limited to `limit` bytes."""
    from meldlite.experts.io import drop_file_cache

    _, cached = drop_file_cache(spec["path"])
    env = llamacpp_env() if spec["engine"] != "meldlite" else dict(os.environ)
    setup.runs += 1
    name = f"memcap-{os.getpid()}-{setup.runs}"
    with MemoryCgroup(setup.version, setup.base, name, limit) as cg:
        argv = cg.launcher([sys.executable, __file__, "--child", json.dumps(spec)])
        code, usage, out, err, timed_out = spawn(argv, env, setup.timeout)
        peak, ooms = cg.peak(), cg.oom_kills()
    lines = [json.loads(s) for s in out.splitlines() if s.startswith("{")]
    phases = [d["phase"] for d in lines]
    res = {k: v for d in lines for k, v in d.items()}
    res.update(
        engine=spec["engine"],
        budget=spec.get("budget"),
        mem_limit=spec.get("mem_limit"),
        limit=limit,
        status=run_status(code, ooms, timed_out, phases),
        peak=peak,
        read_bytes=usage.ru_inblock * 512,  # the kernel's read_bytes >> 9
        cached_at_start=cached,
    )
    if res.get("decode_read") is not None:
        res["decode_read_per_token"] = res["decode_read"] / spec["n_decode"]
    if res["status"].startswith("failed"):
        res["stderr"] = err.strip().splitlines()[-3:]
    return res


def probe(path, n_ctx, threads):
    """The budget rule's figures of a model, from an uncapped child process."""
    out = subprocess.run(
        [sys.executable, __file__, "--probe", json.dumps([str(path), n_ctx, threads])],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"probe of {path} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sync_file(path):
    """Write back a file's dirty pages (a file just written), which POSIX_FADV_DONTNEED
    cannot drop."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_cap(setup, base, cap, budget, reps):
    """{engine: [measurements]} of `reps` repetitions at one cap, the engines alternating."""
    runs = {e: [] for e in ENGINES}
    for _ in range(reps):
        for engine in ENGINES:
            if runs[engine] and runs[engine][-1]["status"] != "ok":
                continue  # killed, failed or timed out once: not again
            spec = dict(base, engine=engine)
            if engine == "meldlite" and setup.mem_limit:
                spec.update(budget=None, mem_limit=cap)
            elif engine == "meldlite":
                spec["budget"] = budget
            runs[engine].append(run_capped(setup, spec, cap))
    return runs


def print_cap(name, label, budget_text, runs, rows, bandwidth):
    """The main table's rows of one cap, and the failures' last stderr lines."""
    for engine, row in rows.items():
        shown = budget_text if engine == "meldlite" else "-"
        print(table_row(name, label, engine, shown, row, bandwidth), flush=True)
    for engine, r in runs.items():
        for x in r:
            if "stderr" in x:
                print(f"  {engine} stderr: {' / '.join(x['stderr'])}", flush=True)
            if x["cached_at_start"] > 0.01:
                print(f"  {engine}: {x['cached_at_start']:.0%} of the file stayed cached")


def bench_model(setup, name, path, caps, reps, margin):
    """Print the tables of one model; returns every run's measurements."""
    from offload import disk_bandwidth

    sync_file(path)
    size = path.stat().st_size
    n_ctx = setup.n_prompt + setup.n_decode + 8
    p = probe(path, n_ctx, setup.threads)
    bandwidth = disk_bandwidth(path, max(4096, p["expert_bytes"] // p["n_experts"]))
    ids = prompt_ids(setup.n_prompt, p["n_vocab"])
    print(
        f"\n### {name}: {path.name}, {size / 1e6:.1f} MB, experts {p['expert_bytes'] / 1e6:.1f} MB, "
        f"cold random reads of one expert's size: {bandwidth / 1e6:.0f} MB/s\n\n"
        f"budget rule: B = cap - R0 {p['runtime'] / MIB:.1f} MiB (runtime RSS, measured) "
        f"- N {p['non_expert'] / 1e6:.1f} MB (non-expert bytes) - K {p['kv_bytes'] / 1e6:.2f} MB "
        f"(KV cache, n_ctx {n_ctx}) - M {margin / MIB:.0f} MiB (margin), within "
        f"[{p['minimum'] / 1e6:.2f} MB (minimum), {p['expert_bytes'] / 1e6:.1f} MB (all experts)]"
        f"\n\n{HEADER}",
        flush=True,
    )
    summary, raw = [], []
    for cap_text in caps:
        cap = parse_cap(cap_text, size)
        budget, note = fit_budget(
            cap,
            p["runtime"],
            p["non_expert"],
            p["kv_bytes"],
            margin,
            p["minimum"],
            p["expert_bytes"],
        )
        base = dict(
            path=str(path), ids=ids, n_decode=setup.n_decode, n_ctx=n_ctx, threads=setup.threads
        )
        runs = run_cap(setup, base, cap, budget, reps)
        raw += [dict(r, model=name, path=str(path), cap=cap) for e in runs for r in runs[e]]
        rows = {e: summarize(r) for e, r in runs.items()}
        label = "none" if cap is None else f"{cap_text} ({cap / 1e6:.0f} MB)"
        shown = "none" if budget is None else f"{budget / 1e6:.1f} MB"
        shown += f" ({note})" if note and budget is not None else ""
        if setup.mem_limit and cap is not None:
            shown = limit_budget_text(runs["meldlite"])
        print_cap(name, label, shown, runs, rows, bandwidth)
        summary.append(f"| {name} | {label} | " + " | ".join(ratio_cells(rows)) + " |")
    print(f"\n{SUMMARY_HEADER}\n" + "\n".join(summary), flush=True)
    return raw


# -- models ------------------------------------------------------------------------------


def shape_overrides(text):
    """{"n_layer": 2, ...} from "n_layer=2,n_expert=16"."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = int(value)
    return out


def f16_bytes(shape):
    """Bytes of a random qwen3moe file of `shape` in F16 (routers and norms in F32)."""
    s = shape
    attn = s.n_embd * s.head_dim * 2 * (s.n_head + s.n_head_kv)
    layer = 2 * (attn + 3 * s.n_expert * s.n_ff_exp * s.n_embd) + 4 * s.n_expert * s.n_embd
    return 2 * 2 * s.n_vocab * s.n_embd + s.n_layer * layer


def big_model_path(overrides):
    """The big qwen3moe (BIG over generate.EDGE, then `overrides`) in Q4_K_M by llama.cpp,
    written once into benchmarks/out/."""
    from helpers_models import Shape, llamacpp_quantize, write_random_model

    shape = Shape(**{**EDGE, **BIG, **overrides})
    tag = "".join(f"-{k}{v}" for k, v in sorted(overrides.items()))
    dst = OUT / f"memcap-big{tag}-q4_k_m.gguf"
    if dst.exists():
        return dst
    need = f16_bytes(shape)
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    avail = int(meminfo["MemAvailable"].split()[0]) * 1024
    OUT.mkdir(parents=True, exist_ok=True)
    disk = os.statvfs(OUT).f_bavail * os.statvfs(OUT).f_frsize
    if avail < 1.2 * need or disk < 1.5 * need:
        raise SystemExit(
            f"memcap: writing {dst.name} needs ~{need / 1e9:.1f} GB of memory and "
            f"~{1.5 * need / 1e9:.1f} GB of disk (F16 first); {avail / 1e9:.1f} GB / "
            f"{disk / 1e9:.1f} GB available"
        )
    print(f"writing {dst.name}: F16 {need / 1e9:.2f} GB first, then llama.cpp's Q4_K_M", flush=True)
    f16, tmp = OUT / f"memcap-big{tag}-f16.gguf", dst.with_suffix(".part")
    try:
        write_random_model(f16, "qwen3moe", shape=shape, dtype=np.float16, seed=16)
        llamacpp_quantize(f16, tmp, "Q4_K_M")
        tmp.rename(dst)
    finally:
        f16.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return dst


def resolve_model(name, overrides):
    if name == "big":
        return big_model_path(overrides)
    if name == "builtin":  # a copy: the built-in file itself warms meldlite's kernels
        import shutil

        from meldlite.data import default_model_path

        dst = OUT / "memcap-builtin.gguf"
        if not dst.exists():
            OUT.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(default_model_path(), dst)
        return dst
    if Path(name).suffix == ".gguf":
        return Path(name)
    from generate import model_path

    return Path(model_path(name))


# -- child processes ---------------------------------------------------------------------


def io_read_bytes():
    """Bytes this process has had read from storage (/proc/self/io read_bytes)."""
    with open("/proc/self/io") as f:
        return cgroup_counter(f.read().replace(":", ""), "read_bytes")


def emit(phase, **fields):
    """A JSON line for the parent: the phase reached and what was measured in it."""
    print(json.dumps({"phase": phase, **fields}), flush=True)


def timed_greedy(prefill, step, ids, n_decode):
    """Prefill `ids`, then decode n_decode greedy tokens; emits each phase's speed and
    storage reads. prefill(ids) and step(token) return the last position's logits."""
    r0, t0 = io_read_bytes(), time.perf_counter()
    logits = prefill(ids)
    r1, t1 = io_read_bytes(), time.perf_counter()
    emit("prefill", prefill_tok_s=len(ids) / (t1 - t0), prefill_read=r1 - r0)
    tokens = []
    for _ in range(n_decode):
        tokens.append(int(np.argmax(logits)))
        logits = step(tokens[-1])
    r2, t2 = io_read_bytes(), time.perf_counter()
    emit("decode", decode_tok_s=n_decode / (t2 - t1), decode_read=r2 - r1, tokens=tokens)


def limit_budget_text(runs):
    """The budget meldlite's mem_limit sizing chose (median over the runs that got that
    far), for the table's budget column."""
    got = [r["budget_bytes"] for r in runs if r.get("budget_bytes") is not None]
    return f"{statistics.median(got) / 1e6:.1f} MB (mem_limit)" if got else "- (mem_limit)"


def meldlite_child(spec):
    from offload import load_kernels

    load_kernels()
    import meldlite

    emit("kernels loaded")
    if spec.get("mem_limit"):  # the library sizes its budget; chunks of the prompt's size
        store = dict(mem_limit=spec["mem_limit"], n_batch=len(spec["ids"]))
    else:
        store = dict(mem_budget=spec["budget"])
    m = meldlite.load(spec["path"], n_ctx=spec["n_ctx"], n_threads=spec["threads"], **store)
    emit("model loaded", budget_bytes=m.stats().get("budget_bytes"))
    emit("model loaded")
    timed_greedy(
        lambda ids: m._eval(ids, all_logits=False)[-1],
        lambda tok: m._eval([tok], all_logits=False)[-1],
        spec["ids"],
        spec["n_decode"],
    )
    st = m.stats()
    m.close()
    emit(
        "done",
        hit_rate=st.get("hit_rate"),
        store_bytes_read=st.get("bytes_read"),
        read_total=io_read_bytes(),
    )


def llamacpp_child(spec):
    import llama_cpp

    if spec["engine"] == "llama.cpp no repack":
        disable_repack()
    emit("imported")
    llm = llama_cpp.Llama(
        spec["path"],
        n_ctx=spec["n_ctx"],
        n_batch=512,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        verbose=False,
    )
    emit("model loaded")

    def run(ids):
        llm.eval(ids)
        return llm.scores[llm.n_tokens - 1]

    timed_greedy(run, lambda tok: run([tok]), spec["ids"], spec["n_decode"])
    llm.close()
    emit("done", read_total=io_read_bytes())


def probe_child(path, n_ctx, threads):
    """Print the budget rule's figures: runtime RSS once the kernels are loaded, then the
    model's sizes (and a few tokens through the budgeted store, so that every kernel it
    needs is in Numba's cache before a capped run)."""
    from offload import load_kernels

    from meldlite.experts.io import memory_status

    load_kernels()
    runtime = memory_status()["VmRSS"]
    import meldlite

    m = meldlite.load(path, n_ctx=n_ctx, n_threads=threads, mem_budget="100%")
    m._eval(prompt_ids(8, m.cfg.n_vocab), all_logits=False)
    m._eval([3], all_logits=False)
    info, st = m.info(), m.stats()
    m.close()
    print(
        json.dumps(
            dict(
                runtime=runtime,
                non_expert=os.path.getsize(path) - st["expert_bytes"],
                kv_bytes=info["kv_bytes"],
                expert_bytes=st["expert_bytes"],
                minimum=st["min_budget_bytes"],
                n_experts=info["n_layer"] * info["n_expert"],
                n_vocab=info["n_vocab"],
            )
        )
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="edge-q4", help="names or .gguf paths, comma-separated")
    ap.add_argument("--big", action="store_true", help="add the ~3 GB model (generated once)")
    ap.add_argument("--big-shape", default="", help="Shape overrides of the big model, k=v,...")
    ap.add_argument("--caps", default=CAPS, help="fractions of the file, sizes or none")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=24)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--margin", default="32MiB", help="the budget rule's margin M")
    ap.add_argument(
        "--mem-limit",
        action="store_true",
        help="give meldlite the cap as mem_limit (its own sizing) instead of the rule's budget",
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    ap.add_argument("--json", type=Path, help="write every run's measurements to this file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        return (meldlite_child if spec["engine"] == "meldlite" else llamacpp_child)(spec)
    if args.probe:
        return probe_child(*json.loads(args.probe))
    try:
        version, base = cgroup_base()
    except CgroupUnavailable as e:
        print(f"memcap: skipped, no writable memory cgroup: {e}")
        return None
    from meldlite.units import parse_size

    setup = Setup(
        version, base, args.timeout, args.threads, args.prompt, args.decode, args.mem_limit
    )
    names = [n for n in args.models.split(",") if n] + (["big"] if args.big else [])
    overrides = shape_overrides(args.big_shape)
    paths = [resolve_model(n, overrides) for n in names]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}; cgroup v{version} under {base}; threads "
        f"{args.threads}; prompt {args.prompt} random tokens, {args.decode} greedy decode "
        f"tokens; median of {args.reps} runs, each a fresh process on a cold page cache; "
        f"1-min load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    raw = []
    for name, path in zip(names, paths):
        caps = args.caps.split(",")
        raw += bench_model(setup, name, path, caps, args.reps, parse_size(args.margin))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    print(f"\n(1-min load average {os.getloadavg()[0]:.2f} at the end)")
    return None


if __name__ == "__main__":
    main()
