"""Where a token's CPU time goes: per-token CPU time and a cProfile split (CPU clock).

    NUMBA_NUM_THREADS=1 python benchmarks/profile_forward.py [MODEL.gguf] [--decode 100]

Prefills a 32-token prompt from a fresh context, then decodes greedily. CPU time
(`time.process_time`) is used rather than wall time because on a shared machine other
processes disturb it much less; with one thread it is the work of one token. Jitted
kernels appear in the profile as single calls (their time is "tottime"). Wall time is
printed too (meaningful only on a quiet machine, e.g. for the thread scaling).
"""

import argparse
import cProfile
import os
import pstats
import time

import numpy as np

import meldlite


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("--decode", type=int, default=100)
    ap.add_argument("--top", type=int, default=14)
    args = ap.parse_args()
    m = meldlite.load(args.model, n_ctx=256)
    ids = [1] + np.random.default_rng(0).integers(3, min(m.cfg.n_vocab, 4096), 31).tolist()
    m.cache.reset()
    m._eval(ids, all_logits=False)  # JIT / page-in warm-up
    m.cache.reset()
    c0, w0 = time.process_time(), time.perf_counter()
    logits = m._eval(ids, all_logits=False)
    c1, w1 = time.process_time(), time.perf_counter()
    for _ in range(args.decode):
        logits = m._eval([int(np.argmax(logits[-1]))], all_logits=False)
    c2, w2 = time.process_time(), time.perf_counter()
    print(
        f"{m.path}: {m.n_threads} thread(s); cpu ms/token: prefill {(c1 - c0) / len(ids) * 1e3:.2f}, "
        f"decode {(c2 - c1) / args.decode * 1e3:.2f}; wall ms/token: prefill "
        f"{(w1 - w0) / len(ids) * 1e3:.2f}, decode {(w2 - w1) / args.decode * 1e3:.2f}; "
        f"1-min load average {os.getloadavg()[0]:.2f}"
    )
    m.cache.reset()
    logits = m._eval(ids, all_logits=False)
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    for _ in range(args.decode):
        logits = m._eval([int(np.argmax(logits[-1]))], all_logits=False)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
