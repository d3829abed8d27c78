"""Quality curve of compressed files: KL divergence from F16 against file size.

    python benchmarks/compression.py [--stories 40] [--groups llamacpp,meldlite,mixed,pruned]
        [--mixed-sizes 10.3MB,11074688,...] [--prune 2,4,8] [--no-plot] [--threads 2]

The trained model ../shared/models/tinystories-moe-f16.gguf is compressed in
several ways and each file's next-token distributions are compared with the F16
model's on held-out stories: the first --stories stories of the second half of
../shared/models/valid.txt (the first half is the calibration text: profiles for
the mixed and pruned files come from it only). Every story is evaluated alone
from a fresh context as BOS + story (at most 512 tokens); at every position but
the last, the measures are

- KL: KL(P_f16 || P_file) of the next-token distributions, llama.cpp's
  `--kl-divergence` measure, averaged over all scored tokens;
- top-1: share of positions where the file's most likely token is F16's;
- PPL: exp(mean negative log-likelihood of the story's next token).

The reference distributions are llama.cpp's on the F16 file. Groups of rows:

- llamacpp: llama.cpp's uniform mixes (Q2_K .. Q8_0) quantized by
  llama_model_quantize and evaluated by llama.cpp (llama-cpp-python);
- meldlite: `meldlite quantize --type T` files (stacked layout), evaluated by
  meldlite, and one of them also by llama.cpp (same file, both runtimes: the
  cross-runtime check) -- skipped while the command does not exist;
- mixed: `meldlite quantize --size S --profile P` per-expert mixed files,
  evaluated by meldlite (llama.cpp cannot read the per-expert layout);
- pruned: per-expert files with the --prune least used experts of each layer
  removed (meldlite.compress.prune), evaluated by meldlite.

The runtime that computed each row is in the table. Generated files and results
are cached in benchmarks/out/compression/CODE/, where CODE is a digest of the code
that produces them (meldlite's sources, this benchmark's, tests/helpers_models.py
and the installed llama-cpp-python's version): a change to any of them starts an
empty cache (delete a file there to redo it; delete old CODE folders to free space).
Output: a Markdown table on stdout (also written to
benchmarks/out/compression/table.md) and, with matplotlib installed (the `bench`
extra), the plot docs/compression.png.
"""

import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this working tree's meldlite, not an installed copy
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "out" / "compression"
SHARED = ROOT.parent / "shared" / "models"
F16 = SHARED / "tinystories-moe-f16.gguf"
N_CTX = 512
LLAMACPP_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
MELDLITE_TYPES = ("Q2_K", "Q3_K", "Q4_0", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
CROSS_CHECK = "Q4_K_M"  # a llama.cpp file evaluated by both runtimes
PLOT = ROOT / "docs" / "compression.png"

from offload import stories  # noqa: E402  (calibration half, held-out half of valid.txt)


def code_digest():
    """A digest of the code that produces this benchmark's files and results: every
    Python source of meldlite/, this script, benchmarks/offload.py (the text split),
    tests/helpers_models.py (llama.cpp's quantizer) and llama-cpp-python's version."""
    h = hashlib.sha256()
    sources = sorted((ROOT / "meldlite").rglob("*.py")) + [
        Path(__file__).resolve(),
        ROOT / "benchmarks" / "offload.py",
        ROOT / "tests" / "helpers_models.py",
    ]
    for f in sources:
        h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    try:
        h.update(importlib.metadata.version("llama_cpp_python").encode())
    except importlib.metadata.PackageNotFoundError:
        h.update(b"no llama-cpp-python")
    return h.hexdigest()[:16]


CACHE = OUT / code_digest()  # generated files and results of this code

# -- data -------------------------------------------------------------------------


def held_out_ids(n_stories):
    """Token ids (BOS + story, at most N_CTX) of the first n held-out stories."""
    from meldlite.formats import read_gguf
    from meldlite.tokenizer import Tokenizer

    tok = Tokenizer.from_metadata(read_gguf(F16).metadata)
    _, held = stories()
    return [np.asarray(tok.encode(d, add_bos=True)[:N_CTX]) for d in held[:n_stories]]


# -- runtimes ---------------------------------------------------------------------


def llamacpp_runner(path, threads):
    """A function ids -> logits (T, V) of llama.cpp on `path` (one context, reset per story)."""
    import llama_cpp

    llm = llama_cpp.Llama(
        os.fspath(path),
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_threads=threads,
        logits_all=True,
        verbose=False,
    )

    def run(ids):
        llm.reset()
        llm.eval(list(map(int, ids)))
        return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)

    return run, llm.close


