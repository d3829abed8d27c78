"""Quantized mat-vec throughput of meldlite's kernels beside this machine's memory bandwidth.

    python benchmarks/kernels.py [--reps 5] [--passes 3] [--types Q4_K,Q8_0] [--bw-gib 1] [--prefill 32]
                                 [--paths qmatmul,matmul]

For every supported ggml type and the shapes (n_rows x n_cols) 512x1024 and 1024x512
(expert-sized) and 4096x4096, times each path for one token: `qmatmul` (what the model
runs with llama_numerics: activations quantized to 8 bits, integer dot products where the
type has them) and `matmul` (float activations, the reference path); and prints
GB/s of weight bytes, Gweights/s and the ratio of that GB/s to the memory read bandwidth
measured in the same run (a jitted parallel XOR over a --bw-gib GiB array). A mat-vec
cannot beat the read bandwidth once W is out of cache, so the ratio says how far the
kernel is from being memory-bound (1.0). The last column times a --prefill-token
mat-mat on the 4096x4096 matrix (GMAC/s). Each number is the median over --passes passes
of the whole table (types shuffled per pass) of the median of --reps timed calls. A
measurement during which other processes used > 10% of a CPU (from /proc/stat) is
retried: with 2 cores a preempted kernel thread stalls the whole parallel loop. Weights: random blocks with sane scales (decode cost
does not depend on the values).
"""

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import time

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from meldlite import kernels
from meldlite.kernels.reference import F16_FIELDS  # byte offsets of f16 scales in a block

SHAPES = [(512, 1024), (1024, 512), (4096, 4096)]


@njit(parallel=True, cache=True, error_model="numpy")
def xor_rows(a):
    """XOR of each row of a (n_chunks, chunk) uint64: reads every byte once, in parallel."""
    out = np.zeros(a.shape[0], dtype=np.uint64)  # (n_chunks,)
    for c in prange(a.shape[0]):
        s = np.uint64(0)
        row = a[c]
        for i in range(row.shape[0]):
            s ^= row[i]
        out[c] = s
    return out


