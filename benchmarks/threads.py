"""The cost of a parallel loop's fork/join, and what it does to decode, per threading layer
and wait policy.

    python benchmarks/threads.py [--model edge-q4] [--decode 40] [--reps 3] [--contended]

Each setting runs in its own process (libgomp reads its environment once): Numba's TBB
layer (work stealing; meldlite's default where the tbb package is installed, i.e. x86-64),
and its OpenMP layer (what ARM boards get) with the wait policies `passive` (workers sleep when idle), `spin 30000` (meldlite's default, GOMP_SPINCOUNT=30000,
about 0.5-1 ms of spinning), `spin 300000` (libgomp's default when no variable is set,
several ms) and `active` (spin forever). For each: the time of an empty 2-thread parallel loop called back to back and
after idle gaps of 50 us to 5 ms (median of 200 calls), and the model's greedy decode in
ms/token with 1 and 2 threads (median of --reps runs of --decode tokens, after a 32-token
prompt), and the scaling from 1 to 2 threads. --contended repeats the 2-thread decode
while another process keeps one core busy (a shared machine).

The parallel loops per token are counted, not estimated: a tiny C shim (compiled once
into benchmarks/out/ with the system's cc, LD_PRELOAD'ed into the child) counts libgomp's
GOMP_parallel calls under the OpenMP layer (the TBB rows show the same kernels' count);
without a C compiler that column says "n/a". The per-token budget is loops x the loop's
cost after a 200 us gap. Settings whose layer is not installed are skipped.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's meldlite
sys.path.insert(0, str(ROOT / "benchmarks"))
from generate import OUT, model_path  # noqa: E402

POLICIES = {
    "tbb (default where installed)": {"NUMBA_THREADING_LAYER": "tbb"},
    "omp, spin 30000 (default without tbb)": {
        "NUMBA_THREADING_LAYER": "omp",
        "GOMP_SPINCOUNT": "30000",
    },
    "omp, passive": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "passive"},
    "omp, spin 300000 (libgomp's default)": {
        "NUMBA_THREADING_LAYER": "omp",
        "GOMP_SPINCOUNT": "300000",
    },
    "omp, active": {"NUMBA_THREADING_LAYER": "omp", "OMP_WAIT_POLICY": "active"},
}
GAPS_US = (0, 50, 200, 1000, 5000)
SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
static long n_parallel;
typedef void (*gomp_parallel_t)(void (*)(void *), void *, unsigned, unsigned);
void GOMP_parallel(void (*fn)(void *), void *data, unsigned n, unsigned flags) {
    static gomp_parallel_t real;
    if (!real) {  /* libgomp came in with Numba's omppool, outside the global scope */
        void *gomp = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
        real = (gomp_parallel_t)dlvsym(gomp, "GOMP_parallel", "GOMP_4.0");
    }
    __atomic_add_fetch(&n_parallel, 1, __ATOMIC_RELAXED);
    real(fn, data, n, flags);
}
long meldlite_parallel_count(void) { return n_parallel; }
"""


def shim_path():
    """The counting shim (built once), or None without a C compiler."""
    dst = OUT / "count_gomp_parallel.so"
    cc = shutil.which("cc") or shutil.which("gcc")
    if not dst.exists() and cc:
        OUT.mkdir(parents=True, exist_ok=True)
        src = OUT / "count_gomp_parallel.c"
        src.write_text(SHIM)
        ver = OUT / "count_gomp_parallel.map"  # Numba's omppool binds GOMP_parallel@GOMP_4.0
        ver.write_text("GOMP_4.0 { global: GOMP_parallel; };\nLOCAL { global: *; };\n")
        cmd = [cc, "-O2", "-shared", "-fPIC", f"-Wl,--version-script={ver}", "-o", dst, src]
        subprocess.run([*cmd, "-ldl"], check=True)
    return dst if dst.exists() else None


def loop_costs():
    """{gap us: median seconds of an empty 2-thread prange after that idle gap}."""
    import numba
    from numba import njit, prange

    @njit(parallel=True, nogil=True)
    def region(a):
        for i in prange(a.shape[0]):
            a[i] += 1.0

    a = np.zeros(2)
    numba.set_num_threads(2)
    for _ in range(100):
        region(a)
    costs = {}
    for gap in GAPS_US:
        times = []
        for _ in range(200):
            t = time.perf_counter()
            while time.perf_counter() - t < gap * 1e-6:
                pass
            t0 = time.perf_counter()
            region(a)
            times.append(time.perf_counter() - t0)
        costs[gap] = statistics.median(times)
    return costs