def meldlite_runner(path, threads):
    """A function ids -> logits (T, V) of meldlite on `path` (all experts resident)."""
    import meldlite

    m = meldlite.load(path, n_ctx=N_CTX, n_threads=threads)
    return m.logits, m.close


RUNNERS = {"llama.cpp": llamacpp_runner, "meldlite": meldlite_runner}


def reference(docs, threads):
    """llama.cpp's F16 log-probabilities of each story, cached (list of (T, V) float32)."""
    path = CACHE / f"ref-f16-{len(docs)}.npz"
    if path.exists():
        z = np.load(path)
        return [z[f"s{i}"] for i in range(len(docs))]
    from meldlite.metrics import log_softmax

    run, close = llamacpp_runner(F16, threads)
    ref = [log_softmax(run(ids)).astype(np.float32) for ids in docs]  # [(T, V)]
    close()
    np.savez(path, **{f"s{i}": r for i, r in enumerate(ref)})
    return ref


def measure(path, runtime, docs, ref, threads):
    """KL from F16, top-1 agreement and perplexity of `path` computed by `runtime`."""
    from meldlite.metrics import kl_divergence, log_softmax

    run, close = RUNNERS[runtime](path, threads)
    kl, top1, nll, n = 0.0, 0, 0.0, 0
    try:
        for ids, lp_ref in zip(docs, ref):
            lp = log_softmax(run(ids))[:-1]  # (T-1, V)
            r = lp_ref[:-1].astype(np.float64)  # (T-1, V)
            kl += float(kl_divergence(r, lp).sum())
            top1 += int((r.argmax(-1) == lp.argmax(-1)).sum())
            nll -= float(lp[np.arange(len(ids) - 1), ids[1:]].sum())
            n += len(ids) - 1
    finally:
        close()
    return {"kl": kl / n, "top1": top1 / n, "ppl": float(np.exp(nll / n)), "tokens": n}


def file_sizes(path):
    """(file bytes, bytes of expert tensors)."""
    from meldlite.formats import read_gguf

    f = read_gguf(path)
    expert = sum(f.tensor(n).nbytes for n in f.expert_tensor_names())
    f.close()
    return os.path.getsize(path), expert


# -- files ------------------------------------------------------------------------


def llamacpp_file(qtype):
    from helpers_models import llamacpp_quantize

    dst = CACHE / f"llamacpp-{qtype.lower()}.gguf"
    if not dst.exists():
        llamacpp_quantize(F16, dst, qtype)
    return dst


def quantize_command_exists():
    try:
        import meldlite.cli.quantize  # noqa: F401

        return True
    except ImportError:
        return False


