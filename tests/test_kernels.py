"""Kernels against independent oracles.

- dequantize: bit for bit against gguf-py (`gguf.quants.dequantize`), on random blocks and
  on tensors quantized by llama.cpp's own quantizer;
- matmul: against a float64 product with the gguf-py-dequantized matrix;
- moe_ffn: against a float64 NumPy reference; batch == token by token, bit for bit.
"""

import pathlib
from functools import partial

import numba
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from helpers_gguf import (
    LLAMACPP_FTYPES,
    quantize_with_llamacpp,
    read_tensors,
    weight_like,
    write_weights_gguf,
)

from meldlite import kernels
from meldlite.errors import OptionError, UnsupportedError
from meldlite.kernels.reference import F16_FIELDS, matmul_ref, moe_ffn_ref, sum_slots_ref

ALL = [t.name for t in kernels.SUPPORTED_TYPES]
PLAIN = {T.F32: np.float32, T.F16: np.float16}  # BF16 handled in random_matrix

E8M0_FIELDS = {T.MXFP4: (0,)}


def random_matrix(rng, qtype, n_rows, n_cols, rms=None):
    """(n_rows, row_bytes) uint8: random blocks with finite scale fields; with `rms`, the
    scales are rescaled so that the dequantized values have about that rms."""
    if qtype in (T.F32, T.F16, T.BF16):
        w = (rng.standard_normal((n_rows, n_cols)) * (rms or 1.0)).astype(np.float32)
        if qtype == T.BF16:
            return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return w.astype(PLAIN[qtype]).view(np.uint8)
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_rows, n_cols // elems, nbytes), dtype=np.uint8)
    f16_offsets, e8m0_offsets = F16_FIELDS.get(qtype, ()), E8M0_FIELDS.get(qtype, ())
    for off in f16_offsets:
        d = (rng.standard_normal(blocks.shape[:2]) * 0.02).astype(np.float16)
        blocks[..., off : off + 2] = d.view(np.uint8).reshape(*blocks.shape[:2], 2)
    for off in e8m0_offsets:
        blocks[..., off] = rng.integers(120, 126, size=blocks.shape[:2], dtype=np.uint8)
    if rms is not None:
        factor = rms / np.sqrt(np.mean(gguf_dequantize(blocks.reshape(n_rows, -1), qtype) ** 2))
        for off in f16_offsets:
            d = blocks[..., off : off + 2].copy().view(np.float16) * np.float16(factor)
            blocks[..., off : off + 2] = d.view(np.uint8)
        for off in e8m0_offsets:
            blocks[..., off] = (blocks[..., off].astype(np.int64) + round(np.log2(factor))).astype(
                np.uint8
            )
    return blocks.reshape(n_rows, -1)


def assert_bits_equal(got, want):
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32))


def rel_err(got, ref):
    return np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)


# ---------------------------------------------------------------- dequantize


@pytest.mark.parametrize("name", ALL)
def test_dequantize_random_blocks_bit_exact(name):
    qtype = T[name]
    raw = random_matrix(np.random.default_rng(1), qtype, 9, 512)
    assert_bits_equal(kernels.dequantize(raw, qtype), gguf_dequantize(raw, qtype))


