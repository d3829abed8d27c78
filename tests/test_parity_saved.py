"""Logit parity with llama.cpp logits saved on another machine.

scripts/parity_refs.py writes llama.cpp's logits (and meldlite's there) for a few model
files, where llama-cpp-python is installed; this test runs meldlite on the same files
here, e.g. on aarch64 under emulation (scripts/test-arm64.sh), where it is not. The
gates are test_parity's (helpers_parity). Skipped unless MELDLITE_PARITY_REFS names the
refs.npz.
"""

import json
import os
import pathlib

import numpy as np
import pytest
from helpers_parity import AGREE_FLOOR, MEAN_KL, assert_float_close, quant_stats

import meldlite
from meldlite.data import default_model_path

REFS = os.environ.get("MELDLITE_PARITY_REFS")
if not REFS or not os.path.exists(REFS):
    pytest.skip("MELDLITE_PARITY_REFS names no refs.npz", allow_module_level=True)
SAVED = np.load(REFS)
CASES = json.loads(str(SAVED["cases"]))
_logits = {}


def ours(case):
    """meldlite's logits (T, V) on this machine for one saved case, computed once."""
    name = case["name"]
    if name not in _logits:
        path = pathlib.Path(REFS).parent / case["file"] if case["file"] else default_model_path()
        ids = SAVED[f"{name}.ids"].tolist()
        _logits[name] = meldlite.load(path, n_ctx=case["n_ctx"]).logits(ids)
    return _logits[name]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_saved_logits_match_llamacpp(case):
    got, ref = ours(case), SAVED[f"{case['name']}.llama"]
    if case["kind"] == "float":
        assert assert_float_close(got, ref) == 0, "argmax flips"
    else:
        kl, agree = quant_stats(got, ref)
        assert kl.mean() <= MEAN_KL, f"mean KL {kl.mean():.2e}"
        assert agree.mean() >= AGREE_FLOOR, f"argmax agreement {agree.mean():.3f}"
