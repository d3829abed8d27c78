"""`meldlite quantize`: uniform files that llama.cpp loads and that are as good as its
own pure quantization, per-expert mixed files under a size budget, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from helpers_models import Shape, llamacpp_logits, llamacpp_quantize, write_random_model

import meldlite
from meldlite.cli import info as info_cli
from meldlite.cli import main
from meldlite.compress.quantize import quantize_model
from meldlite.errors import FormatError, OptionError
from meldlite.experts.profile import build_profile
from meldlite.formats import layout, read_gguf
from meldlite.formats.profile import load_calibration, read_profile, save_profile
from meldlite.metrics import kl_divergence, top1_agreement

SHAPE = Shape(
    n_vocab=4096,
    n_embd=256,
    n_layer=2,
    n_head=4,
    n_head_kv=2,
    head_dim=64,
    n_expert=8,
    n_expert_used=2,
    n_ff_exp=128,
    n_ctx=128,
)
FAST_TYPES = ["Q8_0", "Q4_0", "Q5_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
LLAMA_FTYPE = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # pure: all at the K type


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_random_model(
        tmp_path_factory.mktemp("quant") / "f16.gguf", "qwen3moe", shape=SHAPE, dtype=np.float16
    )


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(3, 4000, 128)  # fewer: KL noise near Q6_K's


@pytest.fixture(scope="module")
def f16_logits(src, tokens):
    return llamacpp_logits(src, tokens, n_ctx=128)


def _kl(ref, path, tokens):
    return float(kl_divergence(ref, llamacpp_logits(path, tokens, n_ctx=128)).mean())


@pytest.mark.parametrize("qtype", FAST_TYPES)
def test_uniform_file_is_as_good_as_llamacpp_pure(src, tokens, f16_logits, qtype, tmp_path):
    ours = quantize_model(src, tmp_path / "ours.gguf", qtype=qtype)
    theirs = llamacpp_quantize(
        src, tmp_path / "theirs.gguf", LLAMA_FTYPE.get(qtype, qtype), pure=True
    )
    f, g = read_gguf(ours.path), read_gguf(theirs)
    assert sorted(f.tensor_names()) == sorted(g.tensor_names())
    for name in f.tensor_names():  # same types as llama.cpp's pure mix, fallbacks included
        assert f.tensor(name).qtype == g.tensor(name).qtype, name
    assert ours.nbytes <= theirs.stat().st_size
    kl_ours, kl_theirs = _kl(f16_logits, ours.path, tokens), _kl(f16_logits, theirs, tokens)
    assert 0 < kl_ours <= 1.2 * kl_theirs, (kl_ours, kl_theirs)


def test_uniform_metadata(src, tmp_path):
    f = read_gguf(quantize_model(src, tmp_path / "q.gguf", qtype="q8_0").path)
    assert f.metadata["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert f.metadata["general.quantization_version"] == 2
    assert f.expert_layout == "stacked"
    assert f.tensor("blk.0.ffn_gate_inp.weight").qtype == "F32"  # routers stay F32
    assert f.tensor("blk.0.attn_norm.weight").qtype == "F32"


def _cli(*args):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")  # small matmuls: threads only contend
    return subprocess.run(
        [sys.executable, "-m", "meldlite", "quantize", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
    )


def test_cli_uniform(src, tmp_path):
    p = _cli(src, tmp_path / "q.gguf", "--type", "Q4_0", "--quiet")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {tmp_path / 'q.gguf'}") and "Q4_0 x" in p.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--type", "Q9_9"], "unknown quantization type"),
        (["--type", "Q4_0", "--size", "3MB"], "exactly one of"),
        ([], "exactly one of"),
        (["--size", "3MB"], "profile"),
        (["--size", "lots", "--profile", "p.json"], "is not a size"),
        (["--bpw", "0", "--profile", "p.json"], "bpw must be in"),
        (["--type", "Q4_0", "--profile", "p.json"], "--profile is for mixed files"),
    ],
)
def test_cli_bad_options(src, tmp_path, args, message):
    p = _cli(src, tmp_path / "q.gguf", *args)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr


def test_q5_k_falls_back_to_q5_1(src, tmp_path):
    # the down rows hold n_ff_exp = 128 values: llama.cpp stores Q5_K's as Q5_1, so does meldlite
    f = read_gguf(quantize_model(src, tmp_path / "q.gguf", qtype="Q5_K").path)
    assert f.tensor("blk.0.ffn_down_exps.weight").qtype == "Q5_1"
    assert f.tensor("blk.0.ffn_gate_exps.weight").qtype == "Q5_K"


def test_quantized_source_is_refused(src, tmp_path):
    q = quantize_model(src, tmp_path / "q.gguf", qtype="Q8_0").path
    with pytest.raises(OptionError, match="F32/F16/BF16"):
        quantize_model(q, tmp_path / "again.gguf", qtype="Q4_0")


# -- per-expert mixed files -------------------------------------------------

STORIES = [
    "Once upon a time, there was a little dog. He liked to run in the park.",
    "Tom had a red ball. He played with it every day in the sun with his sister.",
    "The cat sat on the mat and looked at the bird in the tree. It wanted to fly.",
]


@pytest.fixture(scope="module")
def prof_path(src, tmp_path_factory):
    m = meldlite.load(src, n_ctx=64)
    prof = build_profile(m, "<|endoftext|>".join(STORIES * 3))
    m.close()
    return save_profile(prof, tmp_path_factory.mktemp("prof") / "p.json")


@pytest.fixture(scope="module")
def mixed(src, prof_path, tmp_path_factory):
    """A mixed file made by the CLI, between uniform Q2_K (~2.4 MB) and Q4_K (~3.2 MB) here."""
    out = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    p = _cli(src, out, "--size", "2.6MB", "--profile", prof_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {out}") and "budget 2,600,000" in p.stdout
    return read_gguf(out)


def test_mixed_file_fits_the_budget_and_mixes_types(mixed):
    assert 0.97 * 2_600_000 < mixed.path.stat().st_size <= 2_600_000
    f = mixed
    assert f.expert_layout == "per_expert"
    kinds = {t for L in range(f.n_layers) for t in f.expert_types(L)}
    assert len(kinds) > 1  # not one type for all experts
    assert f.tensor("blk.0.ffn_gate_inp.weight").qtype == "F32"
    assert f.tensor("output.weight").qtype in ("Q6_K", "Q8_0")


def test_mixed_metadata_popularity_and_sensitivity(mixed, prof_path):
    f = mixed
    pop = np.array(f.metadata[layout.KEY_POPULARITY]).reshape(SHAPE.n_layer, SHAPE.n_expert)
    prof = read_profile(prof_path)
    counts = np.array([lay["counts"] for lay in prof["layers"]])
    np.testing.assert_allclose(pop, counts / prof["layers"][0]["tokens"], rtol=1e-6)
    sens = np.array(f.metadata[layout.KEY_SENSITIVITY]).reshape(SHAPE.n_layer, SHAPE.n_expert)
    assert (sens[counts > 0] > 0).all() and (sens < 1).all()


def _dequantized_stacked(path, out):
    """An F32 stacked-layout copy of `path`, decoded by gguf-py (independent of meldlite)."""
    r = GGUFReader(path)
    w = GGUFWriter(out, r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith(("GGUF.", "general.architecture", "meldlite.", "general.file_type")):
            continue
        sub = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    stacks = {}
    for t in r.tensors:
        a = gguf_dequantize(t.data, t.tensor_type).astype(np.float32)
        parsed = layout.parse_expert_name(t.name)
        if parsed:
            stacks.setdefault((parsed[0], parsed[1]), {})[parsed[2]] = a
        else:
            w.add_tensor(t.name, a)
    for (L, kind), experts in sorted(stacks.items()):
        w.add_tensor(layout.stacked_name(L, kind), np.stack([experts[e] for e in sorted(experts)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_meldlite_runs_the_mixed_file_like_the_reference(mixed, src, tokens, f16_logits, tmp_path):
    """meldlite on the mixed file against llama.cpp on gguf-py's decoding of it (F32)."""
    ref = llamacpp_logits(
        _dequantized_stacked(mixed.path, tmp_path / "deq.gguf"), tokens, n_ctx=128
    )
    m = meldlite.load(
        mixed.path, n_ctx=128, llama_numerics=False
    )  # float activations, as the F32 file
    got = m.logits(tokens)
    m.close()
    kl_runtime = kl_divergence(ref, got).mean()
    kl_quant = kl_divergence(f16_logits, ref).mean()
    assert kl_runtime < 1e-5 < kl_quant, (kl_runtime, kl_quant)
    assert top1_agreement(ref, got) == 1.0