@pytest.mark.parametrize("name", ALL)
def test_dequantize_any_bytes_bit_exact(name):
    """Fully random bytes: NaN/inf/denormal scales and f16/bf16 NaN payloads match too."""
    qtype = T[name]
    raw = np.random.default_rng(2).integers(
        0, 256, size=(5, 3 * GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8
    )
    with np.errstate(all="ignore"):
        want = gguf_dequantize(raw, qtype)
    assert_bits_equal(kernels.dequantize(raw, qtype), want)


def test_dequantize_shapes_and_typed_input():
    rng = np.random.default_rng(3)
    raw = random_matrix(rng, T.Q4_K, 6, 512).reshape(2, 3, -1)  # (2, 3, row_bytes)
    assert_bits_equal(kernels.dequantize(raw, T.Q4_K), gguf_dequantize(raw, T.Q4_K))
    assert_bits_equal(kernels.dequantize(raw[0, 0], T.Q4_K), gguf_dequantize(raw[0, 0], T.Q4_K))
    assert kernels.dequantize(raw[:0, 0], T.Q4_K).shape == (0, 512)
    f16 = rng.standard_normal((3, 7)).astype(np.float16)  # gguf-py gives F16 tensors typed
    assert_bits_equal(kernels.dequantize(f16, T.F16), f16.astype(np.float32))
    f32 = rng.standard_normal((3, 7)).astype(np.float32)
    assert_bits_equal(kernels.dequantize(f32, T.F32), f32)
    assert_bits_equal(kernels.dequantize(f32.view(np.uint8), int(T.F32)), f32)
    q = random_matrix(rng, T.Q8_0, 4, 64)[:, :34]  # non-contiguous rows
    assert_bits_equal(
        kernels.dequantize(q, T.Q8_0), gguf_dequantize(np.ascontiguousarray(q), T.Q8_0)
    )


@pytest.mark.parametrize("bad_type", [T.Q8_1, T.IQ2_XXS, T.TQ1_0, 999, "Q4_K"])
def test_unsupported_type_rejected(bad_type):
    with pytest.raises(UnsupportedError):
        kernels.dequantize(np.zeros((1, 34), np.uint8), bad_type)
    with pytest.raises(UnsupportedError):
        kernels.matmul(np.zeros((1, 34), np.uint8), bad_type, np.zeros(32, np.float32))


def test_dequantize_bad_input():
    with pytest.raises(OptionError, match="not a whole number"):
        kernels.dequantize(np.zeros((2, 35), np.uint8), T.Q8_0)
    with pytest.raises(OptionError, match="uint8"):
        kernels.dequantize(np.zeros((2, 34), np.int8), T.Q8_0)
    with pytest.raises(OptionError, match="uint8"):
        kernels.dequantize(np.zeros((2, 8), np.float32), T.F16)
    with pytest.raises(OptionError):
        kernels.dequantize(np.uint8(3), T.Q8_0)


# ---------------------------------------------------------------- llama.cpp-quantized tensors


@pytest.fixture(scope="session")
def llamacpp_files(tmp_path_factory):
    """{ftype name: path} of one F32 GGUF quantized by llama.cpp to every ftype (pure)."""
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("llamacpp_quants")
    rng = np.random.default_rng(4)
    src = write_weights_gguf(
        d / "src-f32.gguf",
        {
            "blk.0.ffn_up.weight": weight_like(rng, 96, 512),
            "blk.0.ffn_down.weight": weight_like(rng, 40, 256),
            "blk.0.ffn_gate.weight": weight_like(rng, 70, 768),
        },
    )
    return {name: quantize_with_llamacpp(src, d / f"{name}.gguf", name) for name in LLAMACPP_FTYPES}


@pytest.mark.parametrize("ftype", list(LLAMACPP_FTYPES))
def test_llamacpp_quantized_bit_exact(llamacpp_files, ftype):
    tensors = read_tensors(llamacpp_files[ftype])
    assert len(tensors) == 3
    for t in tensors.values():
        assert t.tensor_type == LLAMACPP_FTYPES[ftype], f"{t.name} is {t.tensor_type.name}"
        assert_bits_equal(
            kernels.dequantize(t.data, t.tensor_type), gguf_dequantize(t.data, t.tensor_type)
        )


@pytest.mark.parametrize("ftype", ["Q4_0", "Q2_K", "Q3_K_M", "IQ4_XS", "MXFP4_MOE", "F16"])
def test_llamacpp_quantized_matmul(llamacpp_files, ftype):
    rng = np.random.default_rng(5)
    for t in read_tensors(llamacpp_files[ftype]).values():
        x = rng.standard_normal((3, t.shape[0])).astype(np.float32)  # shape[0] = ne[0] = n_cols
        assert (
            rel_err(kernels.matmul(t.data, t.tensor_type, x), matmul_ref(t.data, t.tensor_type, x))
            < 1e-4
        )


# ---------------------------------------------------------------- matmul


def matmul_shapes(qtype):
    elems = GGML_QUANT_SIZES[qtype][0]
    if elems == 1:
        return [(100, 37), (3, 300)]
    if elems == 32:
        return [(100, 96), (65, 512)]  # 96: a column run shorter than one decode step
    return [(100, 512), (130, 256)]


@pytest.mark.parametrize("name", ALL)
def test_matmul_matches_float64(name):
    qtype = T[name]
    rng = np.random.default_rng(6)
    for n_rows, n_cols in matmul_shapes(qtype):
        raw = random_matrix(rng, qtype, n_rows, n_cols)
        x = rng.standard_normal((7, n_cols)).astype(np.float32)  # (n_tok, n_cols)
        y = kernels.matmul(raw, qtype, x)  # (n_tok, n_rows)
        assert y.shape == (7, n_rows) and y.dtype == np.float32
        assert rel_err(y, matmul_ref(raw, qtype, x)) < 1e-4
        y1 = kernels.matmul(raw, qtype, x[3])  # one token: the same bits as its batch row
        assert y1.shape == (n_rows,)
        np.testing.assert_array_equal(y1, y[3])


def test_matmul_out_typed_input_and_threads():
    rng = np.random.default_rng(7)
    raw = random_matrix(rng, T.Q5_K, 200, 512)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    out = np.full((4, 200), np.nan, np.float32)
    assert kernels.matmul(raw, T.Q5_K, x, out=out) is out
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = kernels.matmul(raw, T.Q5_K, x)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(out, one)
    w = rng.standard_normal((5, 33)).astype(np.float32)
    assert rel_err(kernels.matmul(w, T.F32, x[:, :33]), x[:, :33].astype(np.float64) @ w.T) < 1e-6
    assert kernels.matmul(raw, T.Q5_K, x[:0]).shape == (0, 200)


def test_matmul_bad_input():
    raw = random_matrix(np.random.default_rng(8), T.Q8_0, 4, 64)
    x = np.zeros(64, np.float32)
    with pytest.raises(OptionError, match="float32"):
        kernels.matmul(raw, T.Q8_0, x.astype(np.float64))
    with pytest.raises(OptionError, match="n_cols=64"):
        kernels.matmul(raw, T.Q8_0, np.zeros(32, np.float32))
    with pytest.raises(OptionError, match="2-D"):
        kernels.matmul(raw.reshape(2, 2, -1), T.Q8_0, x)
    with pytest.raises(OptionError, match="contiguous"):
        kernels.matmul(raw[::2], T.Q8_0, x)
    with pytest.raises(OptionError, match="out"):
        kernels.matmul(raw, T.Q8_0, x, out=np.zeros(5, np.float32))


# ---------------------------------------------------------------- moe_ffn

N_EMBD, N_FF = 256, 512
EXPERT_TYPES = [  # (gate, up, down) per expert: one type per expert and a mixed one
    ("Q4_K", "Q4_K", "Q4_K"),
    ("Q8_0", "Q8_0", "Q8_0"),
    ("F16", "F16", "F16"),
    ("MXFP4", "MXFP4", "MXFP4"),
    ("IQ4_XS", "Q5_0", "Q6_K"),
    ("Q2_K", "Q3_K", "BF16"),
    ("Q4_0", "Q4_1", "Q5_1"),
    ("IQ4_NL", "Q5_K", "F32"),
]
UNUSED = 8  # an expert that is never routed to: placeholder matrices, unsupported type


@pytest.fixture(scope="module")
def experts():
    """(arrays, types): flat [gate, up, down, ...] uint8 matrices and (n_expert, 3) ids."""
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
    arrays += [None, None, None]
    types.append([int(T.IQ2_XXS)] * 3)
    return arrays, np.array(types, np.int32)


def routing(rng, n_tok, k=3, n_expert=len(EXPERT_TYPES)):
    ids = np.stack([rng.permutation(n_expert)[:k] for _ in range(n_tok)]).astype(np.int32)
    ids[rng.random(ids.shape) < 0.2] = -1  # skipped slots
    weights = rng.random(ids.shape).astype(np.float32)
    return ids, weights


@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("n_tok", [1, 13])
def test_moe_matches_reference(experts, n_tok, act):
    arrays, types = experts
    rng = np.random.default_rng(10 + n_tok)
    x = rng.standard_normal((n_tok, N_EMBD)).astype(np.float32)
    ids, weights = routing(rng, n_tok)
    out = kernels.moe_ffn(x, ids, weights, kernels.expert_list(arrays), types, act=act)
    assert out.shape == x.shape and out.dtype == np.float32
    assert rel_err(out, moe_ffn_ref(x, ids, weights, arrays, types, act)) < 1e-4
    if act == "relu":  # llama_numerics: the same sum from rounded activations
        fast = kernels.moe_ffn(
            x, ids, weights, kernels.expert_list(arrays), types, act=act, llama_numerics=True
        )
        assert rel_err(fast, out) < 2e-2


@pytest.mark.parametrize("llama_numerics", [False, True])
@pytest.mark.parametrize("act", ["silu", "relu", "swiglu_oai"])
def test_moe_activations_and_biases_match_reference(experts, act, llama_numerics):
    """Each expert activation kind, with expert biases, against the float64 reference
    (x scaled up so that swiglu_oai's clamps at +-7 are reached); with llama_numerics
    the inputs are rounded to 8 bits, hence the looser bound. A batch gives the bits of
    its tokens one by one, and zero biases give the bits of no biases."""
    arrays, types = experts
    rng = np.random.default_rng(20)
    x = (8.0 * rng.standard_normal((9, N_EMBD))).astype(np.float32)
    ids, weights = routing(rng, 9)
    n_x = len(types)
    bias = (0.5 * rng.standard_normal((n_x, 2 * N_FF + N_EMBD))).astype(np.float32)
    mats = kernels.expert_list(arrays)
    run = partial(kernels.moe_ffn, mats=mats, types=types, llama_numerics=llama_numerics, act=act)
    out = run(x, ids, weights, bias=bias)
    want = moe_ffn_ref(x, ids, weights, arrays, types, act=act, bias=bias)
    assert rel_err(out, want) < (3e-2 if llama_numerics else 1e-4)
    one = [run(x[t : t + 1], ids[t : t + 1], weights[t : t + 1], bias=bias) for t in range(9)]
    np.testing.assert_array_equal(out, np.concatenate(one))
    zero = run(x, ids, weights, bias=np.zeros_like(bias))
    np.testing.assert_array_equal(zero, run(x, ids, weights))
    with pytest.raises(OptionError, match="activation"):
        run(x, ids, weights, act="gelu")
    with pytest.raises(OptionError, match="biases"):
        run(x, ids, weights, bias=bias[:, 1:])


def test_moe_batch_equals_token_by_token(experts):
    arrays, types = experts
    mats = kernels.expert_list(arrays)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((24, N_EMBD)).astype(np.float32)
    ids, weights = routing(rng, 24, k=4)
    ids[0] = -1  # a token with every slot skipped gives zeros
    ids[1] = [5, 5, -1, 2]  # the same expert twice
    batch = kernels.moe_ffn(x, ids, weights, mats, types)
    one_by_one = np.concatenate(
        [
            kernels.moe_ffn(x[t : t + 1], ids[t : t + 1], weights[t : t + 1], mats, types)
            for t in range(24)
        ]
    )
    np.testing.assert_array_equal(batch, one_by_one)
    perm = rng.permutation(24)
    np.testing.assert_array_equal(
        kernels.moe_ffn(x[perm], ids[perm], weights[perm], mats, types), batch[perm]
    )
    np.testing.assert_array_equal(batch[0], 0.0)


def test_moe_slot_order_is_the_summation_order(experts):
    """out = ((0 + w0*y0) + w1*y1) + w2*y2 in float32, exactly."""
    arrays, types = experts
    mats = kernels.expert_list(arrays)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, N_EMBD)).astype(np.float32)
    ids, weights = np.array([[3, 0, 6]], np.int32), rng.random((1, 3)).astype(np.float32)
    ys = [
        kernels.moe_ffn(x, ids[:, j : j + 1], np.ones((1, 1), np.float32), mats, types)
        for j in range(3)
    ]
    want = np.zeros_like(x)
    for j in range(3):
        want = want + weights[0, j] * ys[j]
    np.testing.assert_array_equal(kernels.moe_ffn(x, ids, weights, mats, types), want)


