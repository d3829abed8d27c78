"""Expert pruning (meldlite.compress.prune and the runtime's router mask).

The reference for a pruned model is llama.cpp on the same model with the pruned
experts physically removed (expert_count lowered, their router rows and expert
slices dropped): its softmax then runs over the remaining experts only, which is
exactly what masking a logit with -inf before softmax and top-k means.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType
from helpers_models import Shape, write_random_model

import meldlite
from meldlite.cli import main as cli_main
from meldlite.compress.prune import (
    least_used,
    prune_count,
    prune_file,
    pruned_metadata,
    remove_experts,
)
from meldlite.errors import FormatError, OptionError, UnsupportedError
from meldlite.formats import layout, read_gguf
from meldlite.formats.pack import TensorOut, write_atomic
from meldlite.formats.profile import FORMAT, READS
from meldlite.kernels.attention import route_rows
from meldlite.kernels.attention_ref import route
from meldlite.model import forward

SHAPE = Shape(n_expert=8, n_expert_used=2, n_layer=2, n_ff_exp=128, n_ff_shexp=128)
N_PRUNE = 3


def tokens(n=64, seed=3):
    rng = np.random.default_rng(seed)
    return [1] + rng.integers(3, 4096, n - 1).tolist()


def popularity(seed=5):
    rng = np.random.default_rng(seed)
    return rng.random((SHAPE.n_layer, SHAPE.n_expert))  # (L, X)


def profile_dict(pop):
    return {
        "format": FORMAT,
        "version": max(READS),
        "model": {"n_layer": pop.shape[0], "n_expert": pop.shape[1]},
        "layers": [{"share": list(map(float, row))} for row in pop],
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    made = {}

    def get(arch):
        if arch not in made:
            src = write_random_model(root / f"{arch}.gguf", arch, shape=SHAPE, seed=11)
            pruned = prune_file(
                src, root / f"{arch}-pruned.gguf", profile_dict(popularity()), N_PRUNE
            )
            made[arch] = (src, pruned.path)
        return made[arch]

    return get


# -- the mask in the router kernel ---------------------------------------------


@pytest.mark.parametrize("norm_topk", [True, False])
def test_route_rows_never_picks_masked_experts(norm_topk):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((32, 8)).astype(np.float32) * 3  # (T, X)
    pruned = [1, 4, 6]
    kept = np.array([e for e in range(8) if e not in pruned])
    masked = logits.copy()
    masked[:, pruned] = -np.inf
    ids = np.empty((32, 3), np.int32)
    weights = np.empty((32, 3), np.float32)
    route_rows(masked, 3, norm_topk, ids, weights)
    ref_ids, ref_w = route(logits[:, kept], 3, norm_topk)  # NumPy, experts removed
    np.testing.assert_array_equal(ids, kept[ref_ids])
    np.testing.assert_allclose(weights, ref_w, rtol=1e-6)


# -- the runtime against llama.cpp ---------------------------------------------


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_pruned_logits_match_llamacpp_without_those_experts(models, arch, tmp_path):
    pytest.importorskip("llama_cpp")
    from helpers_models import llamacpp_logits

    src, pruned = models(arch)
    flags = least_used(popularity(), N_PRUNE)  # (L, X)
    ref_path = remove_experts(src, tmp_path / "removed.gguf", flags)
    ids = tokens()
    ref = llamacpp_logits(ref_path, ids)  # (T, V)
    m = meldlite.load(pruned, n_ctx=128)
    ours = m.logits(ids)  # (T, V)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel <= 1e-3, f"max |diff| / max |logit| = {rel:.2e}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    unpruned = meldlite.load(src, n_ctx=128).logits(ids)
    assert np.abs(unpruned - ref).max() > 10 * np.abs(ours - ref).max()  # pruning mattered


def test_pruned_experts_are_never_routed_and_absent(models):
    src, pruned = models("qwen3moe")
    flags = least_used(popularity(), N_PRUNE)
    f = read_gguf(pruned)
    names = set(f.tensor_names())
    for L, e in zip(*np.nonzero(flags)):
        assert layout.expert_name(L, "gate", e) not in names
        assert not f.expert_present(L, e)
        with pytest.raises(OptionError, match="pruned"):
            f.expert_tensor(L, "up", e)
    assert f.expert_types(0)[int(np.flatnonzero(flags[0])[0])] == ("pruned",) * 3
    assert pruned.stat().st_size < src.stat().st_size
    m = meldlite.load(pruned, n_ctx=128)
    seen = []
    forward(
        m.cfg,
        m.weights,
        m.store,
        m.cache,
        np.asarray(tokens()),
        on_route=lambda layer, h, ids, weights: seen.append((layer, ids.copy())),
    )
    for layer, ids in seen:
        assert not flags[layer][ids].any()
    want = m.logits(tokens())  # (T, V)
    cached = meldlite.load(pruned, n_ctx=128, mem_budget="100%")
    assert np.array_equal(cached.logits(tokens()), want)
    assert cached.stats()["loads_pruned"] == 0


def test_nothing_pruned_is_bit_identical(models, tmp_path):
    src, _ = models("qwen3moe")
    zero = prune_file(src, tmp_path / "zero.gguf", profile_dict(popularity()), 0).path
    m = meldlite.load(zero, n_ctx=128)
    assert m.cfg.expert_pruned == () and m.cfg.router_bias(0).shape == (0,)
    assert read_gguf(zero).metadata[layout.KEY_PRUNED] == [0] * SHAPE.n_layer * SHAPE.n_expert
    ids = tokens()
    np.testing.assert_array_equal(m.logits(ids), meldlite.load(src, n_ctx=128).logits(ids))


# -- choosing and recording ----------------------------------------------------


def test_prune_count_parses_counts_and_fractions():
    assert prune_count("3", 8, 2) == 3
    assert prune_count("0.25", 8, 2) == 2
    assert prune_count(0, 8, 2) == 0
    for bad in ("7", "-1", "1.5", "2.5e0", "x", "1.0"):
        with pytest.raises(OptionError):
            prune_count(bad, 8, 2)


def test_least_used_takes_lowest_popularity_and_keeps_earlier_pruning():
    pop = np.array([[0.3, 0.1, 0.2, 0.1, 0.3], [0.5, 0.0, 0.2, 0.2, 0.1]])
    np.testing.assert_array_equal(least_used(pop, 2), [[0, 1, 0, 1, 0], [0, 1, 0, 0, 1]])
    already = np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], bool)
    np.testing.assert_array_equal(least_used(pop, 2, already), [[1, 1, 0, 0, 0], [0, 1, 0, 0, 1]])


def test_pruning_a_pruned_file_adds_to_it(models, tmp_path):
    _, pruned = models("qwen3moe")
    again = prune_file(
        pruned, tmp_path / "again.gguf", profile_dict(popularity(seed=9)), N_PRUNE + 2
    )
    flags = np.array(read_gguf(again.path).metadata[layout.KEY_PRUNED]).reshape(SHAPE.n_layer, -1)
    assert (flags.sum(axis=1) == N_PRUNE + 2).all()
    assert flags[least_used(popularity(), N_PRUNE)].all()


def test_bad_pruning_metadata_is_a_format_error(models, tmp_path):
    src, _ = models("qwen3moe")
    f = read_gguf(src)
    copy = [TensorOut.copy(n, f.tensor(n)) for n in f.tensor_names()]
    flags = np.zeros((SHAPE.n_layer, SHAPE.n_expert), bool)
    flags[1, : SHAPE.n_expert - 1] = True  # leaves 1 < k = 2
    write_atomic(tmp_path / "few.gguf", f, copy, [pruned_metadata(flags)])
    with pytest.raises(FormatError, match="keeps 1 experts"):
        meldlite.load(tmp_path / "few.gguf")
    short = (layout.KEY_PRUNED, [1, 0], GGUFValueType.ARRAY, GGUFValueType.UINT8)
    write_atomic(tmp_path / "short.gguf", f, copy, [short])
    with pytest.raises(FormatError, match="expected n_layer"):
        meldlite.load(tmp_path / "short.gguf")


@pytest.mark.parametrize(
    "command", [["pack", "--expert-types", "SRC"], ["quantize", "--type", "Q8_0"]]
)
def test_cli_prune_experts(models, tmp_path, command):
    src, _ = models("qwen3moe")
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps(profile_dict(popularity())))
    out = tmp_path / "out.gguf"
    name, *opts = command
    r = CliRunner().invoke(
        cli_main,
        [name, str(src), str(out), *opts, "--prune-experts", "0.25", "--profile", str(prof)],
    )
    assert r.exit_code == 0, r.output
    f = read_gguf(out)
    flags = np.array(f.metadata[layout.KEY_PRUNED]).reshape(SHAPE.n_layer, -1)
    np.testing.assert_array_equal(flags, least_used(popularity(), 2))
    assert f.expert_layout == layout.PER_EXPERT and not f.expert_present(*np.argwhere(flags)[0])
    for bad in (["--prune-experts", "7", "--profile", str(prof)], ["--prune-experts", "2"]):
        r = CliRunner().invoke(cli_main, [name, str(src), str(tmp_path / "bad.gguf"), *opts, *bad])
        assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output
        assert not (tmp_path / "bad.gguf").exists()


def test_remove_experts_needs_equal_counts_and_the_stacked_layout(models, tmp_path):
    src, pruned = models("qwen3moe")
    flags = np.zeros((SHAPE.n_layer, SHAPE.n_expert), bool)
    flags[0, 0] = True
    with pytest.raises(OptionError, match="same number"):
        remove_experts(src, tmp_path / "x.gguf", flags)
    with pytest.raises(UnsupportedError, match="stacked"):
        remove_experts(pruned, tmp_path / "x.gguf", flags)
