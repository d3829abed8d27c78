"""meldlite's quantizers against llama.cpp's: round-trip error ratios and speed.

    python benchmarks/quantize.py [--types Q4_K,Q8_0] [--reps 3] [--no-model]

For each type and tensor kind, the ratio meldlite / llama.cpp of the round-trip RMSE after
gguf-py's dequantize (plain), and of the importance-weighted RMSE
sqrt(sum(imp * err^2) / sum(imp)) when both are given the same importance (imatrix).
Below 1 means meldlite's error is lower. Kinds: Gaussian, heavy-tailed (Student-t, 3 dof,
6 outlier columns x20), rows with zeros/constants/tiny values, and (with ../shared/models)
the trained model's expert (ffn_gate/up_exps, every layer, first 8 experts) and attention
(attn_q/k/v/output, every layer) matrices. Importance: for synthetic tensors the mean
square of Gaussian activations with log-normal column scales; for the trained tensors the
square of the RMSNorm weight in front of them (the scale of their input columns).
Also per type and kind: the rows where meldlite's (weighted) squared error is higher than
llama.cpp's, and the highest per-row ratio.
Speed: a 1024x2048 Gaussian tensor, median of --reps calls after a warm-up, in MB of
float32 input per second of wall time and per CPU-second (process time, all threads: the
fairer figure on a shared machine), for meldlite (Numba, all threads) and llama.cpp
(ggml_quantize_chunk, one thread), then the whole trained model's 2-D/3-D weights to each
type (Q8_0 for rows that do not fit the K-quant block of 256).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader
from gguf import GGMLQuantizationType as T
from gguf import quants as gguf_quants

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's meldlite, whatever is installed
from helpers_ggml import ggml_quantize  # noqa: E402

from meldlite.compress.quantizers import importance_from_activations, quantize_rows  # noqa: E402

TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
MODEL = ROOT.parent / "shared" / "models" / "tinystories-moe-f16.gguf"


def synthetic(rng, rows=256, cols=1024):
    x = rng.standard_normal((rows, cols)).astype(np.float32)  # (rows, cols)
    heavy = rng.standard_t(3, (rows, cols))
    heavy[:, rng.choice(cols, 6, replace=False)] *= 20
    zeros = rng.standard_normal((rows, cols)).astype(np.float32)
    zeros[::8] = 0
    zeros[1::8] = 0.5
    zeros[2::8] = -1.5
    zeros[3::8, : cols // 2] = 0
    zeros[4::8] *= 1e-8
    act = rng.standard_normal((256, cols)) * rng.lognormal(0, 1, cols)  # (256, cols)
    imp = importance_from_activations(act.astype(np.float32))  # (cols,)
    return {"gaussian": (x, imp), "heavy": (heavy.astype(np.float32), imp), "zeros": (zeros, imp)}


def model_tensors(path):
    """{kind: [(x (rows, cols), importance (cols,))]} from the trained model."""
    r = GGUFReader(path)
    t = {x.name: x for x in r.tensors}
    f32 = lambda name: np.asarray(t[name].data, dtype=np.float32)  # noqa: E731
    kinds = {"expert": [], "attention": []}
    for blk in range(100):
        p = f"blk.{blk}."
        if p + "attn_norm.weight" not in t:
            break
        imp_attn = f32(p + "attn_norm.weight") ** 2  # (n_embd,)
        imp_ffn = f32(p + "ffn_norm.weight") ** 2  # (n_embd,)
        for name in ("attn_q", "attn_k", "attn_v"):
            kinds["attention"].append((f32(p + name + ".weight"), imp_attn))
        out = f32(p + "attn_output.weight")  # (n_embd, n_head*head_dim)
        kinds["attention"].append((out, np.ones(out.shape[1], np.float32)))
        for name in ("ffn_gate_exps", "ffn_up_exps"):
            w = f32(p + name + ".weight")[:8]  # (8, n_ff, n_embd)
            kinds["expert"].append((w.reshape(-1, w.shape[-1]), imp_ffn))
    return kinds


def row_sq_err(x, raw, qtype, imp):
    d = gguf_quants.dequantize(raw, qtype).astype(np.float64) - x  # (rows, cols)
    return ((1.0 if imp is None else imp.astype(np.float64)) * d * d).sum(axis=1)  # (rows,)


def compare(qtype, pairs):
    """Per weighting (plain, importance): (RMSE ratio meldlite / llama.cpp over the tensors,
    rows where meldlite's error is higher, rows, highest per-row error ratio)."""
    out = []
    for weighted in (False, True):
        mine, theirs = [], []
        for x, imp in pairs:
            if x.shape[1] % GGML_QUANT_SIZES[qtype][0]:
                continue
            use = imp if weighted else None
            mine.append(row_sq_err(x, quantize_rows(x, qtype, use), qtype, use))
            theirs.append(row_sq_err(x, ggml_quantize(x, qtype, use), qtype, use))
        mine, theirs = np.concatenate(mine), np.concatenate(theirs)  # (rows,)
        ratio = np.sqrt(mine.sum() / theirs.sum()) if theirs.sum() > 0 else float("nan")
        live = theirs > 0
        worst = float(np.max(mine[live] / theirs[live])) if live.any() else float("nan")
        out.append((ratio, int((mine > theirs * (1 + 1e-6)).sum()), mine.size, worst))
    return out


def timed(fn, reps):
    """(median wall seconds, median CPU seconds of this process, all threads) of fn()."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def model_time(path, qtype):
    """(wall, CPU) seconds to quantize every 2-D/3-D weight of the model (Q8_0 where rows
    do not fit)."""
    r = GGUFReader(path)
    wall = cpu = 0.0
    for t in r.tensors:
        if len(t.shape) < 2 or t.name.endswith("ffn_gate_inp.weight"):
            continue
        x = np.asarray(t.data, dtype=np.float32)
        x = x.reshape(-1, x.shape[-1])  # (rows, cols)
        q = qtype if x.shape[1] % GGML_QUANT_SIZES[qtype][0] == 0 else T.Q8_0
        t0, c0 = time.perf_counter(), time.process_time()
        quantize_rows(x, q)
        wall += time.perf_counter() - t0
        cpu += time.process_time() - c0
    return wall, cpu


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-model", action="store_true", help="skip the trained model's tensors")
    args = ap.parse_args()
    types = [T[n] for n in args.types.split(",")]
    rng = np.random.default_rng(0)
    kinds = {k: [v] for k, v in synthetic(rng).items()}
    if MODEL.exists() and not args.no_model:
        kinds.update(model_tensors(MODEL))

    print(f"numba threads: {numba.get_num_threads()}")
    print("\nRMSE ratio meldlite / llama.cpp (plain | importance-weighted); < 1: meldlite lower\n")
    print("| type | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    rows = {}
    for qtype in types:
        res = {k: compare(qtype, kinds[k]) for k in kinds}
        rows[qtype] = res
        cells = [(f"{r[0][0]:.3f} \\| {r[1][0]:.3f}") for r in res.values()]
        print(f"| {qtype.name} | " + " | ".join(cells) + " |")
    print(
        "\nRows where meldlite's error is higher than llama.cpp's, and the highest per-row ratio of "
        "squared errors (plain | importance-weighted)\n"
    )
    print("| type | " + " | ".join(kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for qtype, res in rows.items():
        cells = [" \\| ".join(f"{n}/{m} ({w:.2f})" for _, n, m, w in r) for r in res.values()]
        print(f"| {qtype.name} | " + " | ".join(cells) + " |")

    x = rng.standard_normal((1024, 2048)).astype(np.float32)  # (1024, 2048)
    imp = synthetic(rng, rows=1, cols=2048)["gaussian"][1]  # (2048,)
    mb = x.nbytes / 1e6
    print(
        f"\nSpeed on a 1024x2048 float32 tensor ({mb:.1f} MB): MB of input per second of wall time "
        f"and per CPU-second (all threads), median of {args.reps}\n"
    )
    head = (
        "| type | meldlite wall | meldlite CPU | meldlite, importance, CPU | llama.cpp CPU (1 thread) "
        "| llama.cpp, importance, CPU |"
    )
    whole = MODEL.exists() and not args.no_model
    if whole:
        head += " whole trained model, meldlite: wall / CPU s |"
    print(head)
    print("|---|---|---|---|---|---|" + ("---|" if whole else ""))
    for qtype in types:
        mine = [timed(lambda: quantize_rows(x, qtype, i), args.reps) for i in (None, imp)]
        theirs = [timed(lambda: ggml_quantize(x, qtype, i), args.reps) for i in (None, imp)]
        cells = [
            mb / mine[0][0],
            mb / mine[0][1],
            mb / mine[1][1],
            mb / theirs[0][1],
            mb / theirs[1][1],
        ]
        row = f"| {qtype.name} | " + " | ".join(f"{c:.1f}" for c in cells) + " |"
        if whole:
            row += " {:.1f} / {:.1f} |".format(*model_time(MODEL, qtype))
        print(row)


if __name__ == "__main__":
    main()