@pytest.mark.parametrize("n_tok", [0, 1, 7, 300])
def test_sum_slots_matches_reference_bit_for_bit(n_tok):
    """The jitted slot-order sum (serial and threaded) equals the NumPy statement of it."""
    rng = np.random.default_rng(14)
    k, n_embd, n_rows = 4, 160, 3 * n_tok + 5
    ids = rng.integers(-1, 8, (n_tok, k)).astype(np.int32)  # -1: skipped slot
    weights = rng.random((n_tok, k)).astype(np.float32)
    ys = rng.standard_normal((n_rows, n_embd)).astype(np.float32)
    row_of = rng.integers(0, n_rows, (n_tok, k))
    want = sum_slots_ref(ids, weights, ys, row_of)
    assert_bits_equal(kernels.sum_slots(ids, weights, ys, row_of), want)
    out = np.full((n_tok, n_embd), np.nan, np.float32)
    assert kernels.sum_slots(ids, weights, ys, row_of, out=out) is out
    assert_bits_equal(out, want)
    np.testing.assert_array_equal(want[(ids < 0).all(axis=1)], 0.0)  # no expert: zeros


def test_sum_slots_rejects_bad_input():
    ids = np.array([[0, -1], [1, 2]], np.int32)
    weights = np.ones((2, 2), np.float32)
    ys = np.ones((3, 8), np.float32)
    with pytest.raises(OptionError, match="outside"):
        kernels.sum_slots(ids, weights, ys, np.array([[0, 0], [1, 3]]))
    with pytest.raises(OptionError, match="float32"):
        kernels.sum_slots(ids, weights.astype(np.float64), ys, np.zeros((2, 2)))
    with pytest.raises(OptionError, match="shape"):
        kernels.sum_slots(ids, weights[:1], ys, np.zeros((2, 2)))


