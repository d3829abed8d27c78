"""The MoE router kernel (kernels.route) against its NumPy reference (kernels.route_ref):
softmax and sigmoid gating, the selection bias, group-limited top-k, renormalisation and
the routed scaling factor, as llama.cpp's build_moe_ffn."""

import numpy as np
import pytest

from meldlite.kernels.route import GATINGS, route_gated
from meldlite.kernels.route_ref import route

CASES = [  # gating, selection bias, groups, groups used, norm, scale
    ("softmax", False, 0, 0, False, 0.0),
    ("softmax", False, 0, 0, True, 1.0),
    ("softmax", False, 4, 2, False, 1.0),  # DeepSeek-V2: group-limited greedy
    ("sigmoid", True, 4, 2, True, 2.5),  # DeepSeek-V3
    ("sigmoid", True, 0, 0, True, 2.827),  # Kimi-K2-like: one group
    ("sigmoid", False, 0, 0, False, 0.0),
    ("softmax_weight", False, 0, 0, False, 0.0),  # gpt-oss
]


@pytest.mark.parametrize("gating,biased,n_group,used,norm,scale", CASES)
def test_route_gated_matches_reference(gating, biased, n_group, used, norm, scale):
    rng = np.random.default_rng(7)
    n_tok, n_x, k = 40, 16, 4
    logits = (rng.standard_normal((n_tok, n_x)) * 2).astype(np.float32)  # (T, X)
    logits[0, 3] = logits[0, 9]  # a tie: lower id first
    logits[1, [2, 5]] = -np.inf  # pruned experts: never chosen
    bias = (
        (rng.standard_normal(n_x) * 0.5).astype(np.float32) if biased else np.zeros(0, np.float32)
    )
    ids = np.empty((n_tok, k), np.int32)
    weights = np.empty((n_tok, k), np.float32)
    route_gated(logits, k, GATINGS[gating], bias, n_group, used, norm, scale, ids, weights)
    want_ids, want_w = route(logits, k, norm, gating, bias, n_group, used, scale)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(weights, want_w, rtol=1e-6)  # exp: NumPy vs libm, 1 ulp
    assert not np.isin(ids[1], [2, 5]).any()
    if n_group:  # the chosen experts lie in at most `used` groups
        assert all(len(set(row // (n_x // n_group))) <= used for row in ids)
    if biased:  # the bias moves the choice but not the weights
        probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
        got = np.take_along_axis(probs, ids, axis=-1)
        if norm:
            got = got / got.sum(axis=-1, keepdims=True)
        np.testing.assert_allclose(weights, got * (scale or 1.0), rtol=1e-5)
