"""Decode time per weight type: meldlite's mat-vec kernels beside llama.cpp's, same file.

    python benchmarks/kernel_split.py [--models edge-q4,edge-q8] [--tokens 40] [--reps 3]
                                      [--llama-bench PATH] [--no-llamacpp]

A decode step reads every matrix once (the routed experts only), so its time is, to a
first approximation, the bytes of each weight type over the rate of that type's kernel.
This script measures that rate for both engines on the same file, one thread:

- meldlite: a decode-like stream with `qdot.linear` (activations rounded as llama.cpp
  rounds them, integer dot products): per token, every matrix but the token embedding,
  and for the expert tensors n_expert_used experts per layer drawn at random (seeded), each
  times one token. CPU seconds per token and GB/s of weight bytes, per ggml type; median of
  --reps passes.
- llama.cpp: `llama-bench -t 1 -p 0 -n TOKENS -r REPS` under `perf record -e cpu-clock`
  (a software clock: works in VMs), with and without its weight repacking; each kernel
  symbol (ggml_vec_dot_<type>_q8_*, ggml_gemv_<type>_*, ggml_gemm_<type>_*) is matched to
  its weight type, and its CPU time per generated token is set against the same bytes per
  token. Other symbols (norms, attention, quantizing activations, thread sync) are listed
  as "other".

llama-bench is not part of the llama-cpp-python wheel; build it from the dev extra's source
distribution (a few minutes):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/sdist
    tar xzf /tmp/sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/sdist
    cmake -S /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/lcbuild \\
          -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build /tmp/lcbuild --target llama-bench -j

(--llama-bench defaults to /tmp/lcbuild/bin/llama-bench). `perf` is Debian's linux-perf.
Without either, the llama.cpp columns are skipped with a message. CPU time is used on both
sides, so other processes disturb the figures less than wall time (not at all only when
they leave this core's cache and memory bandwidth alone).
"""

import argparse
import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from generate import model_path  # noqa: E402

KERNEL_SYMBOL = re.compile(
    r"ggml_(?:vec_dot|gemv|gemm)_([a-z0-9]+_[a-z0-9]+|f16|f32|bf16)", re.IGNORECASE
)


def decode_bytes(gguf, n_used, n_expert):
    """{ggml type name: bytes a decode step reads}: every matrix but the token embedding,
    n_used / n_expert of each stacked expert tensor."""
    out = collections.Counter()
    for name in gguf.tensor_names():
        t = gguf.tensor(name)
        if len(t.shape) < 2 or name == "token_embd.weight":
            continue
        share = n_used / n_expert if "_exps" in name else 1.0
        out[t.ggml_type.name] += t.nbytes * share
    return out


def meldlite_pass(mats, n_used, n_expert, tokens, seed):
    """{type: CPU seconds per token} of one decode-like pass (see the module docstring)."""
    from meldlite.kernels.actquant import mode_of
    from meldlite.kernels.qdot import linear

    rng = np.random.default_rng(seed)
    xs = {n: rng.standard_normal((1, n)).astype(np.float32) for n in {m[2] for m in mats}}
    secs = collections.Counter()
    for _ in range(tokens):
        for _name, raw, n_in, n_out, t, stacked in mats:
            out = np.empty((1, n_out), np.float32)  # (1, n_out)
            rows = [raw[e] for e in rng.choice(n_expert, n_used, False)] if stacked else [raw]
            c = time.process_time()
            for w in rows:
                linear(w, int(t), mode_of(t), xs[n_in], out)
            secs[t.name] += time.process_time() - c
    return {k: v / tokens for k, v in secs.items()}


def matrices(gguf):
    """(name, raw, n_in, n_out, type, stacked) of the matrices a decode step reads; stacked
    expert tensors as (n_expert, n_out, row_bytes) arrays."""
    out = []
    for name in gguf.tensor_names():
        t = gguf.tensor(name)
        if len(t.shape) < 2 or name == "token_embd.weight":
            continue
        raw = np.asarray(t.raw)  # (rows, row_bytes) or (X, rows, row_bytes)
        n_out, n_in = t.shape[-2], t.shape[-1]
        out.append((name, raw, n_in, n_out, t.ggml_type, raw.ndim == 3))
    return out