def test_moe_set_expert_and_out(experts):
    arrays, types = experts
    mats = kernels.expert_list(arrays)
    x = np.random.default_rng(13).standard_normal((2, N_EMBD)).astype(np.float32)
    ids, weights = np.array([[1, -1], [1, 0]], np.int32), np.ones((2, 2), np.float32)
    before = kernels.moe_ffn(x, ids, weights, mats, types)
    kernels.set_expert(mats, 1, *arrays[0:3])  # expert 1 now holds expert 0's weights
    types2 = types.copy()
    types2[1] = types[0]
    out = np.empty_like(x)
    assert kernels.moe_ffn(x, ids, weights, mats, types2, out=out) is out
    np.testing.assert_array_equal(
        out[1], 2 * kernels.moe_ffn(x[1:], ids[1:, 1:], weights[1:, 1:], mats, types2)[0]
    )
    assert not np.array_equal(out, before)


def test_moe_rejects_bad_input(experts):
    arrays, types = experts
    mats = kernels.expert_list(arrays)
    x = np.zeros((1, N_EMBD), np.float32)
    w = np.ones((1, 1), np.float32)
    with pytest.raises(UnsupportedError, match="expert 8 gate"):
        kernels.moe_ffn(x, np.array([[UNUSED]], np.int32), w, mats, types)
    with pytest.raises(UnsupportedError):
        kernels.check_types(types)
    kernels.check_types(types[:UNUSED])
    with pytest.raises(OptionError, match="expert ids"):
        kernels.moe_ffn(x, np.array([[9]], np.int32), w, mats, types)
    with pytest.raises(OptionError, match="expert ids"):
        kernels.moe_ffn(x, np.array([[-2]], np.int32), w, mats, types)
    with pytest.raises(OptionError, match="weights"):
        kernels.moe_ffn(x, np.array([[0]], np.int32), w.astype(np.float64), mats, types)
    with pytest.raises(OptionError, match="x must be float32"):
        kernels.moe_ffn(x[0], np.array([[0]], np.int32), w, mats, types)
    with pytest.raises(OptionError, match="mats has"):
        kernels.moe_ffn(x, np.array([[0]], np.int32), w, mats, types[:3])
    bad = kernels.expert_list(arrays)
    kernels.set_expert(bad, 0, arrays[0][:10], arrays[1], arrays[2])
    with pytest.raises(OptionError, match=r"expert 0 .*n_ff=10"):
        kernels.moe_ffn(x, np.array([[0]], np.int32), w, bad, types)
    kernels.set_expert(bad, 0, arrays[0], arrays[1], arrays[5])
    with pytest.raises(OptionError, match="expert 0 down matrix has shape"):
        kernels.moe_ffn(x, np.array([[0]], np.int32), w, bad, types)
    with pytest.raises(OptionError, match="C-contiguous uint8"):
        kernels.expert_list([arrays[0][:, ::2]])