def median_time(fn, reps, min_seconds=0.03):
    """Median over `reps` runs of the time of one call (batched when calls are short)."""
    fn()
    t0 = time.perf_counter()
    fn()
    n = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-9)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def busy_cpu_seconds():
    """CPU time used by every process on the machine so far (from /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


class QuietTimer:
    """median_time, retried while other processes used more than `limit` of a CPU meanwhile
    (on a shared machine a parallel kernel stalls whenever one of its threads is preempted)."""

    def __init__(self, reps, tries=4, limit=0.1):
        self.reps, self.tries, self.limit = reps, tries, limit
        self.measured = self.retried = self.noisy = 0

    def __call__(self, fn):
        self.measured += 1
        for attempt in range(self.tries):
            busy0, own0, wall0 = busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
            dt = median_time(fn, self.reps)
            if busy0 is None:
                return dt
            foreign = busy_cpu_seconds() - busy0 - (sum(os.times()[:2]) - own0)
            if foreign <= self.limit * (time.perf_counter() - wall0):
                return dt
            self.retried += 1
            time.sleep(0.3 * (attempt + 1))
        self.noisy += 1
        return dt


def memory_bandwidth(gib, timer):
    a = np.ones(int(gib * 2**30) // 8, dtype=np.uint64).reshape(-1, 2**16)  # (n_chunks, 65536)
    return a.nbytes / timer(lambda: xor_rows(a))


def random_matrix(rng, qtype, n_rows, n_cols):
    """(n_rows, row_bytes) uint8 of `qtype` with finite scales."""
    if qtype in (T.F32, T.F16, T.BF16):
        w = rng.standard_normal((n_rows, n_cols), dtype=np.float32) * np.float32(0.02)
        if qtype == T.BF16:
            return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return w.astype(np.float16 if qtype == T.F16 else np.float32).view(np.uint8)
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_rows, n_cols // elems, nbytes), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        d = (rng.standard_normal(blocks.shape[:2]) * 1e-3).astype(np.float16)
        blocks[..., off : off + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    if qtype == T.MXFP4:
        blocks[..., 0] = rng.integers(118, 124, size=blocks.shape[:2], dtype=np.uint8)
    return blocks.reshape(n_rows, -1)


def readonly(a):
    a.flags.writeable = False
    return a


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


PATHS = {"qmatmul": kernels.qmatmul, "matmul": kernels.matmul}


def bench_type(qtype, mats, args, timer, path="matmul"):
    """[(GB/s, Gw/s) per shape..., prefill GMAC/s] for one pass."""
    fn = PATHS[path]
    rng = np.random.default_rng(1)
    cells = []
    for raw, n_cols in mats:
        x = rng.standard_normal(n_cols, dtype=np.float32)
        out = np.empty(raw.shape[0], dtype=np.float32)
        dt = timer(lambda: fn(raw, qtype, x, out=out))
        cells.append((raw.nbytes / dt / 1e9, raw.shape[0] * n_cols / dt / 1e9))
    raw, n_cols = mats[-1]
    xs = rng.standard_normal((args.prefill, n_cols), dtype=np.float32)
    dt = timer(lambda: fn(raw, qtype, xs))
    return cells + [args.prefill * raw.shape[0] * n_cols / dt / 1e9]


def table_row(name, passes, bw):
    cells = []
    for i in range(len(SHAPES)):
        gbs = statistics.median(p[i][0] for p in passes)
        gws = statistics.median(p[i][1] for p in passes)
        cells.append(f"{gbs:.2f} | {gws:.2f} | {gbs / bw:.3f}")
    return f"| {name} | {' | '.join(cells)} | {statistics.median(p[-1] for p in passes):.1f} |"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--types", default=",".join(t.name for t in kernels.SUPPORTED_TYPES))
    ap.add_argument("--bw-gib", type=float, default=1.0)
    ap.add_argument("--prefill", type=int, default=32)
    ap.add_argument("--paths", default="qmatmul,matmul")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    paths = args.paths.split(",")
    qtypes = [(T[name], path) for name in args.types.split(",") for path in paths]
    mats = {}
    for q, _ in qtypes:
        if q not in mats:
            mats[q] = [(readonly(random_matrix(rng, q, r, c)), c) for r, c in SHAPES]
    load0 = os.getloadavg()[0]
    bws, results, timer = [], {q: [] for q in qtypes}, QuietTimer(args.reps)
    order = np.random.default_rng(2)
    for _ in range(args.passes):  # types in a new order each pass: a load burst hits different rows
        for i in order.permutation(len(qtypes)):
            q, path = qtypes[i]
            results[qtypes[i]].append(bench_type(q, mats[q], args, timer, path))
        bws.append(memory_bandwidth(args.bw_gib, timer) / 1e9)
    bw = statistics.median(bws)
    print(
        f"{datetime.date.today()}, CPU {cpu_name()}, numba {numba.__version__} with "
        f"{numba.get_num_threads()} threads ({numba.threading_layer()}); median over "
        f"{args.passes} passes of the median of {args.reps} calls; 1-min load average "
        f"{load0:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(
        f"{timer.measured} measurements, {timer.retried} retried because other processes used "
        f"> {timer.limit:.0%} of a CPU meanwhile, {timer.noisy} still noisy after {timer.tries} tries"
    )
    print(
        f"memory read bandwidth (parallel XOR over {args.bw_gib:g} GiB): {bw:.1f} GB/s "
        f"(passes: {', '.join(f'{b:.1f}' for b in bws)})\n"
    )
    head = " | ".join(f"{r}x{c} GB/s | Gw/s | /bw" for r, c in SHAPES)
    print(f"| type | path | {head} | prefill {args.prefill} tok 4096x4096 GMAC/s |")
    print("|---" * (3 + 3 * len(SHAPES)) + "|")
    for q, path in qtypes:
        print(table_row(f"{q.name} | {path}", results[q, path], bw))


if __name__ == "__main__":
    main()
