"""Threading layers and wait policies: the same logits under Numba's TBB and OpenMP layers
(x86 machines get TBB, ARM boards OpenMP), and the OpenMP spin default that respects what
the environment chose."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from meldlite.kernels.threads import SPIN_COUNT, bounded_spin

RUN = """
import json, sys, numba, numpy as np, meldlite
m = meldlite.load(None, n_ctx=64, n_threads=2)
logits = m._eval([1, 450, 2217, 2989, 727, 471], all_logits=True)
for _ in range(4):
    logits = np.concatenate([logits, m._eval([int(np.argmax(logits[-1]))], all_logits=False)])
print(json.dumps([numba.threading_layer(), logits.tobytes().hex()]))
"""


def run_with(layer):
    env = {**os.environ, "NUMBA_THREADING_LAYER": layer, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run(
        [sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=300
    )
    if out.returncode:
        return None, out.stderr.strip().splitlines()[-1]
    used, hexed = json.loads(out.stdout.strip().splitlines()[-1])
    return used, np.frombuffer(bytes.fromhex(hexed), np.float32)


def test_tbb_and_omp_layers_give_the_same_bits():
    omp_layer, omp = run_with("omp")
    assert omp_layer == "omp", omp
    tbb_layer, tbb = run_with("tbb")
    if tbb_layer is None:
        pytest.skip(f"Numba's TBB layer is not available here: {tbb}")
    assert tbb_layer == "tbb"
    np.testing.assert_array_equal(tbb, omp)
    assert omp.size == 10 * 4096 and np.isfinite(omp).all()


@pytest.mark.parametrize(
    "env, spin",
    [
        ({}, SPIN_COUNT),  # nothing chosen: bounded spinning
        ({"OMP_WAIT_POLICY": "passive"}, None),  # the user's policy stands
        ({"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "5"}, "5"),
        ({"GOMP_SPINCOUNT": "100"}, "100"),
    ],
)
def test_bounded_spin_keeps_the_environments_choice(env, spin):
    environ = dict(env)
    assert bounded_spin(environ) == spin
    assert environ.get("GOMP_SPINCOUNT") == (spin if spin else env.get("GOMP_SPINCOUNT"))
    assert environ.get("OMP_WAIT_POLICY") == env.get("OMP_WAIT_POLICY")


def test_attention_heads_in_parallel_give_the_serial_bits():
    """The KV-head groups run in parallel above ATTEND_PARALLEL_MIN: the same bits as one
    thread, and the NumPy reference's values (kernels.attention_ref)."""
    from meldlite.kernels import attention, attention_ref, set_threads

    rng = np.random.default_rng(7)
    n_tok, n_head, n_kv, d, pos0 = 40, 8, 4, 64, 30
    kc = rng.standard_normal((pos0 + n_tok, n_kv, d)).astype(np.float16)
    vc = rng.standard_normal((pos0 + n_tok, n_kv, d)).astype(np.float16)
    q = rng.standard_normal((n_tok, n_head * d)).astype(np.float32)
    assert n_tok * n_head * (pos0 + n_tok) * 2 * d >= attention.ATTEND_PARALLEL_MIN
    outs = []
    for n in (1, 2):
        set_threads(n)
        out = np.empty((n_tok, n_head * d), np.float32)
        attention.attention_rows(
            q, kc.view(np.uint16), vc.view(np.uint16), pos0, n_head, 0.125, out
        )
        outs.append(out)
    set_threads(None)
    np.testing.assert_array_equal(outs[0], outs[1])
    want = attention_ref.attention(q.reshape(n_tok, n_head, d), kc, vc, pos0, 0.125, 0, None)
    want = want.reshape(n_tok, -1)  # (T, H*D); probabilities rounded to f16 on both sides
    assert np.linalg.norm(outs[1] - want) / np.linalg.norm(want) < 1e-5