def test_moe_empty_batch_and_plain_list(experts):
    arrays, types = experts
    x = np.random.default_rng(14).standard_normal((3, N_EMBD)).astype(np.float32)
    ids, weights = np.array([[2, 0]] * 3, np.int32), np.ones((3, 2), np.float32)
    mats = kernels.expert_list(arrays)
    np.testing.assert_array_equal(
        kernels.moe_ffn(x, ids, weights, list(arrays), types),
        kernels.moe_ffn(x, ids, weights, mats, types),
    )
    assert kernels.moe_ffn(x[:0], ids[:0], weights[:0], mats, types).shape == (0, N_EMBD)


def test_kernels_use_the_disk_cache():
    """cache=True, and the cache key covers every kernel source file (Numba alone only
    looks at the file that defines the jitted function, not the decoders it calls); the
    quantizers' key covers their own package, which the runtime kernels do not import."""
    from meldlite.compress.quantizers import legacy
    from meldlite.kernels._cache import sources_digest
    from meldlite.kernels.dequant import dequantize_rows
    from meldlite.kernels.matmul import matmat_rows
    from meldlite.kernels.moe import moe_ffn_kernel

    for dispatcher in (dequantize_rows, matmat_rows, moe_ffn_kernel):
        assert dispatcher._cache.__class__.__name__ != "NullCache", dispatcher
        assert sources_digest() in dispatcher._cache._cache_file._source_stamp
    quantizers = pathlib.Path(legacy.__file__).parent
    assert sources_digest(quantizers) in legacy.quantize_q8_0._cache._cache_file._source_stamp
    assert sources_digest() != sources_digest(quantizers)
