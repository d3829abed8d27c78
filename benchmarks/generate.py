"""Prefill and decode speed of meldlite beside llama.cpp, same file, same run, per thread count.

    python benchmarks/generate.py [--threads 1,2] [--reps 3] [--prompt 128] [--decode 64]
                                  [--models edge-q4,edge-q8]

Models: `edge-q4`/`edge-q8` a random-weight qwen3moe of a realistic edge shape (24
layers, d_model 1024, 32 experts of 512, top-8, vocab 49152) in Q4_K_M / Q8_0 (llama.cpp's
quantizer), generated once into benchmarks/out/; `trained` is ../shared/models' F16
tinystories MoE, `trained-q4` its Q4_K_M.

For each model and each thread count (default 1, 2 and all cores when there are more),
three engines run on the same prompt: meldlite, llama.cpp as it loads by default (CPU
weight repacking into its interleaved layouts, "repack") and llama.cpp reading the file's
blocks in place ("no repack", llama.cpp's --no-repack: the model params' use_extra_bufts
off). llama.cpp's best configuration is, per thread count and per phase, the faster of
the two, and the ratios are meldlite / that best (higher is better for meldlite). The
scaling table gives each engine's speed at 2 (and more) threads over its own 1-thread
speed (llama.cpp: its best configuration at each count).

Each engine first warms up on the same tokens (JIT, page-in: a prefill of the prompt's
first WARMUP_PROMPT tokens and WARMUP_DECODE greedy decode steps; meldlite once per
model, llama.cpp in each of its child processes), then prefills the prompt from a fresh
context and decodes greedily; the table shows medians over --reps runs. The engines
alternate within each repetition, so a burst of load from other processes hits all.
llama.cpp runs in a child process with this process's environment minus the OpenMP wait
settings meldlite makes for itself (OMP_WAIT_POLICY, GOMP_SPINCOUNT): llama.cpp's own
OpenMP default (spinning workers), or with --llamacpp-wait passive sleeping workers.

On a shared machine, each measurement first waits (up to --quiet-wait seconds) until
other processes use less than 15% of a CPU, and is repeated (up to 3 tries) when they
used more than that while it ran (from /proc/stat, as benchmarks/kernels.py does); the
last line counts the measurements that stayed noisy.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "out"
SHARED = ROOT.parent / "shared" / "models"

sys.path.insert(0, str(ROOT / "benchmarks"))
# helpers_models (gguf) and kernels (Numba, meldlite's kernels) are imported where they are
# used, so that a llama.cpp child process (here and in memcap.py) loads neither

EDGE = dict(  # helpers_models.Shape fields
    n_vocab=49152,
    n_embd=1024,
    n_layer=24,
    n_head=16,
    n_head_kv=4,
    head_dim=64,
    n_ff=512,
    n_expert=32,
    n_expert_used=8,
    n_ff_exp=512,
    n_ctx=1024,
)


def model_path(name):
    from helpers_models import Shape, llamacpp_quantize, write_random_model

    OUT.mkdir(parents=True, exist_ok=True)
    if name.startswith("trained"):
        f16 = SHARED / "tinystories-moe-f16.gguf"
        if name == "trained":
            return f16
        dst = OUT / "trained-q4_k_m.gguf"
        return dst if dst.exists() else llamacpp_quantize(f16, dst, "Q4_K_M")
    f16 = OUT / "edge-f16.gguf"
    if not f16.exists():
        write_random_model(f16, "qwen3moe", shape=Shape(**EDGE), dtype=np.float16)
    kind = {"edge-q4": "Q4_K_M", "edge-q8": "Q8_0"}[name]
    dst = OUT / f"edge-{kind.lower()}.gguf"
    return dst if dst.exists() else llamacpp_quantize(f16, dst, kind)


def prompt_ids(n, n_vocab):
    return [1] + np.random.default_rng(0).integers(3, min(n_vocab, 4096), n - 1).tolist()


LLAMACPP_WAIT = "default"
QUIET = None
WARMUP_PROMPT, WARMUP_DECODE = 8, 2  # warm-up of both engines before they are timed


def time_llamacpp(path, ids, n_decode, threads, repack=True):
    """(prefill tok/s, decode tok/s) of llama.cpp, measured in a child process; repack False
    loads it as --no-repack does."""
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--llamacpp-child",
            json.dumps([str(path), ids, n_decode, threads, repack]),
        ],
        env=llamacpp_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def llamacpp_env():
    """This process's environment minus the OpenMP wait settings meldlite makes for itself
    (llama.cpp's own default), or with LLAMACPP_WAIT's policy."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if LLAMACPP_WAIT != "default":
        env["OMP_WAIT_POLICY"] = LLAMACPP_WAIT
    return env


def disable_repack():
    """Make llama-cpp-python load models as llama.cpp's --no-repack does: no extra
    (repacked) CPU buffer types (the model params' use_extra_bufts off)."""
    from llama_cpp import llama_cpp as capi

    defaults = capi.llama_model_default_params

    def no_repack():
        params = defaults()
        params.use_extra_bufts = False
        return params

    capi.llama_model_default_params = no_repack


def llamacpp_child(path, ids, n_decode, threads, repack):
    import llama_cpp

    if not repack:
        disable_repack()
    llm = llama_cpp.Llama(
        str(path),
        n_ctx=len(ids) + n_decode + 8,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def generate(ids, n_decode):
        llm.reset()  # a fresh context, as time_meldlite's cache.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(n_decode):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        return len(ids) / (t1 - t0), n_decode / (t2 - t1)

    generate(ids[:WARMUP_PROMPT], WARMUP_DECODE)  # warm-up, as bench() warms meldlite
    speeds = generate(ids, n_decode)
    llm.close()
    return speeds


def time_meldlite(model, ids, n_decode, threads):
    """(prefill tok/s, decode tok/s, prefill cpu ms/tok, decode cpu ms/tok)."""
    from meldlite.kernels import set_threads

    set_threads(threads)
    model.cache.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    logits = model._eval(ids, all_logits=False)
    t1, c1 = time.perf_counter(), time.process_time()
    for _ in range(n_decode):
        logits = model._eval([int(np.argmax(logits[-1]))], all_logits=False)
    t2, c2 = time.perf_counter(), time.process_time()
    return (
        len(ids) / (t1 - t0),
        n_decode / (t2 - t1),
        (c1 - c0) / len(ids) * 1e3,
        (c2 - c1) / n_decode * 1e3,
    )


class Quiet:
    """Run measurements while other processes leave the CPUs alone (best effort)."""

    def __init__(self, max_wait, tries=3, limit=0.15):
        self.max_wait, self.tries, self.limit = max_wait, tries, limit
        self.measured = self.retried = self.noisy = 0

    def foreign(self, fn):
        """(result of fn(), CPU-seconds per second used by other processes meanwhile)."""
        from kernels import busy_cpu_seconds

        busy0, own0, wall0 = busy_cpu_seconds(), sum(os.times()[:4]), time.perf_counter()
        result = fn()
        if busy0 is None:
            return result, 0.0
        used = busy_cpu_seconds() - busy0 - (sum(os.times()[:4]) - own0)
        return result, used / (time.perf_counter() - wall0)

    def wait(self):
        end = time.perf_counter() + self.max_wait
        while time.perf_counter() < end:
            if self.foreign(lambda: time.sleep(0.5))[1] < self.limit:
                return

    def __call__(self, fn):
        self.measured += 1
        for _attempt in range(self.tries):
            self.wait()
            result, load = self.foreign(fn)
            if load < self.limit:
                return result
            self.retried += 1
        self.noisy += 1
        return result


def bytes_per_token(model):
    """Weight bytes one decoded token reads: every 2-D matrix but the embedding, and the
    routed experts' matrices k/n_expert of the time."""
    from meldlite.model import output_matrix

    g, cfg = model.gguf, model.cfg
    out_name = output_matrix(cfg, model.weights).name
    total = 0.0
    for name in g.tensor_names():
        t = g.tensor(name)
        if len(t.shape) < 2 or (name == "token_embd.weight" and out_name != name):
            continue
        share = (
            cfg.n_expert_used / cfg.n_expert
            if "_exps" in name or (".ffn_" in name and name.split(".")[2].isdigit())
            else 1.0
        )
        total += t.nbytes * share
    return total


ENGINES = ("meldlite", "llama.cpp repack", "llama.cpp no repack")


def bench(name, args, threads):
    """{(engine, n_threads): (median prefill tok/s, median decode tok/s)} and the model."""
    import meldlite

    path = model_path(name)
    model = meldlite.load(path, n_ctx=args.prompt + args.decode + 8, n_threads=max(threads))
    ids = prompt_ids(args.prompt, model.cfg.n_vocab)
    time_meldlite(model, ids[:WARMUP_PROMPT], WARMUP_DECODE, max(threads))  # as the child's
    runs = {(e, n): [] for e in ENGINES for n in threads}
    for n in threads:
        for _ in range(args.reps):
            runs["llama.cpp repack", n].append(
                QUIET(lambda n=n: time_llamacpp(path, ids, args.decode, n, True))
            )
            runs["meldlite", n].append(QUIET(lambda n=n: time_meldlite(model, ids, args.decode, n)))
            runs["llama.cpp no repack", n].append(
                QUIET(lambda n=n: time_llamacpp(path, ids, args.decode, n, False))
            )
    med = {k: tuple(statistics.median(r[i] for r in v) for i in range(2)) for k, v in runs.items()}
    return med, model


def best_llamacpp(med, n, phase):
    return max(med["llama.cpp repack", n][phase], med["llama.cpp no repack", n][phase])


def print_model(name, med, model, threads):
    path = model_path(name)
    print(
        f"\n{name}: {path.stat().st_size / 1e6:.1f} MB, "
        f"{bytes_per_token(model) / 1e6:.1f} MB of weights read per decoded token\n"
    )
    print(
        "| threads | meldlite prefill | llama.cpp repack | llama.cpp no repack | "
        "meldlite / best | meldlite decode | llama.cpp repack | llama.cpp no repack | "
        "meldlite / best |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in threads:
        cells = []
        for phase in (0, 1):
            vals = [med[e, n][phase] for e in ENGINES]
            ratio = vals[0] / best_llamacpp(med, n, phase)
            cells += [f"{v:.1f}" for v in vals] + [f"**{ratio:.2f}**"]
        print(f"| {n} | " + " | ".join(cells) + " |")


def print_scaling(results, threads):
    more = [n for n in threads if n > 1]
    if 1 not in threads or not more:
        return
    head = " | ".join(
        f"{e} {k} x{n}"
        for n in more
        for e in ("meldlite", "llama.cpp best")
        for k in ("prefill", "decode")
    )
    print(f"\nScaling over each engine's own 1-thread speed:\n\n| model | {head} |")
    print("|---" * (1 + 4 * len(more)) + "|")
    for name, med in results.items():
        cells = []
        for n in more:
            for phase in (0, 1):
                cells.append(f"{med['meldlite', n][phase] / med['meldlite', 1][phase]:.2f}x")
            for phase in (0, 1):
                cells.append(f"{best_llamacpp(med, n, phase) / best_llamacpp(med, 1, phase):.2f}x")
        print(f"| {name} | " + " | ".join(cells) + " |")


def thread_counts(text):
    if text:
        return sorted({int(n) for n in text.split(",")})
    return sorted({1, 2, os.cpu_count() or 1})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="", help="comma-separated (default: 1, 2, all cores)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--models", default="edge-q4,edge-q8")
    ap.add_argument(
        "--llamacpp-wait",
        choices=["default", "passive"],
        default="default",
        help="OpenMP wait policy of llama.cpp's threads (default: its own, spinning)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait for a quiet machine before each measurement",
    )
    ap.add_argument("--llamacpp-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global LLAMACPP_WAIT, QUIET
    LLAMACPP_WAIT = args.llamacpp_wait
    QUIET = Quiet(args.quiet_wait)
    if args.llamacpp_child:
        print(json.dumps(llamacpp_child(*json.loads(args.llamacpp_child))))
        return
    threads = thread_counts(args.threads)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, threads {threads}, prompt {args.prompt} tokens, "
        f"decode {args.decode} tokens, median of {args.reps} runs (tokens/s); llama.cpp OpenMP "
        f"wait policy {args.llamacpp_wait}; 1-min load average {os.getloadavg()[0]:.2f} before"
    )
    results = {}
    for name in args.models.split(","):
        med, model = bench(name, args, threads)
        results[name] = med
        print_model(name, med, model, threads)
    print_scaling(results, threads)
    import numba  # the layer is known once a parallel loop has run
    from kernels import median_time, memory_bandwidth

    bw = [
        QUIET(lambda: memory_bandwidth(1.0, lambda fn: median_time(fn, 5))) / 1e9 for _ in range(3)
    ]
    print(
        f"\nmemory read bandwidth in this run (parallel XOR over 1 GiB, {max(threads)} threads): "
        f"{statistics.median(bw):.1f} GB/s (runs: {', '.join(f'{b:.1f}' for b in bw)}); "
        f"meldlite ran on Numba's {numba.threading_layer()} threading layer"
    )
    print(
        f"1-min load average {os.getloadavg()[0]:.2f} after; {QUIET.measured} measurements, "
        f"{QUIET.retried} retried because other processes used > {QUIET.limit:.0%} of a CPU, "
        f"{QUIET.noisy} still noisy after {QUIET.tries} tries"
    )


if __name__ == "__main__":
    main()
