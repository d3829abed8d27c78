"""Parity of meldlite's logits with llama.cpp's, per architecture and file type.

    python benchmarks/parity.py [--tokens 128] [--arch qwen3moe] [--kinds Q8_0,Q4_0,Q4_K_M]

For each architecture, a random-weight model (tests/helpers_models.py) in F32
and F16 and llama.cpp's quantizations of it (--kinds: llama-quantize's file types). Prints
max |logit diff| / max |logit|, mean KL(llama.cpp || meldlite) and argmax
agreement, and beside them the same figures for llama.cpp's own decode path
(token by token) against its prefill path: the noise floor of the reference.
Then perplexity on the first 50 stories of ../shared/models/valid.txt.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this working tree's meldlite, not an installed copy
sys.path.insert(0, str(ROOT / "tests"))

from helpers_models import ARCHS, llamacpp_quantize, write_random_model  # noqa: E402

from meldlite.metrics import kl_divergence as kl  # noqa: E402


def llamacpp_paths(path, ids):
    """llama.cpp logits from one prefill and from token-by-token decoding."""
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False
    )
    llm.eval(ids)
    prefill = np.array(llm.scores[: len(ids)])
    llm.reset()
    llm._ctx.kv_cache_clear()
    for t in ids:
        llm.eval([t])
    decode = np.array(llm.scores[: len(ids)])
    llm.close()
    return prefill, decode


def row(name, ref, other):
    rel = np.abs(other - ref).max() / np.abs(ref).max()
    return rel, kl(ref, other).mean(), (other.argmax(-1) == ref.argmax(-1)).mean()


def main():
    import meldlite

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--arch", action="append", choices=list(ARCHS), help="default: all")
    ap.add_argument("--kinds", default="Q8_0,Q4_0,Q4_K_M", help="llama.cpp file types")
    args = ap.parse_args()
    ids = [1] + np.random.default_rng(1).integers(3, 4096, args.tokens - 1).tolist()
    print(
        "| arch | file | max rel diff | mean KL | argmax agree | llama.cpp decode vs prefill: "
        "max rel diff | mean KL | argmax agree |"
    )
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch or ARCHS:
            f32 = write_random_model(Path(tmp) / f"{arch}-F32.gguf", arch)
            files = {
                "F32": f32,
                "F16": write_random_model(Path(tmp) / f"{arch}-F16.gguf", arch, dtype=np.float16),
            }
            for kind in args.kinds.split(","):
                files[kind] = llamacpp_quantize(f32, Path(tmp) / f"{arch}-{kind}.gguf", kind)
            for kind, path in files.items():
                prefill, decode = llamacpp_paths(path, ids)
                ours = meldlite.load(path, n_ctx=256).logits(ids)
                a, b = row(kind, prefill, ours), row(kind, prefill, decode)
                print(
                    f"| {arch} | {kind} | {a[0]:.1e} | {a[1]:.1e} | {a[2]:.3f} | "
                    f"{b[0]:.1e} | {b[1]:.1e} | {b[2]:.3f} |",
                    flush=True,
                )
    perplexities()


def perplexities():
    shared = ROOT.parent / "shared" / "models"
    if not (shared / "valid.txt").exists():
        return
    from conftest import valid_stories
    from test_runtime import llamacpp_perplexity

    import meldlite

    stories = valid_stories(shared, 50)
    print("\n| file | meldlite ppl | llama.cpp ppl | ratio |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        f16 = shared / "tinystories-moe-f16.gguf"
        q4 = llamacpp_quantize(f16, Path(tmp) / "q4_k_m.gguf", "Q4_K_M")
        for name, path in (("F16", f16), ("Q4_K_M", q4)):
            ref = llamacpp_perplexity(path, stories)
            ours = meldlite.load(path, n_ctx=512).perplexity(
                "\n<|endoftext|>\n".join(stories), separator="<|endoftext|>"
            )
            print(f"| {name} | {ours:.4f} | {ref:.4f} | {ours / ref:.5f} |")


if __name__ == "__main__":
    main()
