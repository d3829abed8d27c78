"""Decode speed of several sequences decoded together (continuous batching).

    python benchmarks/batch.py [--threads 2] [--reps 3] [--prompt 32] [--decode 32]
                               [--seqs 1,2,4,8] [--models builtin,edge-q4]

For each number of sequences N, N different prompts are prefilled (one forward call
each, not timed), then --decode greedy steps run the N sequences' next tokens through
one forward pass each (`Model._eval_seqs`): the projections, routed experts and output
head read their weights once per step for all N tokens. The table shows the median over
--reps runs of the total decode tokens/s (N x steps / time), the per-sequence rate and
the time of one step, and the speed-up over N = 1. Models: `builtin` (the packaged
tinystories MoE, Q4_K_M) and `edge-q4`, benchmarks/generate.py's random-weight qwen3moe
of a realistic edge shape in Q4_K_M (generated once into benchmarks/out/). Each
measurement waits for a quiet machine first (generate.py's `Quiet`).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's meldlite
sys.path.insert(0, str(ROOT / "benchmarks"))
from generate import Quiet, model_path  # noqa: E402


def prompts(n, length, n_vocab):
    rng = np.random.default_rng(0)
    return [[1, *rng.integers(3, min(n_vocab, 4096), length - 1).tolist()] for _ in range(n)]


def decode_together(model, ps, n_decode):
    """Seconds of n_decode batched greedy steps of the sequences prefilled with ps."""
    last = []
    for j, p in enumerate(ps):
        model.cache.seq(j).reset()
        last.append(model._eval_seqs(p, [(j, len(p))])[0])
    seqs = [(j, 1) for j in range(len(ps))]
    t0 = time.perf_counter()
    for _ in range(n_decode):
        ids = [int(np.argmax(row)) for row in last]
        last = model._eval_seqs(ids, seqs)  # (N, V)
    return time.perf_counter() - t0


def bench(name, args, quiet):
    import meldlite

    path = model_path(name) if name != "builtin" else None
    counts = [int(n) for n in args.seqs.split(",")]
    model = meldlite.load(
        path,
        n_ctx=args.prompt + args.decode + 8,
        n_threads=args.threads,
        n_parallel=max(counts),
    )
    try:
        ps = prompts(max(counts), args.prompt, model.cfg.n_vocab)
        decode_together(model, ps[:2], 2)  # warm-up: JIT, page-in
        rows = []
        for n in counts:
            secs = statistics.median(
                quiet(lambda n=n: decode_together(model, ps[:n], args.decode))
                for _ in range(args.reps)
            )
            rows.append((n, n * args.decode / secs, args.decode / secs, secs / args.decode))
        size = Path(model.path).stat().st_size
    finally:
        model.close()
    return name, size, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--seqs", default="1,2,4,8")
    ap.add_argument("--models", default="builtin,edge-q4")
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    args = ap.parse_args()
    quiet = Quiet(args.quiet_wait)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, threads {args.threads}, prompts of {args.prompt} "
        f"tokens, {args.decode} decode steps, median of {args.reps} runs"
    )
    print("| model | size MB | sequences | total tok/s | tok/s per sequence | ms/step | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        name, size, rows = bench(name, args, quiet)
        base = rows[0][1]
        for n, total, per_seq, step in rows:
            print(
                f"| {name} | {size / 1e6:.1f} | {n} | {total:.1f} | {per_seq:.1f} | "
                f"{step * 1e3:.1f} | {total / base:.2f} |",
                flush=True,
            )
    print(
        f"{quiet.measured} measurements, {quiet.retried} retried because other processes "
        f"used > {quiet.limit:.0%} of a CPU, {quiet.noisy} still noisy"
    )


if __name__ == "__main__":
    main()