def test_policy_gives_a_popular_expert_more_bits_than_a_rare_one(src, prof_path, tmp_path):
    """Route (almost) every calibration row and pick to expert 0 with a large weight,
    expert 1 never: expert 0 gets the most bytes in every layer, expert 1 the fewest."""
    prof = read_profile(prof_path)
    sample = [tuple(a.copy() for a in layer) for layer in load_calibration(prof)]
    for L, (x, ids, w) in enumerate(sample):
        ids[ids == 0] = 2
        ids[ids == 1] = 3
        ids[:, 0] = 0
        ids[:, 1] = np.where(ids[:, 1] == 0, 4, ids[:, 1])
        w[:, 0], w[:, 1] = 0.9, 0.1
        lay = prof["layers"][L]
        lay["counts"] = np.bincount(ids.ravel(), minlength=SHAPE.n_expert).tolist()
        lay["tokens"] = len(x)
    prof.calibration = sample
    r = quantize_model(src, tmp_path / "m.gguf", size=2_600_000, profile=prof)
    f = read_gguf(r.path)
    for L in range(SHAPE.n_layer):
        nbytes = [
            sum(f.expert_tensor(L, k, e).nbytes for k in layout.KINDS)
            for e in range(SHAPE.n_expert)
        ]
        assert nbytes[0] == max(nbytes) and nbytes[1] == min(nbytes) and nbytes[0] > nbytes[1], (
            nbytes
        )


