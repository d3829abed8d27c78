"""Write llama.cpp's logits for a few models, for tests/test_parity_saved.py to check
meldlite against on a machine without llama-cpp-python (scripts/test-arm64.sh: aarch64
under emulation).

    python scripts/parity_refs.py OUT_DIR

OUT_DIR gets the model files (random weights from tests/helpers_models.py, seeded, and
llama.cpp's quantization of one) and refs.npz: `cases` (JSON: name, file relative to
OUT_DIR or "" for the built-in model, kind "float" or "quant", n_ctx) and per case
`NAME.ids` (T,) int32, `NAME.llama` (T, V) llama.cpp's logits, `NAME.meldlite` (T, V)
meldlite's logits on this machine.
"""

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
from gguf import GGMLQuantizationType as T
from helpers_models import (
    Shape,
    llamacpp_logits,
    llamacpp_quantize,
    write_random_model,
)

import meldlite
from meldlite.data import default_model_path

GPT_OSS_SHAPE = Shape(n_expert=16, n_expert_used=4, n_ff_exp=128, n_ctx=128)  # test_gpt_oss


def tokens(n, seed=1):
    return [1] + np.random.default_rng(seed).integers(3, 4096, n - 1).tolist()


def make_models(out):
    """[(name, file or "", kind, n_ctx, n_tokens)]: the built-in model (Q4_K_M), a
    qwen3moe file in F32 and as llama.cpp's Q4_K_M (Q4_K and Q6_K: the simd block sums),
    gpt-oss with MXFP4 experts (F16 others, sinks, sliding window, YaRN)."""
    f32 = write_random_model(out / "qwen3moe-F32.gguf", "qwen3moe")
    llamacpp_quantize(f32, out / "qwen3moe-Q4_K_M.gguf", "Q4_K_M")
    write_random_model(
        out / "gpt-oss-MXFP4.gguf", "gpt-oss", GPT_OSS_SHAPE, np.float16, 4, expert_type=T.MXFP4
    )
    return [
        ("builtin", "", "quant", 256, 128),
        ("qwen3moe-F32", "qwen3moe-F32.gguf", "float", 256, 128),
        ("qwen3moe-Q4_K_M", "qwen3moe-Q4_K_M.gguf", "quant", 256, 128),
        ("gpt-oss-MXFP4", "gpt-oss-MXFP4.gguf", "quant", 128, 100),
    ]


def main(out):
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays, cases = {}, []
    for name, file, kind, n_ctx, n_tok in make_models(out):
        path = str(out / file) if file else default_model_path()
        ids = tokens(n_tok)
        arrays[f"{name}.ids"] = np.array(ids, np.int32)
        arrays[f"{name}.llama"] = llamacpp_logits(path, ids, n_ctx=n_ctx)
        arrays[f"{name}.meldlite"] = meldlite.load(path, n_ctx=n_ctx).logits(ids)
        cases.append(dict(name=name, file=file, kind=kind, n_ctx=n_ctx))
    np.savez_compressed(out / "refs.npz", cases=np.array(json.dumps(cases)), **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
