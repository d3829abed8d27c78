"""Expert offloading: decode speed, memory and I/O under a memory budget.

    python benchmarks/offload.py [--models trained,trained-q4,edge-q4]
        [--budgets 100,50,25,12.5] [--storage cold,200MB/s] [--policies lru,lfu,forecast]
        [--prefetch off,on] [--prefetch-depth 1,2] [--prefetch-top 0,5] [--mechanisms pread]
        [--prompt 32] [--decode 32] [--reps 1] [--no-llamacpp] [--adaptive THRESHOLDS]
    python benchmarks/offload.py --early-routing [--rounds 3] [--reps 3] [--budgets 25]
        [--storage cold,200MB/s]

Each model is packed into meldlite's per-expert layout (one expert = one read),
profiled on the first half of ../shared/models/valid.txt and replayed on stories
from the second half (held out): a story's first --prompt tokens are the prompt,
its next --decode tokens are fed one at a time (teacher forcing, so every
configuration routes exactly the same tokens), and only those decode steps are
timed. Every configuration runs in a fresh process that first drops the packed
file from the page cache (cold storage); "200MB/s" additionally emulates storage
of that bandwidth (a measurement aid, see meldlite.experts.io.Throttle).

Printed per configuration (medians over --reps stories): decode tokens/s,
seconds/token, the storage floor (bytes the run read per token / bandwidth) and
the optimum floor (bytes per token that Belady's offline MIN would read with the
same slots, / bandwidth: no policy, with or without prefetch, reads less), hit
rate, MB read per token, stall seconds per token, prefetch precision/recall,
peak RSS and the budget promise R0 + N + B (R0: the interpreter with meldlite's
kernels loaded, N: non-expert bytes, B: budget). llama.cpp runs the original
(stacked) file on the same tokens in the same run (all weights mapped, no
budget) as the peer.

--early-routing: SmallThinker's router reads the layer input, so the store learns a
layer's exact experts before that layer's attention (`ExpertStore.announce`). On a
random-weight SmallThinker file shaped like SmallThinker-4BA0.6B (its hidden size,
heads, 32 experts of 768, top-4; 8 of its 32 layers; llama.cpp's Q4_0), packed,
random teacher-forced tokens: no prefetch, the route guesses alone, the guesses plus
the exact early loads (the default), and the exact early loads alone. Each row is
--rounds fresh processes (rows interleaved, cold page cache each), each the median
over --reps token sequences; printed: the median over rounds and the range.
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
sys.path.insert(0, str(ROOT))  # this working tree's meldlite, not an installed copy
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "out"
SHARED = ROOT.parent / "shared" / "models"

MODELS = {"trained": "trained", "trained-q4": "trained-q4", "edge-q4": "edge-q4"}
PROFILE_TOKENS = {"trained": 40000, "trained-q4": 40000, "edge-q4": 6000}
DECODE = {
    "trained": 96,
    "trained-q4": 96,
    "edge-q4": 32,
}  # decode tokens per story (--decode overrides)


# -- preparation (parent process) ------------------------------------------------


def stories():
    text = (SHARED / "valid.txt").read_text(encoding="utf-8")
    docs = [s.strip("\n") for s in text.split("<|endoftext|>")]
    docs = [d for d in docs if d.strip()]
    half = len(docs) // 2
    return docs[:half], docs[half:]


def prepare(name):
    """(stacked source, packed file, profile file) of a benchmark model."""
    from generate import model_path

    from meldlite.formats import pack

    src = Path(model_path(name))
    packed = OUT / f"offload-{name}-packed.gguf"
    if not packed.exists():
        pack(src, packed, "SRC")
    prof = OUT / f"offload-{name}-profile.json"
    if not prof.exists():
        import meldlite
        from meldlite.experts.profile import build_profile
        from meldlite.formats.profile import save_profile

        train, _ = stories()
        m = meldlite.load(packed, n_ctx=512)
        p = build_profile(
            m,
            "<|endoftext|>".join(train),
            max_tokens=PROFILE_TOKENS[name],
            text_name="valid.txt, first half",
        )
        save_profile(p, prof)
        m.close()
    return src, packed, prof


def replay_tokens(tokenizer_model, n_prompt, n_decode, reps):
    """reps (prompt ids, decode ids) from held-out stories long enough for both."""
    _, held = stories()
    out = []
    for doc in held:
        ids = tokenizer_model.tokenize(doc, add_bos=True)
        if len(ids) >= n_prompt + n_decode:
            out.append((ids[:n_prompt], ids[n_prompt : n_prompt + n_decode]))
        if len(out) == reps:
            break
    return out


class _Trace:
    """A route observer (`Model.route_observers`): each decode step's experts per layer."""

    def __init__(self):
        self.steps, self.on = [], False

    def __call__(self, layer, x, ids, weights):
        if self.on:
            self.steps.append((layer, np.unique(ids[ids >= 0])))


