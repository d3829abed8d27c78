"""Granite MoE files work with everything else: memory budgets and peers give the
all-resident bits, `pack`, `quantize --type` and mixed files run, `profile` and
`info` read them. Logit parity with llama.cpp is in test_parity.py."""

import numpy as np
import pytest
from click.testing import CliRunner
from helpers_models import GRANITE_SCALES, Shape, llamacpp_logits
from helpers_runs import budget_steps, peer_steps, resident_steps, stacked_and_packed

import meldlite
from meldlite.cli import main
from meldlite.compress.quantize import quantize_model
from meldlite.experts.profile import build_profile
from meldlite.metrics import kl_divergence

SHAPE = Shape(n_expert=8, n_expert_used=2, n_ff_exp=128, n_ff_shexp=128, n_ctx=128)
ARCHS = ["granitemoe", "granitemoe-shared"]
PROMPT = [1, 450, 2217, 310, 263, 931, 1892, 727, 471, 263, 2217, 1024, 77]


@pytest.fixture(scope="module", params=ARCHS)
def files(request, tmp_path_factory):
    """{"f16": stacked F16 file, "packed": its per-expert layout} of one Granite arch."""
    d = tmp_path_factory.mktemp(request.param)
    return stacked_and_packed(d, request.param, SHAPE)


@pytest.fixture(scope="module")
def resident(files):
    return resident_steps(files["f16"], PROMPT)


def test_config_reads_the_multipliers(files):
    cfg = meldlite.load(files["f16"], n_ctx=64).cfg
    assert cfg.arch == "granitemoe"
    assert cfg.embedding_scale == GRANITE_SCALES["embedding"]
    assert cfg.residual_scale == pytest.approx(GRANITE_SCALES["residual"])
    assert cfg.attention_scale == GRANITE_SCALES["attention"]
    assert cfg.logit_scale == GRANITE_SCALES["logit"]
    assert cfg.n_ff_shexp == (SHAPE.n_ff_shexp if files["arch"] == "granitemoe-shared" else 0)


@pytest.mark.parametrize("layout", ["f16", "packed"])
@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_memory_budget_is_bit_identical(files, resident, layout, budget):
    got, misses = budget_steps(files[layout], PROMPT, budget)
    assert all(np.array_equal(a, b) for a, b in zip(resident, got))
    assert misses > 0


def test_peers_exact_mode_is_bit_identical(files, resident):
    got, requests = peer_steps(files["packed"], PROMPT)
    assert all(np.array_equal(a, b) for a, b in zip(resident, got))
    assert requests > 0


def test_quantize_uniform_and_mixed_files_run_like_llamacpp(files, tmp_path):
    pytest.importorskip("llama_cpp")
    tokens = np.random.default_rng(1).integers(3, 4000, 64)
    uniform = quantize_model(files["f16"], tmp_path / "q4k.gguf", qtype="Q4_K").path
    m = meldlite.load(files["f16"], n_ctx=64)
    prof = build_profile(m, "Once upon a time there was a little girl. " * 8)
    m.close()
    mixed = quantize_model(files["f16"], tmp_path / "mixed.gguf", bpw=5.0, profile=prof).path
    ref = llamacpp_logits(uniform, tokens, n_ctx=64)  # llama.cpp loads the uniform file
    assert kl_divergence(ref, meldlite.load(uniform, n_ctx=64).logits(tokens)).mean() <= 1e-3
    # the per-expert mixed file is meldlite's own: against llama.cpp on the F16 source
    f16 = llamacpp_logits(files["f16"], tokens, n_ctx=64)
    kl_mixed = kl_divergence(f16, meldlite.load(mixed, n_ctx=64).logits(tokens)).mean()
    assert kl_mixed <= 5e-3  # measured 2.8e-4 (granitemoe), 5.0e-4 (shared)


def test_info_and_profile_commands(files, tmp_path):
    r = CliRunner().invoke(main, ["info", str(files["f16"])])
    assert r.exit_code == 0, r.output
    assert "granitemoe" in r.output
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little girl named Lily.\n" * 4)
    out = tmp_path / "prof.json"
    r = CliRunner().invoke(main, ["profile", str(files["f16"]), str(text), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert out.exists()