def llamacpp_split(bench, path, tokens, reps, repack):
    """({type or 'other': CPU seconds per token}, decode tok/s) of llama-bench under perf."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        hz = 4000
        cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(hz), "-o", data, bench]
        cmd += ["-m", str(path), "-t", "1", "-p", "0", "-n", str(tokens), "-r", str(reps)]
        cmd += ["--repack", "1" if repack else "0", "-o", "csv"]
        csv = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        report = subprocess.run(
            ["perf", "report", "-i", data, "--stdio", "-n", "--sort", "symbol"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    n_tokens = reps * tokens + 1  # llama-bench's warm-up decodes one token
    secs = collections.Counter()
    for line in report.splitlines():
        parts = line.split()
        if line.startswith("#") or len(parts) < 4 or not parts[0].endswith("%"):
            continue
        samples, symbol = int(parts[1]), parts[3]
        if symbol.startswith(("repack_", "clear_page", "llama_model_load")):
            continue  # loading, not decoding
        m = KERNEL_SYMBOL.match(symbol)
        key = m.group(1).upper() if m else "other"
        secs[key] += samples / hz / n_tokens
    tps = float(csv.strip().splitlines()[-1].split(",")[-2].strip('"'))
    return dict(secs), tps


def row(name, nbytes, secs):
    cells = [name, f"{nbytes / 1e6:.1f}"]
    for s in secs:
        cells += ["-", "-"] if s is None else [f"{s * 1e3:.2f}", f"{nbytes / s / 1e9:.1f}"]
    return "| " + " | ".join(cells) + " |"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="edge-q4,edge-q8")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--llama-bench", default="/tmp/lcbuild/bin/llama-bench")
    ap.add_argument("--no-llamacpp", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    from meldlite.config import ModelConfig
    from meldlite.formats import read_gguf

    lc = not args.no_llamacpp
    if lc and not (shutil.which("perf") and os.access(args.llama_bench, os.X_OK)):
        print(f"llama.cpp skipped: needs `perf` and {args.llama_bench} (see --help)")
        lc = False
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}, 1 thread, CPU time, {args.tokens} tokens x "
        f"{args.reps}"
    )
    for name in args.models.split(","):
        path = model_path(name)
        g = read_gguf(path)
        cfg = ModelConfig.from_metadata(g.metadata)
        used, n_exp = cfg.n_expert_used, cfg.n_expert
        nbytes = decode_bytes(g, used, n_exp)
        mats = matrices(g)
        meldlite_pass(mats, used, n_exp, 1, 0)  # JIT, page-in
        passes = [meldlite_pass(mats, used, n_exp, args.tokens, r + 1) for r in range(args.reps)]
        ours = {k: statistics.median(p[k] for p in passes) for k in nbytes}
        cols, theirs, tps = ["meldlite"], [], []
        if lc:
            for repack in (True, False):
                split, rate = llamacpp_split(args.llama_bench, path, args.tokens, args.reps, repack)
                theirs.append(split)
                tps.append(rate)
                cols.append(f"llama.cpp {'repack' if repack else 'no repack'}")
        print(
            f"\n{name} ({path.name}); bytes per decode token by type"
            + "".join(f"; {c} {t:.1f} tok/s" for c, t in zip(cols[1:], tps))
        )
        print("| type | MB/token | " + " | ".join(f"{c} ms | GB/s" for c in cols) + " |")
        print("|---|---|" + "---|---|" * len(cols))
        for t in sorted(nbytes, key=lambda k: -nbytes[k]):
            print(row(t, nbytes[t], [ours[t]] + [s.get(t) for s in theirs]))
        if lc:
            others = ["-", "-"] + [
                c for s in theirs for c in (f"{s.get('other', 0) * 1e3:.2f}", "-")
            ]
            print("| other | - | " + " | ".join(others) + " |")


if __name__ == "__main__":
    main()