def test_mixed_errors(src, prof_path, tmp_path):
    with pytest.raises(
        OptionError, match=r"smallest file this model can be quantized to \([0-9,]+ bytes\)"
    ):
        quantize_model(src, tmp_path / "m.gguf", size="1MB", profile=prof_path)
    old = {k: v for k, v in read_profile(prof_path).items() if k != "calibration"}
    (tmp_path / "v1.json").write_text(json.dumps(dict(old, version=1)))
    with pytest.raises(FormatError, match="no calibration data"):
        quantize_model(src, tmp_path / "m.gguf", size="3MB", profile=tmp_path / "v1.json")
    other = write_random_model(
        tmp_path / "other.gguf",
        "qwen3moe",
        dtype=np.float16,
        shape=Shape(n_layer=3, n_expert=4, n_ff_exp=128),
    )
    with pytest.raises(OptionError, match="profile is of a model with 2 layers x 8 experts"):
        quantize_model(other, tmp_path / "m.gguf", size="3MB", profile=prof_path)


def test_bpw_is_bits_per_parameter_of_the_whole_file(src, prof_path, tmp_path):
    n_params = sum(
        int(np.prod(read_gguf(src).tensor(n).shape)) for n in read_gguf(src).tensor_names()
    )
    p = _cli(src, tmp_path / "m.gguf", "--bpw", "2", "--profile", prof_path)
    assert p.returncode == 2 and f"size {n_params * 2 // 8:,} bytes is below" in p.stderr


