"""Routing profiles: `meldlite profile`, the JSON format, and seeding the cache from it."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from conftest import valid_stories
from gguf import GGUFReader
from helpers_models import Shape, write_random_model

import meldlite
from meldlite.errors import FormatError, OptionError
from meldlite.experts.profile import build_profile, recurrence
from meldlite.formats.profile import (
    FORMAT,
    VERSION,
    decode_array,
    load_calibration,
    load_prior,
    read_profile,
    save_profile,
)

SMALL = Shape(
    n_vocab=4096,
    n_embd=128,
    n_layer=3,
    n_head=2,
    n_head_kv=1,
    head_dim=64,
    n_ff=128,
    n_expert=8,
    n_expert_used=2,
    n_ff_exp=64,
    n_ctx=128,
)
TEXT = (
    "Once upon a time, there was a little dog. He liked to run.<|endoftext|>"
    "Tom had a red ball. He played with it every day in the sun.<|endoftext|>"
    "The cat sat on the mat and looked at the bird."
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_random_model(
        tmp_path_factory.mktemp("prof") / "small.gguf", "qwen3moe", shape=SMALL, dtype=np.float16
    )


@pytest.fixture(scope="module")
def profile(model_path):
    m = meldlite.load(model_path, n_ctx=64)
    prof = build_profile(m, TEXT, text_name="three stories")
    m.close()
    return prof


def test_profile_format_and_counts(profile):
    L, X, k = SMALL.n_layer, SMALL.n_expert, SMALL.n_expert_used
    assert profile["format"] == FORMAT and profile["version"] == VERSION
    assert profile["model"]["n_layer"] == L and profile["model"]["n_expert"] == X
    assert profile["text"]["documents"] == 3 and profile["text"]["file"] == "three stories"
    n = profile["text"]["tokens"]
    assert len(profile["layers"]) == L
    for i, lay in enumerate(profile["layers"]):
        counts = np.array(lay["counts"])
        assert lay["tokens"] == n and counts.sum() == n * k
        assert np.isclose(sum(lay["share"]), 1, atol=1e-4)
        assert np.isclose(
            sum(lay["weight_mass"]), 1, atol=1e-4
        )  # renormalised weights sum 1 per token
        co = np.array(lay["coactivation"])
        assert co.shape == (X, X) and (co == co.T).all() and (np.diag(co) == counts).all()
        rec = [lay["recurrence"][str(w)] for w in profile["windows"]]
        assert all(0 <= r <= 1 for r in rec) and rec == sorted(rec)  # a longer window sees more
        assert 0 < lay["entropy_ratio"] <= 1
        assert len(lay["slot_weight_mean"]) == k
        assert lay["slot_weight_mean"] == sorted(lay["slot_weight_mean"], reverse=True)
        sq = decode_array(lay["input_sq_mean"])
        assert sq.shape == (X, SMALL.n_embd) and (sq >= 0).all()
        if i + 1 < L:
            nxt = np.array(lay["next_layer_coactivation"])
            assert nxt.shape == (X, X) and nxt.sum() == n * k * k
        if i > 0:
            assert 0 <= lay["prediction"]["exact"] <= lay["prediction"]["overlap"] <= 1
        else:
            assert "prediction" not in lay


def test_calibration_sample_is_routed_as_the_router_says(profile, model_path, tmp_path):
    """The sample's rows are the experts' inputs: the file's router (read with gguf-py)
    picks the recorded experts with the recorded weights."""
    path = save_profile(profile, tmp_path / "p.json")
    meta = read_profile(path)["calibration"]
    assert (tmp_path / meta["file"]).exists() and meta["seen"] == profile["text"]["tokens"]
    sample = load_calibration(path)
    r = GGUFReader(model_path)
    k = SMALL.n_expert_used
    for L, (x, ids, w) in enumerate(sample):
        assert len(x) == profile["text"]["tokens"] == meta["rows"][L]  # small text: all rows kept
        router = next(t for t in r.tensors if t.name == f"blk.{L}.ffn_gate_inp.weight")
        logits = x.astype(np.float64) @ np.asarray(router.data, np.float64).T  # (n, X)
        top = np.argsort(-logits, axis=1)[:, :k]
        same = [set(a) == set(b) for a, b in zip(top, ids)]
        assert np.mean(same) > 0.95  # x is kept as float16
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        pk = np.take_along_axis(p, ids.astype(np.int64), 1)
        rows = np.flatnonzero(same)
        np.testing.assert_allclose(w[rows], (pk / pk.sum(1, keepdims=True))[rows], atol=2e-2)


def test_calibration_sample_is_bounded_and_optional(model_path, tmp_path):
    m = meldlite.load(model_path, n_ctx=64)
    prof = build_profile(m, TEXT, calib_rows=7)
    assert prof["calibration"]["rows"] == [7] * SMALL.n_layer
    x0, _ids0, _ = prof.calibration[0]
    x1, _ids1, _ = prof.calibration[1]
    assert x0.shape == (7, SMALL.n_embd) and not np.array_equal(x0, x1)  # another layer's inputs
    none = build_profile(m, TEXT, calib_rows=0)
    m.close()
    assert "calibration" not in none
    with pytest.raises(FormatError, match="no calibration data"):
        load_calibration(read_profile(save_profile(none, tmp_path / "n.json")))


def test_version_1_profiles_still_read(profile, tmp_path):
    old = {k: v for k, v in profile.items() if k != "calibration"}
    (tmp_path / "v1.json").write_text(json.dumps(dict(old, version=1)))
    prof = read_profile(tmp_path / "v1.json")
    assert prof["version"] == 1 and prof["layers"][0]["counts"] == profile["layers"][0]["counts"]
    with pytest.raises(FormatError, match="no calibration data"):
        load_calibration(prof)


def test_recurrence_counts_picks_seen_in_the_window():
    ids = np.array([[0, 1], [1, 2], [3, 4], [0, 4]])  # tokens x top-2
    # token 1: 1 seen (of 2); token 2: none; token 3: 4 seen (window 1), 0 and 4 (window 3)
    assert recurrence([ids], 5, 1) == pytest.approx(2 / 6)
    assert recurrence([ids], 5, 3) == pytest.approx(3 / 6)
    assert recurrence([ids[:2], ids[2:]], 5, 3) == pytest.approx(2 / 4)  # not across documents


def test_save_read_and_seed_a_cache(profile, model_path, tmp_path):
    path = save_profile(profile, tmp_path / "p.json")
    back = read_profile(path)
    assert back["layers"][1]["counts"] == profile["layers"][1]["counts"]
    m = meldlite.load(model_path, n_ctx=32, mem_budget="50%", cache_policy="lfu", profile=path)
    counts = m.store.policy.count.reshape(SMALL.n_layer, SMALL.n_expert)
    share = np.array([lay["share"] for lay in profile["layers"]])
    assert np.corrcoef(counts.ravel(), share.ravel())[0, 1] > 0.99
    m.close()
    m = meldlite.load(model_path, n_ctx=32, mem_budget="50%", cache_policy="forecast", profile=path)
    assert m.store.policy.p.std() > 0  # uniform without a profile
    m.close()


def test_bad_profiles_are_clear_errors(profile, model_path, tmp_path):
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(FormatError, match="not a JSON profile"):
        read_profile(tmp_path / "junk.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(FormatError, match="not a meldlite expert profile"):
        read_profile(tmp_path / "other.json")
    (tmp_path / "v9.json").write_text(json.dumps(dict(profile, version=9)))
    with pytest.raises(FormatError, match="version 9"):
        read_profile(tmp_path / "v9.json")
    cfg = meldlite.load(model_path, n_ctx=16).cfg
    with pytest.raises(OptionError, match="4 layers"):
        load_prior(dict(profile, model=dict(profile["model"], n_layer=4)), cfg)
    with pytest.raises(OptionError, match="mem_budget"):
        meldlite.load(model_path, n_ctx=16, profile=tmp_path / "other.json")


def test_cli_profile(model_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "prof.json"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "meldlite",
            "profile",
            str(model_path),
            str(text),
            "-o",
            str(out),
            "-c",
            "64",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"wrote {out}") and "route recurrence" in p.stdout
    assert read_profile(out)["text"]["documents"] == 3
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "meldlite",
            "run",
            str(model_path),
            "-n",
            "1",
            "--mem-budget",
            "50%",
            "--profile",
            str(text),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_dense_model_has_no_profile(tmp_path):
    dense = write_random_model(tmp_path / "dense.gguf", "llama", shape=replace(SMALL, n_layer=1))
    m = meldlite.load(dense, n_ctx=32)
    with pytest.raises(OptionError, match="Mixture-of-Experts"):
        build_profile(m, TEXT)


def test_trained_model_profile_matches_its_readme(shared_models):
    m = meldlite.load(shared_models / "tinystories-moe-f16.gguf", n_ctx=512)
    prof = build_profile(m, "<|endoftext|>".join(valid_stories(shared_models, 6)))
    m.close()
    # README (200 stories): next-layer prediction overlap 0.79-0.84, routing entropy 0.97-0.99 of max
    assert 0.7 < prof["summary"]["prediction_overlap"] < 0.9
    assert prof["summary"]["entropy_ratio"] > 0.9
    rec = prof["summary"]["recurrence"]
    assert rec["1"] > 4 / 32  # more than chance (k / n_expert)
