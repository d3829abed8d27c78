"""Prefill and decode speed of meldlite beside llama.cpp, same file, same run.

    python benchmarks/generate.py [--threads 2] [--reps 3] [--prompt 128] [--decode 64]
                                  [--models trained,trained-q4,edge-q4]

Models: `trained` is ../shared/models' F16 tinystories MoE, `trained-q4` its
Q4_K_M (llama.cpp's quantizer), `edge-q4`/`edge-q8` a random-weight qwen3moe
of a realistic edge shape (24 layers, d_model 1024, 32 experts of 512, top-8,
vocab 49152) in Q4_K_M / Q8_0, generated once into benchmarks/out/.
Each engine prefills the same prompt tokens from a fresh context and then
decodes greedily; the table shows medians over --reps runs and the ratio
meldlite / llama.cpp (higher is better for meldlite).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "out"
SHARED = ROOT.parent / "shared" / "models"

from helpers_models import Shape, llamacpp_quantize, write_random_model  # noqa: E402

EDGE = Shape(n_vocab=49152, n_embd=1024, n_layer=24, n_head=16, n_head_kv=4, head_dim=64,
             n_ff=512, n_expert=32, n_expert_used=8, n_ff_exp=512, n_ctx=1024)


def model_path(name):
    OUT.mkdir(parents=True, exist_ok=True)
    if name.startswith("trained"):
        f16 = SHARED / "tinystories-moe-f16.gguf"
        if name == "trained":
            return f16
        dst = OUT / "trained-q4_k_m.gguf"
        return dst if dst.exists() else llamacpp_quantize(f16, dst, "Q4_K_M")
    f16 = OUT / "edge-f16.gguf"
    if not f16.exists():
        write_random_model(f16, "qwen3moe", shape=EDGE, dtype=np.float16)
    kind = {"edge-q4": "Q4_K_M", "edge-q8": "Q8_0"}[name]
    dst = OUT / f"edge-{kind.lower()}.gguf"
    return dst if dst.exists() else llamacpp_quantize(f16, dst, kind)


def prompt_ids(n, n_vocab):
    return [1] + np.random.default_rng(0).integers(3, min(n_vocab, 4096), n - 1).tolist()


def time_llamacpp(path, ids, n_decode, threads):
    import llama_cpp
    llm = llama_cpp.Llama(str(path), n_ctx=len(ids) + n_decode + 8, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t2 = time.perf_counter()
    llm.close()
    return len(ids) / (t1 - t0), n_decode / (t2 - t1)


def time_meldlite(model, ids, n_decode):
    model.cache.reset()
    t0 = time.perf_counter()
    logits = model._eval(ids, all_logits=False)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        logits = model._eval([int(np.argmax(logits[-1]))], all_logits=False)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), n_decode / (t2 - t1)


def bench(name, args):
    import meldlite
    path = model_path(name)
    model = meldlite.load(path, n_ctx=args.prompt + args.decode + 8, n_threads=args.threads)
    ids = prompt_ids(args.prompt, model.cfg.n_vocab)
    time_meldlite(model, ids[:8], 2)                       # JIT / page-in warm-up
    ours, ref = [], []
    for _ in range(args.reps):
        ref.append(time_llamacpp(path, ids, args.decode, args.threads))
        ours.append(time_meldlite(model, ids, args.decode))
    med = [statistics.median(r[i] for r in runs) for runs in (ours, ref) for i in (0, 1)]
    return name, path.stat().st_size, med


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--models", default="trained,trained-q4,edge-q4,edge-q8")
    args = ap.parse_args()
    print(f"threads {args.threads}, prompt {args.prompt} tokens, decode {args.decode} tokens, "
          f"median of {args.reps} runs (tokens/s)")
    print(f"| model | size MB | meldlite prefill | llama.cpp prefill | ratio | "
          f"meldlite decode | llama.cpp decode | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        name, size, (mp, md, lp, ld) = bench(name, args)
        print(f"| {name} | {size / 1e6:.1f} | {mp:.1f} | {lp:.1f} | {mp / lp:.2f} | "
              f"{md:.1f} | {ld:.1f} | {md / ld:.2f} |", flush=True)


if __name__ == "__main__":
    main()