def test_info_shows_the_expert_map(mixed):
    r = GGUFReader(mixed.path)  # the types as gguf-py reads them
    want = {}
    for t in r.tensors:
        parsed = layout.parse_expert_name(t.name)
        if parsed:
            want.setdefault(parsed[0], {}).setdefault(parsed[2], {})[parsed[1]] = t.tensor_type.name
    out = CliRunner().invoke(main, ["info", str(mixed.path)]).output
    for L in range(SHAPE.n_layer):
        line = next(x for x in out.splitlines() if x.strip().startswith(f"blk.{L}:"))
        counts = {}
        for kinds in want[L].values():
            t = [kinds[k] for k in layout.KINDS]
            label = t[0] if len(set(t)) == 1 else "/".join(t)
            counts[label] = counts.get(label, 0) + 1
        shown = dict(item.rsplit(" x", 1) for item in line.split(":", 1)[1].strip().split(", "))
        assert {k: int(v) for k, v in shown.items()} == counts
    full = CliRunner().invoke(main, ["info", str(mixed.path), "--experts"]).output
    assert full.count("popularity") == SHAPE.n_layer * SHAPE.n_expert


def test_info_marks_pruned_experts():
    """Expert 1 pruned with its tensors kept, expert 4 pruned and left out of the file."""
    d = {
        "expert_types": [
            [["Q4_K"] * 3, ["Q2_K"] * 3, ["Q4_K"] * 3, ["Q2_K", "Q2_K", "Q4_0"], ["pruned"] * 3]
        ],
        "expert_pruned": [[1, 4]],
        "expert_popularity": None,
        "expert_sensitivity": None,
    }
    assert list(info_cli._summary(d)) == ["  blk.0: Q4_K x2, Q2_K/Q2_K/Q4_0 x1, pruned x2"]
    rows = [x.split() for x in info_cli._full_map(d)]
    assert rows[2] == ["1", "Q2_K", "pruned"] and rows[5] == ["4", "-", "pruned"]


# -- the trained model (slow) -----------------------------------------------


@pytest.fixture(scope="module")
def trained(shared_models):
    """(F16 path, token ids of 20 held-out stories, llama.cpp's F16 logits of them)."""
    from conftest import valid_stories

    path = shared_models / "tinystories-moe-f16.gguf"
    m = meldlite.load(path, n_ctx=512)
    ids = [m.tokenize(s, add_bos=True)[:512] for s in valid_stories(shared_models, 20)]
    m.close()
    return path, ids, [llamacpp_logits(path, t, n_ctx=512) for t in ids]


def _kl_stories(path, trained, runtime="llama.cpp"):
    _, ids, ref = trained
    if runtime == "llama.cpp":
        got = [llamacpp_logits(path, t, n_ctx=512) for t in ids]
    else:
        m = meldlite.load(path, n_ctx=512)
        got = [m.logits(t) for t in ids]
        m.close()
    return float(np.concatenate([kl_divergence(r, g) for r, g in zip(ref, got)]).mean())


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["Q4_0", "Q2_K", "Q4_K", "Q6_K"])
def test_trained_uniform_file_is_as_good_as_llamacpp_pure(trained, qtype, tmp_path):
    ours = quantize_model(trained[0], tmp_path / "ours.gguf", qtype=qtype).path
    theirs = llamacpp_quantize(
        trained[0], tmp_path / "theirs.gguf", LLAMA_FTYPE.get(qtype, qtype), pure=True
    )
    kl_ours, kl_theirs = _kl_stories(ours, trained), _kl_stories(theirs, trained)
    assert 0 < kl_ours <= 1.2 * kl_theirs, (kl_ours, kl_theirs)


@pytest.mark.slow
def test_trained_mixed_file_beats_llamacpp_q3_k_m_at_its_size(trained, shared_models, tmp_path):
    """Profile on stories 200-319 of valid.txt, evaluate on stories 0-19."""
    from conftest import valid_stories

    m = meldlite.load(trained[0], n_ctx=512)
    prof = build_profile(m, "<|endoftext|>".join(valid_stories(shared_models, 320)[200:]))
    m.close()
    theirs = llamacpp_quantize(trained[0], tmp_path / "q3km.gguf", "Q3_K_M")
    ours = quantize_model(
        trained[0], tmp_path / "mixed.gguf", size=theirs.stat().st_size, profile=prof
    )
    assert ours.nbytes <= theirs.stat().st_size
    kl_ours, kl_theirs = _kl_stories(ours.path, trained, "meldlite"), _kl_stories(theirs, trained)
    assert kl_ours < 0.8 * kl_theirs, (kl_ours, kl_theirs)
