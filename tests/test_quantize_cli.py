"""`meldlite quantize`: uniform files that llama.cpp loads and that are as good as its
own pure quantization, per-expert mixed files under a size budget, and bad input."""

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from helpers_models import Shape, llamacpp_logits, llamacpp_quantize, write_random_model

from meldlite.compress.quantize import quantize_model
from meldlite.errors import OptionError
from meldlite.formats import read_gguf
from meldlite.metrics import kl_divergence

SHAPE = Shape(n_vocab=4096, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64,
              n_expert=8, n_expert_used=2, n_ff_exp=128, n_ctx=128)
FAST_TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q2_K", "Q3_K", "Q4_K", "Q6_K"]
LLAMA_FTYPE = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}   # pure: all at the K type


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_random_model(tmp_path_factory.mktemp("quant") / "f16.gguf", "qwen3moe",
                              shape=SHAPE, dtype=np.float16)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(3, 4000, 48)


@pytest.fixture(scope="module")
def f16_logits(src, tokens):
    return llamacpp_logits(src, tokens, n_ctx=64)


def _kl(ref, path, tokens):
    return float(kl_divergence(ref, llamacpp_logits(path, tokens, n_ctx=64)).mean())


@pytest.mark.parametrize("qtype", FAST_TYPES)
def test_uniform_file_is_as_good_as_llamacpp_pure(src, tokens, f16_logits, qtype, tmp_path):
    ours = quantize_model(src, tmp_path / "ours.gguf", qtype=qtype)
    theirs = llamacpp_quantize(src, tmp_path / "theirs.gguf", LLAMA_FTYPE.get(qtype, qtype), pure=True)
    f, g = read_gguf(ours.path), read_gguf(theirs)
    assert sorted(f.tensor_names()) == sorted(g.tensor_names())
    for name in f.tensor_names():      # same types as llama.cpp's pure mix, fallbacks included
        assert f.tensor(name).qtype == g.tensor(name).qtype, name
    assert ours.nbytes <= theirs.stat().st_size
    kl_ours, kl_theirs = _kl(f16_logits, ours.path, tokens), _kl(f16_logits, theirs, tokens)
    assert 0 < kl_ours <= 1.2 * kl_theirs, (kl_ours, kl_theirs)


def test_uniform_metadata(src, tmp_path):
    f = read_gguf(quantize_model(src, tmp_path / "q.gguf", qtype="q8_0").path)
    assert f.metadata["general.file_type"] == 7            # LLAMA_FTYPE_MOSTLY_Q8_0
    assert f.metadata["general.quantization_version"] == 2
    assert f.expert_layout == "stacked"
    assert f.tensor("blk.0.ffn_gate_inp.weight").qtype == "F32"      # routers stay F32
    assert f.tensor("blk.0.attn_norm.weight").qtype == "F32"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "meldlite", "quantize", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_uniform(src, tmp_path):
    p = _cli(src, tmp_path / "q.gguf", "--type", "Q4_0", "--quiet")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {tmp_path / 'q.gguf'}") and "Q4_0 x" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["--type", "Q9_9"], "unknown quantization type"),
    (["--type", "Q4_0", "--size", "3MB"], "exactly one of"),
    ([], "exactly one of"),
    (["--size", "3MB"], "profile"),
    (["--size", "lots", "--profile", "p.json"], "is not a size"),
    (["--bpw", "0", "--profile", "p.json"], "bpw must be in"),
])
def test_cli_bad_options(src, tmp_path, args, message):
    p = _cli(src, tmp_path / "q.gguf", *args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


def test_fallback_meldlite_cannot_write_is_refused(src, tmp_path):
    # the down rows hold n_ff_exp = 128 values: llama.cpp stores Q5_K's as Q5_1
    with pytest.raises(OptionError, match="falls back to Q5_1"):
        quantize_model(src, tmp_path / "q.gguf", qtype="Q5_K")


def test_quantized_source_is_refused(src, tmp_path):
    q = quantize_model(src, tmp_path / "q.gguf", qtype="Q8_0").path
    with pytest.raises(OptionError, match="F32/F16/BF16"):
        quantize_model(q, tmp_path / "again.gguf", qtype="Q4_0")