def belady_loads(trace, n_expert, sizes, slots_by_size):
    """Loads Belady's MIN needs for the trace with those slots (per size class).
    Filling an empty slot is free (as if the cache started with whatever suits
    the trace best), so this is a lower bound for any policy and any prefetch."""
    keys = [[layer * n_expert + int(e) for e in es] for layer, es in trace]
    nxt_use = {}
    future = [None] * len(keys)
    for i in range(len(keys) - 1, -1, -1):
        future[i] = {g: nxt_use.get(g, float("inf")) for g in keys[i]}
        for g in keys[i]:
            nxt_use[g] = i
    cached = {s: {} for s in slots_by_size}  # size -> {g: next use}
    loads = 0
    for i, ks in enumerate(keys):
        for g in ks:
            c = cached[int(sizes[g])]
            if g not in c and len(c) >= slots_by_size[int(sizes[g])]:
                loads += 1
                victims = [h for h in c if h not in ks]
                if victims:
                    del c[max(victims, key=lambda h: c[h])]
            c[g] = future[i][g]
    return loads


def trace_and_opt(packed, reps_tokens, budgets):
    """Decode-step expert traces (identical in every configuration: same tokens,
    bit-identical routing) and, per budget, Belady's bytes per decode token."""
    import meldlite
    from meldlite.experts.io import DIO_ALIGN
    from meldlite.experts.plan import ExpertPlan
    from meldlite.experts.pools import split_budget
    from meldlite.units import parse_budget

    m = meldlite.load(packed, n_ctx=512)
    plan = ExpertPlan(m.gguf, m.cfg, DIO_ALIGN)  # the slots of the default (direct) store
    tr = _Trace()
    m.route_observers.append(tr)
    per_rep = []
    for prompt, dec in reps_tokens:
        m.cache.reset()
        m._eval(prompt, all_logits=False)
        tr.on, tr.steps = True, []
        for t in dec:
            m._eval([t], all_logits=False)
        tr.on = False
        per_rep.append(list(tr.steps))
    out = {}
    for b in budgets:
        budget = parse_budget(f"{b}%", plan.expert_bytes)
        slots, _ = split_budget(budget, plan.nbytes)
        vals = [
            belady_loads(steps, m.cfg.n_expert, plan.nbytes, slots)
            * plan.read_bytes.mean()
            / len(reps_tokens[0][1])
            for steps in per_rep
        ]
        out[b] = statistics.median(vals)
    n_expert_bytes = plan.expert_bytes
    m.close()
    return out, n_expert_bytes