def meldlite_quantize(dst, *args):
    """`meldlite quantize F16 dst ARGS` (cached); None (and the reason on stderr) if it fails."""
    if not dst.exists():
        tmp = dst.with_suffix(".tmp")
        r = subprocess.run(
            [sys.executable, "-m", "meldlite", "quantize", "--quiet", str(F16), str(tmp), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if r.returncode:
            print(f"  skipped {dst.name}: {r.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return None
        tmp.rename(dst)
    return dst


def profile_file(threads):
    """Expert profile of the F16 model on the calibration half of valid.txt (cached)."""
    path = CACHE / "profile-calibration.json"
    if not path.exists():
        import meldlite
        from meldlite.experts.profile import build_profile
        from meldlite.formats.profile import save_profile

        calib, _ = stories()
        m = meldlite.load(F16, n_ctx=N_CTX, n_threads=threads)
        p = build_profile(m, "<|endoftext|>".join(calib), text_name="valid.txt, first half")
        save_profile(p, path)
        m.close()
    return path


def removed_file(pruned, src, name):
    """The stacked `src` with `pruned`'s pruned experts removed: llama.cpp's view of it."""
    from meldlite.compress.prune import pruned_flags, remove_experts
    from meldlite.formats import read_gguf

    dst = CACHE / f"{name}-removed.gguf"
    if not dst.exists():
        remove_experts(src, dst, pruned_flags(read_gguf(pruned)))
    return dst


def pruned_file(src, n_prune, prof, name):
    """`src` with the n_prune least used experts of each layer pruned (cached)."""
    from meldlite.compress.prune import prune_file

    dst = CACHE / f"{name}-prune{n_prune}.gguf"
    if not dst.exists():
        prune_file(src, dst, prof, n_prune)
    return dst


def parse_size(text):
    text = text.strip().upper()
    for suffix, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def rows_to_run(groups, mixed_sizes, prunes, threads):
    """[(label, group, path, runtime)] in the order they are measured."""
    rows = []
    if "llamacpp" in groups:
        for t in LLAMACPP_TYPES:
            rows.append((f"llama.cpp {t}", "llamacpp", llamacpp_file(t), "llama.cpp"))
        rows.append(
            (f"llama.cpp {CROSS_CHECK}", "cross-check", llamacpp_file(CROSS_CHECK), "meldlite")
        )
    have_quantize = quantize_command_exists()
    if "meldlite" in groups and have_quantize:
        for t in MELDLITE_TYPES:
            path = meldlite_quantize(CACHE / f"meldlite-{t.lower()}.gguf", "--type", t)
            if path is None:
                continue
            rows.append((f"meldlite {t}", "meldlite", path, "meldlite"))
            if t == "Q4_K":
                rows.append((f"meldlite {t}", "cross-check", path, "llama.cpp"))
    prof = profile_file(threads) if {"mixed", "pruned"} & set(groups) else None
    mixed = {}  # size label -> path
    if "mixed" in groups and have_quantize:
        for s in mixed_sizes:
            label = f"{parse_size(s) / 1e6:.2f}MB"
            path = meldlite_quantize(
                CACHE / f"mixed-{parse_size(s)}.gguf", "--size", s, "--profile", str(prof)
            )
            if path is not None:
                mixed[label] = path
                rows.append((f"mixed {label}", "mixed", path, "meldlite"))
    if "pruned" in groups:
        src = llamacpp_file("Q4_K_M")
        for n in prunes:
            pruned = pruned_file(src, n, prof, "llamacpp-q4_k_m")
            rows.append((f"Q4_K_M pruned {n}/layer", "pruned", pruned, "meldlite"))
            rows.append(
                (
                    f"Q4_K_M pruned {n}/layer",
                    "cross-check",
                    removed_file(pruned, src, f"llamacpp-q4_k_m-prune{n}"),
                    "llama.cpp",
                )
            )
        if mixed:  # the largest mixed file, least pruning
            label, path = max(mixed.items(), key=lambda kv: kv[1].stat().st_size)
            n = min(prunes)
            rows.append(
                (
                    f"mixed {label} pruned {n}/layer",
                    "pruned",
                    pruned_file(path, n, prof, path.stem),
                    "meldlite",
                )
            )
    return rows


# -- results ----------------------------------------------------------------------


def cached_measure(label, path, runtime, docs, ref, threads, results):
    st = os.stat(path)
    key = f"{path.name}|{runtime}|{len(docs)}"
    stamp = [st.st_size, st.st_mtime_ns]
    if key in results and results[key]["stamp"] == stamp:
        return results[key]
    r = measure(path, runtime, docs, ref, threads)
    r["size"], r["expert_bytes"] = file_sizes(path)
    r["stamp"] = stamp
    results[key] = r
    print(
        f"  {label:<32} {runtime:<9} KL {r['kl']:.5f}  top-1 {r['top1']:.4f}  "
        f"PPL {r['ppl']:.3f}  {r['size'] / 1e6:.2f} MB",
        file=sys.stderr,
        flush=True,
    )
    return r


def table(measured, f16_row):
    lines = [
        "| file | runtime | size MB | expert MB | KL from F16 | top-1 | PPL |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, _group, runtime, r in [f16_row, *sorted(measured, key=lambda m: m[3]["size"])]:
        lines.append(
            f"| {label} | {runtime} | {r['size'] / 1e6:.2f} | {r['expert_bytes'] / 1e6:.2f} "
            f"| {r['kl']:.5f} | {r['top1']:.4f} | {r['ppl']:.3f} |"
        )
    return "\n".join(lines)


def verdict(measured):
    """Each mixed file against the smallest llama.cpp uniform file of equal or larger size."""
    uniform = [(r["size"], r["kl"], label) for label, g, rt, r in measured if g == "llamacpp"]
    lines = []
    for label, group, _runtime, r in measured:
        if group != "mixed":
            continue
        bigger = [u for u in uniform if u[0] >= r["size"]]
        if not bigger:
            lines.append(f"- {label}: no llama.cpp file of equal or larger size")
            continue
        best = min(bigger)  # the smallest uniform file at least as large
        gain = 1 - r["kl"] / best[1]
        lines.append(
            f"- {label} ({r['size'] / 1e6:.2f} MB): KL {r['kl']:.5f} vs {best[2]} "
            f"({best[0] / 1e6:.2f} MB) {best[1]:.5f}: {100 * gain:+.1f}% lower"
            f" -> {'met' if gain > 0 else 'NOT met'}{' (>= 25%)' if gain >= 0.25 else ''}"
        )
    return "\n".join(lines)


def plot(measured, f16_row, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install meldlite[bench]): no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {
        "llamacpp": ("o-", "llama.cpp uniform (llama.cpp)"),
        "meldlite": ("s-", "meldlite uniform (meldlite)"),
        "mixed": ("D-", "per-expert mixed (meldlite)"),
        "pruned": ("v", "pruned (meldlite)"),
    }
    for ax, xkey, xlabel in (
        (axes[0], "size", "file size (MB)"),
        (axes[1], "expert_bytes", "expert tensor bytes (MB)"),
    ):
        for group, (style, name) in styles.items():
            pts = sorted(
                (r[xkey] / 1e6, r["kl"], label) for label, g, rt, r in measured if g == group
            )
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
            for x, y, label in pts:
                short = label if group == "pruned" else label.split(" ", 1)[1]
                ax.annotate(short, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean KL divergence from F16")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("tinystories-moe (qwen3moe, 32 experts): quality vs size, held-out stories")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stories", type=int, default=40)
    ap.add_argument("--groups", default="llamacpp,meldlite,mixed,pruned")
    ap.add_argument(
        "--mixed-sizes",
        default="10.3MB,11074688,11947648,13041792,14631552",
        help="budgets of the mixed files (default: 10.3 MB, then the sizes of "
        "llama.cpp's Q3_K_S, Q3_K_M, Q4_0 and Q4_K_M files)",
    )
    ap.add_argument("--prune", default="2,4,8", help="experts pruned per layer, comma-separated")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    if not F16.exists():
        sys.exit(f"{F16} not found")
    CACHE.mkdir(parents=True, exist_ok=True)
    groups = args.groups.split(",")
    docs = held_out_ids(args.stories)
    ref = reference(docs, args.threads)
    results_path = CACHE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}

    def save():
        results_path.write_text(json.dumps(results, indent=1))

    f16 = cached_measure("F16", F16, "meldlite", docs, ref, args.threads, results)
    save()
    measured = []
    for label, group, path, runtime in rows_to_run(
        groups,
        args.mixed_sizes.split(","),
        [int(n) for n in args.prune.split(",") if n],
        args.threads,
    ):
        measured.append(
            (
                label,
                group,
                runtime,
                cached_measure(label, path, runtime, docs, ref, args.threads, results),
            )
        )
        save()
    n_tok = f16["tokens"]
    text = (
        f"{args.stories} held-out stories ({n_tok} scored tokens), reference llama.cpp F16, "
        f"{datetime.date.today()}, code {CACHE.name}\n\n"
        + table(measured, ("F16 (noise floor)", "f16", "meldlite", f16))
        + "\n\n"
        + verdict(measured)
        + "\n"
    )
    print(text)
    (OUT / "table.md").write_text(text)
    if not args.no_plot:
        plot(measured, f16, PLOT)


if __name__ == "__main__":
    main()
