"""The runtime on files in the per-expert layout written by `meldlite pack`."""

import numpy as np
import pytest

import meldlite
from meldlite.data import default_model_path
from meldlite.formats import pack, read_gguf


def test_repacked_model_gives_identical_logits(tmp_path):
    """Re-laying the experts out one tensor each changes no byte of them, so the
    logits are bit-identical to the stacked file's."""
    out = pack(default_model_path(), tmp_path / "packed.gguf", "SRC").path
    assert read_gguf(out).expert_layout == "per_expert"
    ref = meldlite.load()
    ours = meldlite.load(out)
    ids = ref.tokenize("One day, Tom found a shiny red ball in the park.")
    np.testing.assert_array_equal(ours.logits(ids), ref.logits(ids))


def test_mixed_precision_file_runs_and_reports_its_types(tmp_path):
    llama_cpp_helpers = pytest.importorskip("helpers_models")
    pytest.importorskip("llama_cpp")
    from conftest import SHARED

    if not (SHARED / "tinystories-moe-f16.gguf").exists():
        pytest.skip("the trained model in ../shared/models is not here")
    q8 = llama_cpp_helpers.llamacpp_quantize(
        SHARED / "tinystories-moe-f16.gguf", tmp_path / "q8.gguf", "Q8_0"
    )
    out = pack(
        default_model_path(), tmp_path / "mixed.gguf", "SRC,2.*=Q8_0,0.5=Q8_0", {"Q8_0": q8}
    ).path
    m = meldlite.load(out)
    types = m.info()["expert_types"]
    assert types[2][7] == ["Q8_0", "Q8_0", "Q8_0"] and types[0][5] == ["Q8_0"] * 3
    assert types[0][4] == ["Q4_K", "Q4_K", "Q5_0"]
    ids = m.tokenize("Once upon a time")
    full = meldlite.load().logits(ids)
    mixed = m.logits(ids)
    # more bits for some experts: close to the Q4_K_M file, not identical
    assert not np.array_equal(mixed, full)
    assert (mixed.argmax(-1) == full.argmax(-1)).mean() >= 0.8