def disk_bandwidth(path, nbytes, n=24):
    """Cold random reads of `nbytes` from `path`: bytes per second."""
    from meldlite.experts.io import drop_range

    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        buf = bytearray(nbytes)
        rng = np.random.default_rng(0)
        offs = [int(o) // 4096 * 4096 for o in rng.integers(0, size - nbytes, n)]
        for o in offs:
            drop_range(fd, o, nbytes)
        t0 = time.perf_counter()
        for o in offs:
            os.preadv(fd, [buf], o)
        dt = time.perf_counter() - t0
        for o in offs:
            drop_range(fd, o, nbytes)
        return n * nbytes / dt
    finally:
        os.close(fd)


def llamacpp_decode(path, reps_tokens, threads, cold):
    """llama.cpp decode tokens/s on the same teacher-forced tokens (median over reps)."""
    import llama_cpp

    from meldlite.experts.io import drop_file_cache

    rates = []
    for prompt, dec in reps_tokens:
        if cold:
            drop_file_cache(path)
        llm = llama_cpp.Llama(
            str(path),
            n_ctx=len(prompt) + len(dec) + 8,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        llm.eval(prompt)
        t0 = time.perf_counter()
        for t in dec:
            llm.eval([t])
        rates.append(len(dec) / (time.perf_counter() - t0))
        llm.close()
    return statistics.median(rates)


def adaptive(name, thresholds, n_stories, threads, decode_spec):
    """Adaptive top-k on held-out stories: KL from the full top-k run, top-1
    agreement, perplexity, share of routed experts skipped; and decode speed
    at 25% / 200MB/s with prefetch (the --adaptive table)."""
    import meldlite
    from meldlite.metrics import kl_divergence, log_softmax, top1_agreement

    _, packed, _prof = prepare(name)
    _, held = stories()
    full = meldlite.load(packed, n_ctx=512, n_threads=threads)
    docs = [full.tokenize(d)[:512] for d in held[:n_stories]]
    ref = [full.logits(d) for d in docs]
    full.close()

    def nll(logits, ids):
        lp = log_softmax(logits)
        return -lp[np.arange(len(ids) - 1), np.asarray(ids[1:])].sum(), len(ids) - 1

    print(
        f"\n### adaptive top-k, {name}: {n_stories} held-out stories "
        f"({sum(len(d) for d in docs)} tokens), resident store"
    )
    print(
        "| min_expert_weight | mean KL | top-1 agreement | perplexity | experts skipped | "
        "decode tok/s at 25%, 200MB/s | MB read/token |"
    )
    print("|---|---|---|---|---|---|---|")
    for t in [0.0] + thresholds:
        m = meldlite.load(packed, n_ctx=512, n_threads=threads, min_expert_weight=t or None)
        kl, agree, tot, n = [], [], 0.0, 0
        for d, r in zip(docs, ref):
            lg = m.logits(d)
            kl.append(kl_divergence(r, lg).mean())
            agree.append(top1_agreement(r, lg))
            a, b = nll(lg, d)
            tot, n = tot + a, n + b
        st = m.stats()
        m.close()
        spec = dict(
            decode_spec,
            budget="25%",
            throttle="200MB/s",
            prefetch=True,
            min_expert_weight=t or None,
        )
        sm = summarize(run_config(spec), 200e6, 0, 0)
        print(
            f"| {t:g} | {np.mean(kl):.4f} | {np.mean(agree):.3f} | {np.exp(tot / n):.3f} | "
            f"{st['experts_skipped'] / max(1, st['routed_slots']):.3f} | {sm['tok_s']:.1f} | "
            f"{sm['mb_tok']:.2f} |",
            flush=True,
        )


# -- one configuration (child process) ----------------------------------------------


def load_kernels():
    """Load meldlite's compiled kernels (Numba cache) by running the built-in model once,
    then let it go, so that a measured model starts with its kernels in memory."""
    import gc

    import meldlite

    warm = meldlite.load(n_ctx=64)
    warm.logits(warm.tokenize("Once upon a time"))
    warm.close()
    del warm
    gc.collect()


def worker(spec):
    """Run one configuration and print a JSON line of measurements."""
    import meldlite
    from meldlite.experts.io import drop_file_cache, memory_status, reset_peak_rss

    load_kernels()
    reset_peak_rss()
    r0 = memory_status().get("VmRSS", 0)
    cold = drop_file_cache(spec["path"])
    m = meldlite.load(
        spec["path"],
        n_ctx=512,
        n_threads=spec["threads"],
        mem_budget=spec.get("budget"),
        cache_policy=spec.get("policy"),
        prefetch=spec.get("prefetch", False),
        io_throttle=spec.get("throttle"),
        profile=spec.get("profile"),
        expert_io=spec.get("mechanism"),
        min_expert_weight=spec.get("min_expert_weight"),
    )
    pf = getattr(m.store, "prefetcher", None)
    for attr in ("prefetch_depth", "prefetch_top"):  # prefetcher attributes (experiments)
        if spec.get(attr) and pf is not None:
            setattr(pf, attr, spec[attr])
    if pf is not None and spec.get("exact_early") is not None:
        pf.exact_early = spec["exact_early"]  # announced experts loaded first
    if pf is not None and spec.get("guesses") is False:
        pf.prefetch_depth = 0  # no route guesses: only the announced loads
    res = []
    for prompt, dec in spec["tokens"]:
        m.cache.reset()
        t0 = time.perf_counter()
        m._eval(prompt, all_logits=False)
        t1 = time.perf_counter()
        s0 = m.stats()
        for t in dec:
            m._eval([t], all_logits=False)
        t2 = time.perf_counter()
        s1 = m.stats()
        d = {
            k: s1[k] - s0[k]
            for k in s1
            if isinstance(s1[k], (int, float))
            and not isinstance(s1[k], bool)
            and k in s0
            and isinstance(s0[k], (int, float))
        }
        res.append({"prefill_s": t1 - t0, "decode_s": t2 - t1, "n_decode": len(dec), "delta": d})
    st = m.stats()
    m.close()
    mem = memory_status()
    print(
        json.dumps(
            {
                "runs": res,
                "peak_rss": mem.get("VmHWM", 0),
                "r0": r0,
                "cold": cold,
                "budget_bytes": st.get("budget_bytes"),
                "expert_bytes": st.get("expert_bytes"),
                "cache_bytes": st.get("cache_bytes"),
            }
        )
    )


def run_config(spec):
    p = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    if p.returncode != 0:
        raise RuntimeError(f"worker failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------


def summarize(r, bw, opt_bytes, non_expert):
    runs = r["runs"]

    def med(f):
        return statistics.median(f(x["delta"], x) for x in runs)

    s_tok = med(lambda d, x: x["decode_s"] / x["n_decode"])
    mb_tok = med(lambda d, x: d.get("bytes_read", 0) / x["n_decode"])
    budget = r["budget_bytes"] or r["expert_bytes"] or 0
    return {
        "tok_s": 1 / s_tok,
        "s_tok": s_tok,
        "floor": mb_tok / bw,
        "opt_floor": opt_bytes / bw,
        "hit": med(lambda d, x: d.get("expert_hits", 0) / max(1, d.get("expert_uses", 1))),
        "mb_tok": mb_tok / 1e6,
        "stall": med(lambda d, x: d.get("stall_seconds", 0) / x["n_decode"]),
        # routing level: share of the next layer's experts the router guess got right
        "pred": med(lambda d, x: d.get("predicted_right", 0) / max(1, d.get("predicted", 0))),
        # I/O level: prefetched loads that were used, and the share of those in time
        "used": med(lambda d, x: d.get("prefetch_useful", 0) / max(1, d.get("prefetch_issued", 0))),
        "on_time": med(
            lambda d, x: 1 - d.get("prefetch_late", 0) / max(1, d.get("prefetch_useful", 0))
        ),
        "peak": r["peak_rss"] / 2**20,
        "promise": (r["r0"] + non_expert + budget) / 2**20,
        "over": (r["peak_rss"] - r["r0"] - non_expert - budget) / 2**20,
    }


# -- early routing (SmallThinker) -----------------------------------------------------

# SmallThinker-4BA0.6B's layer (config.json: hidden 1536, 12/2 heads of 128, 32 experts of
# 768, top-4); 8 of its 32 layers keep the file at ~0.5 GB
SMALLTHINKER = dict(
    n_embd=1536,
    n_layer=8,
    n_head=12,
    n_head_kv=2,
    head_dim=128,
    n_expert=32,
    n_expert_used=4,
    n_ff_exp=768,
    n_ctx=512,
)
EARLY_ROWS = {  # label -> (prefetch, route guesses, exact early loads)
    "no prefetch": (False, None, None),
    "guesses": (True, True, False),
    "guesses + exact early (default)": (True, True, True),
    "exact early only": (True, False, True),
}


def prepare_smallthinker():
    """(Q4_0 file by llama.cpp, its packed layout) of the benchmark's SmallThinker."""
    from helpers_models import Shape, llamacpp_quantize, write_random_model

    from meldlite.formats import pack

    q4 = OUT / "offload-smallthinker-q4_0.gguf"
    packed = OUT / "offload-smallthinker-packed.gguf"
    if not packed.exists():
        OUT.mkdir(exist_ok=True)
        f16 = OUT / "offload-smallthinker-f16.gguf"
        write_random_model(f16, "smallthinker", Shape(**SMALLTHINKER), np.float16, seed=11)
        llamacpp_quantize(f16, q4, "Q4_0")
        f16.unlink()
        pack(q4, packed, "SRC")
    return q4, packed


def early_routing(args):
    """The --early-routing table: decode with and without the exact early loads."""
    _, packed = prepare_smallthinker()
    rng = np.random.default_rng(0)
    n_decode = args.decode or 24
    toks = [
        (
            [1] + rng.integers(3, 4000, args.prompt - 1).tolist(),
            rng.integers(3, 4000, n_decode).tolist(),
        )
        for _ in range(args.reps)
    ]
    from meldlite.options import DEFAULT_POLICY
    from meldlite.units import parse_rate

    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}; {packed.name}, {packed.stat().st_size / 1e6:.0f} MB; "
        f"threads {args.threads}; prompt {args.prompt}, {n_decode} decode tokens "
        f"(random, teacher-forced); {args.reps} sequences per process, {args.rounds} "
        f"rounds; policy {DEFAULT_POLICY}; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print(
        "\n| budget | storage | configuration | decode tok/s (range) | s/token | stall s/token "
        "| MB read/token | hit rate | prefetches used / in time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b in (float(x) for x in args.budgets.split(",")):
        for storage in args.storage.split(","):
            throttle = None if storage == "cold" else storage
            bw = parse_rate(throttle) if throttle else 1e9
            out = {label: [] for label in EARLY_ROWS}
            for r in range(args.rounds):
                labels = list(EARLY_ROWS)
                labels = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotate
                for label in labels:
                    prefetch, guesses, exact = EARLY_ROWS[label]
                    spec = dict(
                        path=str(packed),
                        threads=args.threads,
                        tokens=toks,
                        budget=f"{b}%",
                        policy=DEFAULT_POLICY,
                        prefetch=prefetch,
                        throttle=throttle,
                        guesses=guesses,
                        exact_early=exact,
                    )
                    out[label].append(summarize(run_config(spec), bw, 0, 0))
            for label, rows in out.items():
                med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
                rates = [r["tok_s"] for r in rows]
                used = f"{med['used']:.2f} / {med['on_time']:.2f}" if EARLY_ROWS[label][0] else "-"
                print(
                    f"| {b:g}% | {storage} | {label} | {med['tok_s']:.2f} "
                    f"({min(rates):.2f}-{max(rates):.2f}) | {med['s_tok']:.4f} | "
                    f"{med['stall']:.4f} | {med['mb_tok']:.1f} | {med['hit']:.3f} | {used} |",
                    flush=True,
                )
    print(f"(load average {os.getloadavg()[0]:.2f} at the end)", flush=True)


def variants(args):
    """(prefetch, depth, top) per row: without prefetch once, with it per depth and top."""
    for pf in args.prefetch.split(","):
        if pf != "on":
            yield pf, 1, 0
            continue
        for depth in (int(d) for d in args.prefetch_depth.split(",")):
            for top in (int(t) for t in args.prefetch_top.split(",")):
                yield pf, depth, top


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--models", default="trained,trained-q4,edge-q4")
    ap.add_argument("--budgets", default="100,50,25,12.5")
    ap.add_argument("--storage", default="cold,200MB/s")
    ap.add_argument("--policies", default="lru,lfu,forecast")
    ap.add_argument("--prefetch", default="off,on")
    ap.add_argument("--mechanisms", default="direct")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument(
        "--decode",
        type=int,
        default=None,
        help="decode tokens per story (default: 96 for the trained models, 32 for edge-q4)",
    )
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument(
        "--adaptive",
        default=None,
        metavar="THRESHOLDS",
        help="only the adaptive top-k table, e.g. 0.1,0.2,0.3 (on the first --models)",
    )
    ap.add_argument("--adaptive-stories", type=int, default=40)
    ap.add_argument(
        "--early-routing",
        action="store_true",
        help="only the SmallThinker early-routing table (exact early loads or not)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="processes per --early-routing row")
    ap.add_argument(
        "--prefetch-depth", default="1", help="layers guessed ahead, e.g. 1,2 (prefetch rows only)"
    )
    ap.add_argument(
        "--prefetch-top",
        default="0",
        help="guesses per layer, e.g. 0,5,3 (0: the model's top-k; prefetch rows only)",
    )
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.early_routing:
        return early_routing(args)
    if args.adaptive:
        import meldlite

        name = args.models.split(",")[0]
        _, packed, prof = prepare(name)
        m = meldlite.load(packed, n_ctx=64)
        toks = replay_tokens(m, args.prompt, args.decode or DECODE[name], args.reps)
        m.close()
        from meldlite.experts.factory import DEFAULT_POLICY

        spec = {
            "path": str(packed),
            "threads": args.threads,
            "tokens": toks,
            "policy": DEFAULT_POLICY,
            "profile": str(prof),
        }
        return adaptive(
            name,
            [float(t) for t in args.adaptive.split(",")],
            args.adaptive_stories,
            args.threads,
            spec,
        )
    import meldlite
    from meldlite.units import parse_rate

    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}; threads {args.threads}; prompt {args.prompt} tokens, "
        f"then decode tokens (teacher-forced, held-out stories); median over {args.reps} stories; "
        f"every row a fresh process on a cold page cache",
        flush=True,
    )
    for name in args.models.split(","):
        src, packed, prof = prepare(name)
        n_decode = args.decode or DECODE[name]
        tok_model = meldlite.load(packed, n_ctx=64)
        toks = replay_tokens(tok_model, args.prompt, n_decode, args.reps)
        tok_model.close()
        budgets = [float(b) for b in args.budgets.split(",")]
        opt, expert_bytes = trace_and_opt(packed, toks, budgets)
        non_expert = packed.stat().st_size - expert_bytes
        from meldlite.formats import read_gguf

        g = read_gguf(packed)
        one = sum(n for _, n in g.expert_ranges(0, 0))
        disk = disk_bandwidth(packed, one)
        print(
            f"\n### {name}: {packed.name}, {packed.stat().st_size / 1e6:.1f} MB, experts "
            f"{expert_bytes / 1e6:.1f} MB ({one / 1e3:.0f} kB each), non-expert {non_expert / 1e6:.1f} MB; "
            f"cold random {one / 1e3:.0f} kB reads from this disk: {disk / 1e6:.0f} MB/s; "
            f"{n_decode} decode tokens per story; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        base = {"path": str(packed), "threads": args.threads, "tokens": toks}
        if not args.no_llamacpp:
            lc_cold = llamacpp_decode(src, toks, args.threads, cold=True)
            lc_warm = llamacpp_decode(src, toks, args.threads, cold=False)
        resident = summarize(run_config(base), disk, 0, non_expert)
        print(
            f"resident (all experts mapped, cold file): decode {resident['tok_s']:.1f} tok/s, "
            f"peak RSS {resident['peak']:.0f} MiB",
            flush=True,
        )
        if not args.no_llamacpp:
            print(
                f"llama.cpp on {src.name} (stacked, all mapped): decode {lc_cold:.1f} tok/s cold, "
                f"{lc_warm:.1f} tok/s warm; meldlite resident / llama.cpp cold = "
                f"{resident['tok_s'] / lc_cold:.2f}",
                flush=True,
            )
        print(
            "\n| budget | storage | io | policy | prefetch | decode tok/s | s/token | floor s/token "
            "(read/bw) | optimum floor | hit rate | MB read/token | stall s/token | guessed right | "
            "prefetches used / in time | peak RSS MiB | promise MiB | over promise MiB |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for b in budgets:
            for storage in args.storage.split(","):
                throttle = None if storage == "cold" else storage
                bw = disk if throttle is None else parse_rate(throttle)
                for mech in args.mechanisms.split(","):
                    for pol in args.policies.split(","):
                        for pf, depth, top in variants(args):
                            spec = dict(
                                base,
                                budget=f"{b}%",
                                policy=pol,
                                prefetch=pf == "on",
                                throttle=throttle,
                                mechanism=mech,
                                profile=None if pol == "lru" else str(prof),
                                prefetch_depth=depth,
                                prefetch_top=top,
                            )
                            s = summarize(run_config(spec), bw, opt[b], non_expert)
                            label = (
                                pf
                                + (f" (depth {depth})" if depth > 1 else "")
                                + (f" (top {top})" if top else "")
                            )
                            print(
                                f"| {b:g}% | {storage} | {mech} | {pol} | {label} | {s['tok_s']:.1f} | "
                                f"{s['s_tok']:.4f} | {s['floor']:.4f} | {s['opt_floor']:.4f} | "
                                f"{s['hit']:.3f} | {s['mb_tok']:.2f} | {s['stall']:.4f} | "
                                + (
                                    f"{s['pred']:.2f} | {s['used']:.2f} / {s['on_time']:.2f} | "
                                    if pf == "on"
                                    else "- | - | "
                                )
                                + f"{s['peak']:.0f} | {s['promise']:.0f} | {s['over']:+.1f} |",
                                flush=True,
                            )
        print(f"(load average {os.getloadavg()[0]:.2f} at the end)", flush=True)
    return None


if __name__ == "__main__":
    main()