def decode_ms(model, n_threads, n_decode):
    """(wall ms, parallel loops) per greedy decode token after a 32-token prompt, with
    n_threads (loops None without the counting shim)."""
    import numba

    numba.set_num_threads(n_threads)
    ids = [1] + np.random.default_rng(0).integers(3, min(model.cfg.n_vocab, 4096), 31).tolist()
    model.cache.reset()
    logits = model._eval(ids, all_logits=False)
    for _ in range(3):
        logits = model._eval([int(np.argmax(logits[-1]))], all_logits=False)
    c0, t0 = parallel_count(), time.perf_counter()
    for _ in range(n_decode):
        logits = model._eval([int(np.argmax(logits[-1]))], all_logits=False)
    t1, c1 = time.perf_counter(), parallel_count()
    return (t1 - t0) / n_decode * 1e3, None if c0 is None else (c1 - c0) / n_decode


def parallel_count():
    import ctypes

    try:
        return ctypes.CDLL(None).meldlite_parallel_count()
    except AttributeError:
        return None


def child(path, n_decode, reps, contended):
    """One policy's measurements (runs in a fresh process with that policy's environment)."""
    import numba

    import meldlite

    costs = loop_costs()
    layer = numba.threading_layer()
    model = meldlite.load(path, n_ctx=256, n_threads=2)
    decode_ms(model, 2, 2)  # JIT and page-in
    ms1, ms2 = [], []
    for _ in range(reps):
        ms1.append(decode_ms(model, 1, n_decode)[0])
        ms, loops = decode_ms(model, 2, n_decode)
        ms2.append(ms)
    busy = []
    if contended:
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            busy = [decode_ms(model, 2, n_decode)[0] for _ in range(reps)]
        finally:
            hog.kill()
            hog.wait()
    return {
        "layer": layer,
        "costs": {str(g): c for g, c in costs.items()},
        "loops": loops,
        "ms1": statistics.median(ms1),
        "ms2": statistics.median(ms2),
        "busy": statistics.median(busy) if busy else None,
    }


def run_policy(env_change, path, args):
    env = dict(os.environ)
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NUMBA_THREADING_LAYER"):
        env.pop(k, None)
    env.update(env_change)
    shim = shim_path()
    if shim:
        env["LD_PRELOAD"] = str(shim)
    request = json.dumps([str(path), args.decode, args.reps, args.contended])
    proc = subprocess.run(
        [sys.executable, __file__, "--child", request], env=env, capture_output=True, text=True
    )
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="edge-q4")
    ap.add_argument("--decode", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--contended", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return
    path = model_path(args.model)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {args.model} ({path.stat().st_size / 1e6:.1f} MB), "
        f"decode {args.decode} tokens, median of {args.reps}; 1-min load average "
        f"{os.getloadavg()[0]:.2f} before"
    )
    gaps = " | ".join(f"loop us, {g} us gap" if g else "loop us, back to back" for g in GAPS_US)
    extra = " | 2 thr, one core busy" if args.contended else ""
    print(
        f"| policy | {gaps} | loops/token | budget ms/token | decode ms/token 1 thr | "
        f"2 thr | scaling{extra} |"
    )
    print("|---" * (len(GAPS_US) + 6 + bool(args.contended)) + "|")
    results = {name: run_policy(env_change, path, args) for name, env_change in POLICIES.items()}
    omp = [r["loops"] for r in results.values() if r.get("layer") == "omp" and r["loops"]]
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | skipped: {r['error']} |")
            continue
        if r["layer"] != "omp":
            r["loops"] = omp[0] if omp else None  # same kernels, counted under OpenMP
        costs = " | ".join(f"{r['costs'][str(g)] * 1e6:.1f}" for g in GAPS_US)
        loops = "n/a" if r["loops"] is None else f"{r['loops']:.0f}"
        budget = "n/a" if r["loops"] is None else f"{r['loops'] * r['costs']['200'] * 1e3:.2f}"
        busy = f" | {r['busy']:.2f}" if args.contended else ""
        print(
            f"| {name} | {costs} | {loops} | {budget} | {r['ms1']:.2f} | {r['ms2']:.2f} | "
            f"{r['ms1'] / r['ms2']:.2f}x{busy} |",
            flush=True,
        )
    print(f"1-min load average {os.getloadavg()[0]:.2f} after")


if __name__ == "__main__":
    main()
