"""The fast paths against their references.

- qdot: activations quantized exactly as actquant rounds them; integer (and float-lane)
  matmuls equal a float64 product with the rounded activations up to float rounding,
  the same bits for a token alone or in a batch, on 1 or 2 threads;
- moe_ffn(llama_numerics=True): the integer MoE against the float kernel on rounded inputs,
  batch == token by token bit for bit;
- attention: the jitted attention pieces against their NumPy reference (kernels.attention_ref).
"""

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from test_kernels import EXPERT_TYPES, N_EMBD, N_FF, random_matrix, rel_err, routing

from meldlite import kernels
from meldlite.kernels import attention, attention_ref, qdot
from meldlite.kernels.actquant import MODE_BY_ID, NONE, mode_of, round_activations_reference
from meldlite.kernels.mathops import rope_tables
from meldlite.kernels.moe import NO_BIAS, moe_ffn_kernel
from meldlite.kernels.reference import matmul_ref

FAST = ["Q4_K", "Q6_K", "Q8_0", "Q4_0", "Q5_0", "Q5_K", "Q3_K", "Q2_K", "IQ4_XS", "IQ4_NL"]
FAST += ["Q4_1", "Q5_1", "MXFP4", "F16", "F32"]
FALLBACK = ["BF16"]


def cols(qtype):
    return 512 if qtype in (T.F16, T.F32, T.BF16) else 1024


def q8_1_sums(x):
    """llama.cpp's block_q8_1 s per block of 32 of x (T, n): f16(d * sum of the codes),
    d = amax/127 in float32, unrounded (quantize_row_q8_1); and the codes' sums (T, n/32)."""
    b = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(b).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    sums = np.rint(b * inv[..., None]).sum(-1).astype(np.float32)
    d = (amax / np.float32(127)).astype(np.float32)
    return (d * sums).astype(np.float16).astype(np.float32), sums


def q8_1_min_term(raw, qtype, x):
    """What llama.cpp's Q4_1/Q5_1 product adds to the float product with the rounded
    activations (T, rows): per block m * (s - f16(d) * sum), its s being f16-rounded."""
    s, sums = q8_1_sums(x)
    da = (np.abs(x.reshape(x.shape[0], -1, 32)).max(-1) / np.float32(127)).astype(np.float16)
    nb = x.shape[1] // 32
    m = raw.reshape(raw.shape[0], nb, -1)[:, :, 2:4].copy().view(np.float16)[..., 0]  # (rows, nb)
    diff = s.astype(np.float64) - da.astype(np.float64) * sums  # (T, nb)
    return diff @ m.astype(np.float64).T


@pytest.mark.parametrize("name", ["Q4_K", "Q8_0", "Q4_1", "F16", "BF16", "F32"])
def test_quantize_rows_equals_actquant(name):
    qtype = T[name]
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((4, 512)) * np.exp(rng.uniform(-8, 6, (4, 512)))).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero block
    qa, da, bs, xr = qdot.empty_acts(4, 512)
    qdot.quantize_rows(x, mode_of(qtype), qa, da, bs, xr)
    ref = round_activations_reference(x, qtype)
    np.testing.assert_array_equal(xr, ref)  # as values: codes of 0 give +0.0 where ref has -0.0
    mode = mode_of(qtype)
    if mode in (3, 4, 5):  # Q8_0 / Q8_K / Q8_1 codes and sums
        per = 256 if mode == 4 else 32
        np.testing.assert_array_equal(
            qa.astype(np.float32) * np.repeat(da[:, : 512 // per], per, axis=1), xr
        )
        sums = qa.reshape(4, 16, 32).astype(np.int32).sum(-1)
        if mode == 5:  # Q8_1: bs holds the bits of s = f16(d * sum)
            s, ref_sums = q8_1_sums(x)
            np.testing.assert_array_equal(sums, ref_sums)
            np.testing.assert_array_equal(bs[:, :16].view(np.float32), s)
        else:
            np.testing.assert_array_equal(bs[:, :16], sums)


@pytest.mark.parametrize("name", FAST + FALLBACK)
def test_qmatmul_equals_rounded_float64_product(name):
    qtype = T[name]
    rng = np.random.default_rng(20 + int(qtype))
    n_cols = cols(qtype)
    raw = random_matrix(rng, qtype, 70, n_cols)
    x = rng.standard_normal((5, n_cols)).astype(np.float32)
    y = kernels.qmatmul(raw, qtype, x)  # (5, 70)
    want = matmul_ref(raw, qtype, round_activations_reference(x, qtype))
    if qtype in (T.Q4_1, T.Q5_1):  # Q8_1's f16-rounded block sums, as llama.cpp's
        want += q8_1_min_term(raw, qtype, x)
    assert y.shape == (5, 70) and y.dtype == np.float32
    assert rel_err(y, want) < 2e-6
    np.testing.assert_array_equal(kernels.qmatmul(raw, qtype, x[2]), y[2])  # batch-invariant


@pytest.mark.parametrize("name", FAST)
def test_qmatmul_threads_and_parallel_split(name):
    """A matrix big enough for the parallel row loop gives the serial loop's bits, and
    so does one thread, for every type with a fast path."""
    qtype = T[name]
    rng = np.random.default_rng(30)
    n_cols = cols(qtype)
    raw = random_matrix(rng, qtype, 300, n_cols)
    raw.flags.writeable = False
    x = rng.standard_normal((3, n_cols)).astype(np.float32)
    qa, da, bs, xr = qdot.empty_acts(3, n_cols)
    qdot.quantize_rows(x, mode_of(qtype), qa, da, bs, xr)
    toks = np.arange(3)
    a, b = np.empty((3, 300), np.float32), np.empty((3, 300), np.float32)
    qdot.matmul_parallel(raw, int(qtype), qa, da, bs, xr, toks, a, True)
    qdot.matmul_serial(raw, int(qtype), qa, da, bs, xr, toks, b, True)
    np.testing.assert_array_equal(a, b)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = kernels.qmatmul(raw, qtype, x)
        numba.set_num_threads(threads)
        two = kernels.qmatmul(raw, qtype, x)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(one, a)
    np.testing.assert_array_equal(two, a)


def test_float_activations_take_the_float_path():
    """mode NONE (llama_numerics=False): quantized types multiply float x, unrounded."""
    rng = np.random.default_rng(31)
    raw = random_matrix(rng, T.Q4_K, 40, 512)
    raw.flags.writeable = False
    x = rng.standard_normal((2, 512)).astype(np.float32)
    out = np.empty((2, 40), np.float32)
    qdot.linear(raw, int(T.Q4_K), NONE, x, out)
    assert rel_err(out, matmul_ref(raw, T.Q4_K, x)) < 2e-6


def test_integer_kernels_vectorize():
    """The row kernels compile to vector integer multiply-adds: vpmaddubsw (u8 x s8 pairs)
    then vpmaddwd / vpdpwssd, no multiplies on 64-bit lanes - skipped without AVX2."""
    import llvmlite.binding as llvm

    if "+avx2" not in llvm.get_host_cpu_features().flatten():
        pytest.skip("no AVX2 on this CPU")
    from numba import types as nt

    mat = nt.Array(nt.uint8, 2, "C", readonly=True)
    i8, f32, i32 = (nt.Array(d, 2, "C") for d in (nt.int8, nt.float32, nt.int32))
    i64, ids = nt.int64, nt.Array(nt.int64, 1, "C")
    sigs = {
        qdot.dot_q4_k: (mat, i64, i8, f32, i32, i64, i64),
        qdot.dot_q6_k: (mat, i64, i8, f32, i64, i64),
        qdot.dot_q8_0: (mat, i64, i8, f32, i64, i64),
        qdot.rows_typed: (mat, i64, i64, i64, i8, f32, i32, ids, f32, i64, i64),  # the others
    }
    for fn, sig in sigs.items():  # an uncached copy: Numba cannot inspect cached code
        fresh = numba.njit(error_model="numpy")(fn.py_func)
        fresh.compile(sig)
        asm = fresh.inspect_asm(fresh.signatures[0])
        assert "vpmaddubsw" in asm, fn.__name__
        assert any(op in asm for op in ("vpdpwssd", "vpmaddwd")), fn.__name__
        assert not any(op in asm for op in ("vpmuldq", "vpmullq")), fn.__name__  # no int64 lanes


def _sum_kernels():
    """Fresh (uncached) jitted loops over blocks calling the simd block sums, compiled
    with simd's flags as they are when called (tests switch the x86 path off)."""
    from meldlite.kernels import simd

    def q4k(blocks, qa, bs, out):
        for i in range(blocks.shape[0]):
            out[i, 0], out[i, 1] = simd.q4k_sums(blocks[i], 0, qa[i], 0, bs[i], 0)

    def q6k(blocks, qa, out):
        for i in range(blocks.shape[0]):
            out[i] = simd.q6k_sum(blocks[i], 0, qa[i], 0)

    return [numba.njit(f) for f in (q4k, q6k)]


@pytest.mark.parametrize("x86", [True, False])
def test_simd_block_sums_equal_numpy_references(x86, monkeypatch):
    """Exact integer sums against gguf-py-based references; x86=False compiles the generic
    vector IR that other CPUs get."""
    from meldlite.kernels import reference, simd

    if x86 and not simd.AVX2:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setattr(simd, "AVX2", x86)
    q4k, q6k = _sum_kernels()
    rng = np.random.default_rng(60)
    n = 300
    blocks = random_matrix(rng, T.Q4_K, n, 256)
    blocks[0, 4:16] = 255  # all scale/min bits set
    qa = rng.integers(-128, 128, (n, 256), dtype=np.int8)
    qa[1] = -128
    bs = qa.reshape(n, 8, 32).sum(-1, dtype=np.int32)
    out = np.empty((n, 2), np.int32)
    q4k(blocks, qa, bs, out)
    isum, msum = reference.q4k_sums_ref(blocks, qa, bs)
    np.testing.assert_array_equal(out[:, 0], isum)
    np.testing.assert_array_equal(out[:, 1], msum)
    blocks = random_matrix(rng, T.Q6_K, n, 256)
    blocks[0, :192] = 255  # codes 63
    blocks[1, 128:192] = 0  # codes < 16
    got = np.empty(n, np.int32)
    q6k(blocks, qa, got)
    np.testing.assert_array_equal(got, reference.q6k_sum_ref(blocks, qa))


def _block_sums(name):
    """A fresh jitted loop over blocks calling the simd sums of `name`: out (n, 2) int32
    (isum, msum; msum only for Q5_K and Q2_K). The 32-value types: 5 blocks (160 values)
    per item, four through their *_sums4 and the fifth through *_sum1."""
    from meldlite.kernels import simd

    def q5k(blocks, qa, bs, out):
        for i in range(blocks.shape[0]):
            out[i, 0], out[i, 1] = simd.q5k_sums(blocks[i], 0, qa[i], 0, bs[i], 0)

    def q2k(blocks, qa, bs, out):
        for i in range(blocks.shape[0]):
            out[i, 0], out[i, 1] = simd.q2k_sums(blocks[i], 0, qa[i], 0)

    def q3k(blocks, qa, bs, out):
        for i in range(blocks.shape[0]):
            out[i, 0] = simd.q3k_sum(blocks[i], 0, qa[i], 0)

    def iq4xs(blocks, qa, bs, out):
        for i in range(blocks.shape[0]):
            out[i, 0] = simd.iq4xs_sum(blocks[i], 0, qa[i], 0)

    def blocks32(sums4, sum1):
        def loop(blocks, qa, bs, out):
            nbytes = blocks.shape[1] // 5
            for i in range(blocks.shape[0]):
                out[5 * i, 0], out[5 * i + 1, 0], out[5 * i + 2, 0], out[5 * i + 3, 0] = sums4(
                    blocks[i], 0, qa[i], 0
                )
                out[5 * i + 4, 0] = sum1(blocks[i], 4 * nbytes, qa[i], 128)

        return loop

    fns = {"Q5_K": q5k, "Q2_K": q2k, "Q3_K": q3k, "IQ4_XS": iq4xs}
    fns["IQ4_NL"] = blocks32(simd.iq4nl_sums4, simd.iq4nl_sum1)
    fns["Q4_1"] = blocks32(simd.q4_1_sums4, simd.q4_1_sum1)
    fns["Q5_1"] = blocks32(simd.q5_1_sums4, simd.q5_1_sum1)
    fns["MXFP4"] = blocks32(simd.mxfp4_sums4, simd.mxfp4_sum1)
    fns["Q4_0"] = blocks32(simd.q4_0_sums4, simd.q4_0_sum1)
    fns["Q5_0"] = blocks32(simd.q5_0_sums4, simd.q5_0_sum1)

    def q8_0(blocks, qa, bs, out):  # one block per call (the four-block form: test_tiles)
        for i in range(blocks.shape[0]):
            for j in range(5):
                out[5 * i + j, 0] = simd.q8_0_sum1(blocks[i], 34 * j, qa[i], 32 * j)

    fns["Q8_0"] = q8_0
    return numba.njit(fns[name])


BLOCKS32 = ("IQ4_NL", "Q4_1", "Q5_1", "MXFP4", "Q4_0", "Q5_0", "Q8_0")


@pytest.mark.parametrize("x86", [True, False])
@pytest.mark.parametrize("name", ["Q5_K", "Q2_K", "Q3_K", "IQ4_XS", *BLOCKS32])
def test_more_block_sums_equal_numpy_references(name, x86, monkeypatch):
    """The integer sums of the other types' blocks, exact, against gguf-py-based references
    (reference.int_sums_ref), on the x86 path and the generic one; activation codes over
    the whole int8 range (-128 included; Q8_0, whose activations never reach -128, from
    -127), code and scale bits all set or all clear."""
    from meldlite.kernels import reference, simd

    if x86 and not simd.AVX2:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setattr(simd, "AVX2", x86)
    sums = _block_sums(name)
    qtype = T[name]
    rng = np.random.default_rng(61 + int(qtype))
    n, n_cols = 300, (160 if name in BLOCKS32 else 256)
    blocks = random_matrix(rng, qtype, n, n_cols)
    blocks[0] = 255
    blocks[1] = 0
    qa = rng.integers(-128, 128, (n, n_cols), dtype=np.int8)
    qa[2], qa[3] = -128, 127
    if name == "Q8_0":
        np.maximum(qa, -127, out=qa)
    bs = qa.reshape(n, -1, 32).sum(-1, dtype=np.int32)
    per = 32 if name in BLOCKS32 else 256
    out = np.zeros((n * n_cols // per, 2), np.int32)
    sums(blocks, qa, bs, out)
    isum, msum = reference.int_sums_ref(
        blocks.reshape(out.shape[0], -1), qtype, qa.reshape(out.shape[0], per)
    )
    np.testing.assert_array_equal(out[:, 0], isum)
    if name in ("Q5_K", "Q2_K"):
        np.testing.assert_array_equal(out[:, 1], msum)


TILED = {  # type: (tiled kernel, one-token kernel, its arguments after (w, r, qa, da), n_cols)
    "Q4_K": (qdot.tiles_q4_k, qdot.dot_q4_k, lambda bs, k, nb: (bs, k, nb), 512),
    "Q6_K": (qdot.tiles_q6_k, qdot.dot_q6_k, lambda bs, k, nb: (k, nb), 512),
    "Q8_0": (qdot.tiles_q8_0, qdot.dot_q8_0, lambda bs, k, nb: (k, nb), 1056),  # 33 blocks
}


@pytest.mark.parametrize("x86", [True, False])
@pytest.mark.parametrize("name", list(TILED))
def test_token_tiles_equal_one_token_kernels(name, x86, monkeypatch):
    """The tiled kernels (each block unpacked once for up to TILE tokens) give the one-token
    row kernels' bits for every (token, row), for token counts around the tile size, tokens
    repeated and out of order, a sub-range of rows (the others untouched); x86=False
    compiles both with the generic vector IR that other CPUs get. The float64 product of
    the dequantized matrix with the rounded activations bounds both."""
    from meldlite.kernels import simd

    if x86 and not simd.AVX2:
        pytest.skip("no AVX2 on this CPU")
    monkeypatch.setattr(simd, "AVX2", x86)
    tiled, one, more, n_cols = TILED[name]
    tiled, one = (numba.njit(error_model="numpy")(f.py_func) for f in (tiled, one))  # uncached
    qtype = T[name]
    rng = np.random.default_rng(70 + int(qtype))
    raw = random_matrix(rng, qtype, 40, n_cols)
    raw[0, : raw.shape[1] // 2] = 255  # all code and scale bits set
    raw.flags.writeable = False
    x = rng.standard_normal((20, n_cols)).astype(np.float32)
    qa, da, bs, xr = qdot.empty_acts(20, n_cols)
    qdot.quantize_rows(x, mode_of(qtype), qa, da, bs, xr)
    nb = n_cols // (256 if name != "Q8_0" else 32)
    for n in (2, 7, 8, 9, 17):
        toks = rng.integers(0, 20, n)  # (n,) repeats allowed
        out = np.full((n, 40), -1.0, np.float32)  # (n, rows)
        tiled(raw, 3, 37, qa, da, *((bs,) if name == "Q4_K" else ()), toks, out, nb)
        want = np.array(
            [[one(raw, r, qa, da, *more(bs, k, nb)) for r in range(3, 37)] for k in toks],
            np.float32,
        )
        np.testing.assert_array_equal(out[:, 3:37].view(np.uint32), want.view(np.uint32))
        assert (out[:, :3] == -1).all() and (out[:, 37:] == -1).all()
        ref = matmul_ref(raw[3:37], qtype, xr[toks])  # (n, 34)
        assert rel_err(out[:, 3:37], ref) < 2e-6


def test_f16_hw_equals_numpy():
    from meldlite.kernels import simd

    if not simd.F16C:
        pytest.skip("no F16C on this CPU")
    bits = np.arange(1 << 16, dtype=np.uint16)
    want = bits.view(np.float16).astype(np.float32)
    raw = bits.view(np.uint8)

    @numba.njit
    def convert(raw, out):
        for i in range(out.shape[0]):
            out[i] = simd.f16_hw(raw, 2 * i)

    got = np.empty(bits.shape[0], np.float32)
    convert(raw, got)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.isnan(got[~finite]).all()


# ---------------------------------------------------------------- MoE integer path


@pytest.fixture(scope="module")
def experts():
    rng = np.random.default_rng(9)
    arrays, types = [], []
    for names in EXPERT_TYPES:
        qts = [T[n] for n in names]
        arrays += [
            random_matrix(rng, qts[0], N_FF, N_EMBD, rms=N_EMBD**-0.5),
            random_matrix(rng, qts[1], N_FF, N_EMBD, rms=N_EMBD**-0.5),
            random_matrix(rng, qts[2], N_EMBD, N_FF, rms=N_FF**-0.5),
        ]
        types.append([int(q) for q in qts])
    return kernels.expert_list(arrays), np.array(types, np.int32)


@pytest.mark.parametrize("n_tok", [1, 17])
def test_moe_llama_numerics_matches_float_kernel_on_rounded_inputs(experts, n_tok):
    mats, types = experts
    rng = np.random.default_rng(40 + n_tok)
    x = rng.standard_normal((n_tok, N_EMBD)).astype(np.float32)
    ids, weights = routing(rng, n_tok)
    fast = kernels.moe_ffn(x, ids, weights, mats, types, llama_numerics=True)
    slow = np.empty_like(fast)
    assert moe_ffn_kernel(x, ids, weights, mats, types, MODE_BY_ID[types], 0, NO_BIAS, slow)
    # the SwiGLU output is re-quantized before down: a 1-ulp change can move one code
    assert rel_err(fast, slow) < 2e-4


def test_moe_llama_numerics_batch_equals_token_by_token(experts):
    mats, types = experts
    rng = np.random.default_rng(41)
    x = rng.standard_normal((20, N_EMBD)).astype(np.float32)
    ids, weights = routing(rng, 20, k=4)
    ids[0] = -1
    ids[1] = [5, 5, -1, 2]
    batch = kernels.moe_ffn(x, ids, weights, mats, types, llama_numerics=True)
    one = np.concatenate(
        [
            kernels.moe_ffn(
                x[t : t + 1], ids[t : t + 1], weights[t : t + 1], mats, types, llama_numerics=True
            )
            for t in range(20)
        ]
    )
    np.testing.assert_array_equal(batch, one)
    np.testing.assert_array_equal(batch[0], 0.0)
    # one pair alone with weight 1 is that pair's expert output (what CachedStore relies on)
    y = kernels.moe_ffn(
        x[2:3], ids[2:3, 1:2], np.ones((1, 1), np.float32), mats, types, llama_numerics=True
    )
    want = kernels.moe_ffn(
        x[2:3], ids[2:3, :2], np.array([[0.0, 1.0]], np.float32), mats, types, llama_numerics=True
    )
    np.testing.assert_array_equal(y, want)


# ---------------------------------------------------------------- attention pieces


def test_f32_to_f16_bits_matches_numpy():
    rng = np.random.default_rng(50)
    v = (rng.standard_normal(4000) * np.exp(rng.uniform(-20, 12, 4000))).astype(np.float32)
    v[:8] = [0.0, -0.0, 65504.0, 65520.0, -1e9, 6e-8, 2.0**-25, np.nan]
    got = np.array([attention.f32_to_f16_bits(np.float32(a)) for a in v], np.uint16)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(got[:7], want[:7])
    np.testing.assert_array_equal(got[8:], want[8:])
    assert np.isnan(got[7:8].view(np.float16)[0])


def test_attention_pieces_match_numpy_reference():
    rng = np.random.default_rng(51)
    n_tok, n_head, n_kv, d, pos0, n_ctx = 5, 4, 2, 64, 7, 16
    x = rng.standard_normal((n_tok, 256)).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(256)).astype(np.float32)
    got = np.empty_like(x)
    attention.rms_norm_rows(x, w, 1e-6, got)
    assert rel_err(got, attention_ref.rms_norm(x, w, 1e-6)) < 1e-6
    wh = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)  # per-head norm
    got = np.empty((n_tok, n_head * d), np.float32)
    q = rng.standard_normal((n_tok, n_head * d)).astype(np.float32)
    attention.rms_norm_rows(q, wh, 1e-6, got)
    want = attention_ref.rms_norm(q.reshape(n_tok, n_head, d), wh, 1e-6).reshape(n_tok, -1)
    assert rel_err(got, want) < 1e-6

    cos, sin = rope_tables(n_ctx, d, 10000.0)
    for neox in (True, False):
        r = q.copy()
        attention.rope_rows(r, n_head, d, cos, sin, pos0, d, neox)
        want = attention_ref.rope(
            q.reshape(n_tok, n_head, d), cos[pos0 : pos0 + n_tok], sin[pos0 : pos0 + n_tok], d, neox
        ).reshape(n_tok, -1)
        np.testing.assert_array_equal(r, want)

    kc = np.zeros((n_ctx, n_kv, d), np.float16)
    vc = np.zeros((n_ctx, n_kv, d), np.float16)
    kc[:pos0] = rng.standard_normal((pos0, n_kv, d))
    vc[:pos0] = rng.standard_normal((pos0, n_kv, d))
    k = rng.standard_normal((n_tok, n_kv * d)).astype(np.float32)
    v = rng.standard_normal((n_tok, n_kv * d)).astype(np.float32)
    attention.store_kv(k, v, n_kv, d, d, kc.view(np.uint16), vc.view(np.uint16), pos0)
    np.testing.assert_array_equal(
        kc[pos0 : pos0 + n_tok], k.reshape(n_tok, n_kv, d).astype(np.float16)
    )
    a = np.empty((n_tok, n_head * d), np.float32)
    no_sinks = np.zeros(0, np.float32)
    sinks = (3.0 * rng.standard_normal(n_head)).astype(np.float32)  # gpt-oss's sink logits
    for scale, sk in ((1.0 / np.sqrt(d), None), (0.0078125, None), (1.0 / np.sqrt(d), sinks)):
        kv = kc.view(np.uint16), vc.view(np.uint16)
        attention.attention_rows(q, *kv, pos0, n_head, scale, a, 0, no_sinks if sk is None else sk)
        want = attention_ref.attention(
            q.reshape(n_tok, n_head, d), kc[: pos0 + n_tok], vc[: pos0 + n_tok], pos0, scale, 0, sk
        )
        assert rel_err(a, want) < 1e-5

    logits = rng.standard_normal((n_tok, 16)).astype(np.float32)
    logits[0, 3] = logits[0, 9]  # a tie: lower id first
    ids, wts = np.empty((n_tok, 4), np.int32), np.empty((n_tok, 4), np.float32)
    for norm in (True, False):
        attention.route_rows(logits, 4, norm, ids, wts)
        want_ids, want_w = attention_ref.route(logits, 4, norm)
        np.testing.assert_array_equal(ids, want_ids)
        assert rel_err(wts, want_w) < 1e-6


def test_moe_whole_expert_items_give_the_two_loop_bits():
    """Decode-shaped layers (balanced pairs per expert) run each expert as one work item of
    one parallel loop; the same bits as the two loops over 64-row items, on 1 and 2 threads."""
    from meldlite.kernels.moe import moe_ffn_int_kernel

    rng = np.random.default_rng(43)
    n_embd, n_ff, n_expert = 1024, 512, 10
    arrays, types = [], []
    for e in range(n_expert):
        qts = (T.Q4_K, T.Q4_K, T.Q6_K if e % 2 else T.Q4_K)
        arrays += [
            random_matrix(rng, qts[0], n_ff, n_embd, rms=n_embd**-0.5),
            random_matrix(rng, qts[1], n_ff, n_embd, rms=n_embd**-0.5),
            random_matrix(rng, qts[2], n_embd, n_ff, rms=n_ff**-0.5),
        ]
        types.append([int(q) for q in qts])
    mats, types = kernels.expert_list(arrays), np.array(types, np.int32)
    modes = MODE_BY_ID[types]
    x = rng.standard_normal((2, n_embd)).astype(np.float32)
    ids = np.array([[0, 3, 5, 7, 9, 1, 2, 4], [8, 6, 0, 3, 5, 7, 9, 1]], np.int32)
    weights = rng.random(ids.shape).astype(np.float32)
    threads = numba.get_num_threads()
    outs = []
    try:
        for n in (1, threads):
            numba.set_num_threads(n)
            for whole_min in (0, 10**9):  # whole experts / always the two loops
                out = np.empty_like(x)
                moe_ffn_int_kernel(x, ids, weights, mats, types, modes, 0, NO_BIAS, out, whole_min)
                outs.append(out)
    finally:
        numba.set_num_threads(threads)
    for out in outs[1:]:
        np.testing.assert_array_equal(out, outs[0])
