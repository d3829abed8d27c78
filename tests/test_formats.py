"""Reading GGUF files: metadata, shapes, zero-copy views, dequantization, expert API.

Also holds the small-GGUF builders that test_corrupt.py and test_pack.py import.
"""

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGUFWriter, Keys
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from meldlite.errors import FormatError, OptionError
from meldlite.formats import read_gguf
from meldlite.formats.gguf import dequantize_raw
from meldlite.formats.layout import expert_name, stacked_name

ARCH = "qwen3moe"
# Types gguf-py can quantize itself; the others are tested with random block bytes.
PY_QUANTIZABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
RANDOM_BYTES = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.MXFP4)


# ---------------------------------------------------------------- builders --


def tensor_bytes(values, ggml_type, rng=None):
    """(raw, ggml_type) for `values` (float, numpy shape): quantized by gguf-py when it
    can, else random block bytes with finite f16 scales (valid input for dequantize;
    the values are then ignored)."""
    if ggml_type in PY_QUANTIZABLE:
        q = gguf_quantize(values.astype(np.float32), ggml_type)
        return q.view(np.uint8).reshape(values.shape[:-1] + (-1,)), ggml_type
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    rng = rng or np.random.default_rng(0)
    n_blocks = values.size // block_size
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    raw[:, 1::2] &= (
        0xBF  # f16 scales sit at even offsets: clearing exponent bit 4 keeps them finite
    )
    return raw.reshape(values.shape[:-1] + (-1,)), ggml_type


def write_gguf(path, tensors, metadata=(), *, arch=ARCH, version=3, alignment=None):
    """Write `tensors` {name: float array | (uint8 raw, ggml_type)} with gguf-py's writer."""
    w = GGUFWriter(str(path), arch)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, value, vtype in metadata:
        w.add_key_value(key, value, vtype[0], sub_type=vtype[1]) if isinstance(
            vtype, tuple
        ) else w.add_key_value(key, value, vtype)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            raw, ggml_type = t
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=ggml_type)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if version != 3:
        set_version(path, version)
    return path


def set_version(path, version):
    """v2 and v3 little-endian files differ only in the version field."""
    with open(path, "r+b") as f:
        f.seek(4)
        f.write(np.uint32(version).tobytes())


def moe_metadata(n_layers, n_expert, n_embd, n_ff, n_vocab):
    from gguf import GGUFValueType as V

    k = lambda key: key.format(arch=ARCH)  # noqa: E731
    return [
        (Keys.General.NAME, "tiny-moe", V.STRING),
        (k(Keys.LLM.CONTEXT_LENGTH), 128, V.UINT32),
        (k(Keys.LLM.EMBEDDING_LENGTH), n_embd, V.UINT32),
        (k(Keys.LLM.BLOCK_COUNT), n_layers, V.UINT32),
        (k(Keys.LLM.FEED_FORWARD_LENGTH), n_ff, V.UINT32),
        (k(Keys.LLM.EXPERT_FEED_FORWARD_LENGTH), n_ff, V.UINT32),
        (k(Keys.Attention.HEAD_COUNT), 4, V.UINT32),
        (k(Keys.Attention.HEAD_COUNT_KV), 2, V.UINT32),
        (k(Keys.Attention.KEY_LENGTH), n_embd // 4, V.UINT32),
        (k(Keys.Attention.VALUE_LENGTH), n_embd // 4, V.UINT32),
        (k(Keys.Rope.DIMENSION_COUNT), n_embd // 4, V.UINT32),
        (k(Keys.Rope.FREQ_BASE), 10000.0, V.FLOAT32),
        (k(Keys.Attention.LAYERNORM_RMS_EPS), 1e-6, V.FLOAT32),
        (k(Keys.LLM.EXPERT_COUNT), n_expert, V.UINT32),
        (k(Keys.LLM.EXPERT_USED_COUNT), 2, V.UINT32),
        (Keys.General.FILE_TYPE, 1, V.UINT32),
        (Keys.Tokenizer.MODEL, "llama", V.STRING),
        (Keys.Tokenizer.LIST, [f"t{i}" for i in range(n_vocab)], (V.ARRAY, V.STRING)),
        (Keys.Tokenizer.SCORES, [float(-i) for i in range(n_vocab)], (V.ARRAY, V.FLOAT32)),
        (Keys.Tokenizer.TOKEN_TYPE, [1] * n_vocab, (V.ARRAY, V.INT32)),
        (Keys.Tokenizer.BOS_ID, 1, V.UINT32),
        (Keys.Tokenizer.ADD_BOS, True, V.BOOL),
    ]


def moe_tensors(
    n_layers,
    n_expert,
    n_embd,
    n_ff,
    n_vocab,
    *,
    expert_type=T.F16,
    dense_type=T.F16,
    dense_layers=(),
    seed=0,
):
    """qwen3moe-like tensors, numpy shapes; layers in `dense_layers` have a plain FFN."""
    rng = np.random.default_rng(seed)
    rand = lambda *shape: (rng.standard_normal(shape) * 0.05).astype(np.float32)  # noqa: E731
    as_type = lambda x, t: x.astype(np.float16) if t == T.F16 else tensor_bytes(x, t, rng)  # noqa: E731
    hd = n_embd // 4
    out = {"token_embd.weight": as_type(rand(n_vocab, n_embd), dense_type)}  # (n_vocab, n_embd)
    for L in range(n_layers):
        p = f"blk.{L}."
        out[p + "attn_norm.weight"] = np.ones(n_embd, np.float32)  # (n_embd,)
        out[p + "attn_q.weight"] = as_type(rand(4 * hd, n_embd), dense_type)  # (n_head*hd, n_embd)
        out[p + "attn_k.weight"] = as_type(rand(2 * hd, n_embd), dense_type)  # (n_kv*hd, n_embd)
        out[p + "attn_v.weight"] = as_type(rand(2 * hd, n_embd), dense_type)  # (n_kv*hd, n_embd)
        out[p + "attn_output.weight"] = as_type(rand(n_embd, 4 * hd), dense_type)
        out[p + "attn_q_norm.weight"] = np.ones(hd, np.float32)  # (hd,)
        out[p + "attn_k_norm.weight"] = np.ones(hd, np.float32)  # (hd,)
        out[p + "ffn_norm.weight"] = np.ones(n_embd, np.float32)  # (n_embd,)
        if L in dense_layers:
            out[p + "ffn_gate.weight"] = as_type(rand(n_ff, n_embd), dense_type)
            out[p + "ffn_up.weight"] = as_type(rand(n_ff, n_embd), dense_type)
            out[p + "ffn_down.weight"] = as_type(rand(n_embd, n_ff), dense_type)
            continue
        out[p + "ffn_gate_inp.weight"] = rand(n_expert, n_embd)  # (n_expert, n_embd) F32
        out[stacked_name(L, "gate")] = as_type(rand(n_expert, n_ff, n_embd), expert_type)
        out[stacked_name(L, "up")] = as_type(rand(n_expert, n_ff, n_embd), expert_type)
        out[stacked_name(L, "down")] = as_type(rand(n_expert, n_embd, n_ff), expert_type)
    out["output_norm.weight"] = np.ones(n_embd, np.float32)
    out["output.weight"] = as_type(rand(n_vocab, n_embd), dense_type)  # (n_vocab, n_embd)
    return out


def write_moe_gguf(
    path,
    *,
    n_layers=3,
    n_expert=4,
    n_embd=256,
    n_ff=256,
    n_vocab=64,
    version=3,
    alignment=None,
    **kw,
):
    """A small random qwen3moe-like GGUF with stacked experts."""
    tensors = moe_tensors(n_layers, n_expert, n_embd, n_ff, n_vocab, **kw)
    meta = moe_metadata(n_layers, n_expert, n_embd, n_ff, n_vocab)
    return write_gguf(path, tensors, meta, version=version, alignment=alignment)


# ------------------------------------------------------------------- tests --


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    return write_moe_gguf(tmp_path_factory.mktemp("fmt") / "moe.gguf", dense_layers=(1,))


@pytest.mark.parametrize("version", [2, 3])
def test_versions_and_metadata_round_trip(tmp_path, version):
    path = write_moe_gguf(tmp_path / "m.gguf", n_layers=2, n_embd=64, n_ff=32, version=version)
    f = read_gguf(path)
    assert f.version == version
    assert f.architecture == ARCH
    m = f.metadata
    assert m[Keys.General.NAME] == "tiny-moe"
    assert m[Keys.LLM.BLOCK_COUNT.format(arch=ARCH)] == 2
    assert m[Keys.Rope.FREQ_BASE.format(arch=ARCH)] == 10000.0
    assert m[Keys.Attention.LAYERNORM_RMS_EPS.format(arch=ARCH)] == float(np.float32(1e-6))
    assert m[Keys.Tokenizer.ADD_BOS] is True
    assert m[Keys.Tokenizer.LIST][:3] == ["t0", "t1", "t2"]
    assert m[Keys.Tokenizer.SCORES][:2] == [0.0, -1.0]
    assert m[Keys.Tokenizer.TOKEN_TYPE] == [1] * 64
    assert not any(k.startswith("GGUF.") for k in m)
    for v in m.values():
        assert isinstance(v, (str, int, float, bool, list))


def test_metadata_equals_gguf_py_contents(moe_path):
    """meldlite keeps arrays as one view; the values must still be gguf-py's."""
    from gguf import GGUFReader

    r = GGUFReader(moe_path)
    expected = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert read_gguf(moe_path).metadata == expected


def test_metadata_types_and_utf8(tmp_path):
    from gguf import GGUFValueType as V

    meta = [
        ("x.u8", 200, V.UINT8),
        ("x.i64", -(2**40), V.INT64),
        ("x.u64", 2**63, V.UINT64),
        ("x.f64", 0.1, V.FLOAT64),
        ("x.s", "héllo ✓", V.STRING),
        ("x.bools", [True, False], (V.ARRAY, V.BOOL)),
        ("x.u64s", [2**64 - 1, 0], (V.ARRAY, V.UINT64)),
        ("x.f64s", [0.5, -1e300], (V.ARRAY, V.FLOAT64)),
        ("x.i8s", [-128, 127], (V.ARRAY, V.INT8)),
        ("x.strs", ["", "✓", "a" * 300], (V.ARRAY, V.STRING)),
    ]
    f = read_gguf(write_gguf(tmp_path / "m.gguf", {"a": np.zeros((2, 32), np.float32)}, meta))
    assert f.metadata["x.u8"] == 200 and f.metadata["x.i64"] == -(2**40)
    assert f.metadata["x.u64"] == 2**63 and f.metadata["x.f64"] == 0.1
    assert f.metadata["x.s"] == "héllo ✓" and f.metadata["x.bools"] == [True, False]
    assert f.metadata["x.u64s"] == [2**64 - 1, 0] and f.metadata["x.f64s"] == [0.5, -1e300]
    assert f.metadata["x.i8s"] == [-128, 127] and f.metadata["x.strs"] == ["", "✓", "a" * 300]
    assert f.metadata_types["x.bools"] == (V.ARRAY, V.BOOL)
    assert f.metadata_types["x.u8"] == (V.UINT8, None)


def test_tensor_names_shapes_numpy_order(moe_path):
    f = read_gguf(moe_path)
    names = f.tensor_names()
    assert names[0] == "token_embd.weight" and names[-1] == "output.weight"
    assert f.has_tensor("blk.0.attn_q.weight") and not f.has_tensor("nope")
    assert f.tensor("token_embd.weight").shape == (64, 256)  # (n_vocab, n_embd)
    assert f.tensor(stacked_name(0, "gate")).shape == (4, 256, 256)
    v = f.tensor(stacked_name(0, "down"))
    assert v.shape == (4, 256, 256) and v.qtype == "F16" and v.ggml_type == T.F16
    assert v.raw.dtype == np.uint8 and v.raw.shape == (4, 256, 512)
    norm = f.tensor("blk.0.attn_norm.weight")
    assert norm.shape == (256,) and norm.raw.shape == (1024,) and norm.nbytes == 1024


def test_missing_tensor_names_it(moe_path):
    with pytest.raises(FormatError, match=r"blk\.9\.nothing\.weight"):
        read_gguf(moe_path).tensor("blk.9.nothing.weight")


def test_raw_is_zero_copy_view_at_offset(moe_path):
    f = read_gguf(moe_path)
    data = np.memmap(moe_path, mode="r")
    for name in f.tensor_names():
        v = f.tensor(name)
        assert isinstance(v.raw, np.memmap)
        assert np.shares_memory(v.raw, f._reader.data)
        assert bytes(data[v.offset : v.offset + v.nbytes]) == v.raw.tobytes()
        assert v.offset % f.alignment == 0


@pytest.mark.parametrize("ggml_type", PY_QUANTIZABLE + RANDOM_BYTES, ids=lambda t: t.name)
def test_dequantize_matches_gguf_py(tmp_path, ggml_type):
    rng = np.random.default_rng(int(ggml_type))
    values = rng.standard_normal((3, 512)).astype(np.float32)
    raw, _ = tensor_bytes(values, ggml_type, rng)
    t = values if ggml_type == T.F32 else (raw, ggml_type)
    f = read_gguf(write_gguf(tmp_path / "q.gguf", {"w": t}))
    v = f.tensor("w")
    assert v.shape == (3, 512) and v.ggml_type == ggml_type
    got = v.dequantize()
    assert got.dtype == np.float32 and got.shape == (3, 512)
    np.testing.assert_array_equal(got, gguf_dequantize(raw, ggml_type).reshape(3, 512))


def test_stacked_expert_api(moe_path):
    f = read_gguf(moe_path)
    assert f.expert_layout == "stacked" and f.n_layers == 3
    assert [f.expert_count(L) for L in range(3)] == [4, 0, 4]
    stack = f.tensor(stacked_name(2, "up"))
    for e in range(4):
        ex = f.expert_tensor(2, "up", e)
        assert ex.shape == (256, 256) and ex.name == expert_name(2, "up", e)
        assert np.shares_memory(ex.raw, stack.raw)
        np.testing.assert_array_equal(ex.dequantize(), stack.dequantize()[e])
    ranges = f.expert_ranges(0, 1)
    assert len(ranges) == 3
    for (off, n), kind in zip(ranges, ("gate", "up", "down")):
        assert (off, n) == (f.expert_tensor(0, kind, 1).offset, f.expert_tensor(0, kind, 1).nbytes)
    assert f.expert_types(0) == [("F16", "F16", "F16")] * 4
    assert f.expert_types(1) == []
    assert f.expert_order() == [(0, e) for e in range(4)] + [(2, e) for e in range(4)]


def test_expert_api_bad_arguments(moe_path):
    f = read_gguf(moe_path)
    with pytest.raises(OptionError, match="layer 7"):
        f.expert_count(7)
    with pytest.raises(OptionError, match="expert 4"):
        f.expert_tensor(0, "gate", 4)
    with pytest.raises(OptionError, match="kind"):
        f.expert_tensor(0, "sideways", 0)


def test_quantized_stacked_slices(tmp_path):
    path = write_moe_gguf(tmp_path / "q.gguf", n_layers=1, expert_type=T.Q4_K)
    f = read_gguf(path)
    stack = f.tensor(stacked_name(0, "gate"))
    assert stack.raw.shape == (4, 256, 144)
    e2 = f.expert_tensor(0, "gate", 2)
    assert e2.offset == stack.offset + 2 * 256 * 144 and e2.nbytes == 256 * 144
    np.testing.assert_array_equal(e2.dequantize(), gguf_dequantize(stack.raw[2], T.Q4_K))


def test_per_expert_layout_read(tmp_path):
    """A hand-built per-expert file: each expert's matrices with their own type."""
    from gguf import GGUFValueType as V

    rng = np.random.default_rng(1)
    tensors = {"token_embd.weight": rng.standard_normal((8, 64)).astype(np.float32)}
    types = {0: (T.Q8_0, T.Q8_0, T.Q4_0), 1: (T.F16, T.F16, T.F16)}
    for e, (tg, tu, td) in types.items():
        for kind, t, shape in (
            ("gate", tg, (32, 64)),
            ("up", tu, (32, 64)),
            ("down", td, (64, 32)),
        ):
            x = rng.standard_normal(shape).astype(np.float32)
            tensors[expert_name(0, kind, e)] = (
                x.astype(np.float16) if t == T.F16 else tensor_bytes(x, t)
            )
    meta = [
        (Keys.LLM.BLOCK_COUNT.format(arch=ARCH), 1, V.UINT32),
        ("meldlite.expert_layout", "per_expert", V.STRING),
        ("meldlite.expert_order", [0, 0, 0, 1], (V.ARRAY, V.UINT32)),
    ]
    f = read_gguf(write_gguf(tmp_path / "p.gguf", tensors, meta))
    assert f.expert_layout == "per_expert" and f.expert_count(0) == 2
    assert f.expert_types(0) == [("Q8_0", "Q8_0", "Q4_0"), ("F16", "F16", "F16")]
    assert f.expert_tensor(0, "down", 0).shape == (64, 32)
    ((off, n),) = f.expert_ranges(0, 1)
    gate, down = f.expert_tensor(0, "gate", 1), f.expert_tensor(0, "down", 1)
    assert off == gate.offset and off + n == down.offset + down.nbytes
    assert f.expert_order() == [(0, 0), (0, 1)]
    assert sorted(f.expert_tensor_names()) == sorted(n for n in tensors if n != "token_embd.weight")


def test_per_expert_layout_incomplete_is_format_error(tmp_path):
    from gguf import GGUFValueType as V

    tensors = {expert_name(0, k, 0): np.zeros((32, 32), np.float16) for k in ("gate", "up")}
    meta = [
        (Keys.LLM.BLOCK_COUNT.format(arch=ARCH), 1, V.UINT32),
        ("meldlite.expert_layout", "per_expert", V.STRING),
    ]
    with pytest.raises(FormatError, match=r"ffn_down_exps\.0\.weight"):
        read_gguf(write_gguf(tmp_path / "p.gguf", tensors, meta))


def test_custom_alignment(tmp_path):
    f = read_gguf(write_moe_gguf(tmp_path / "a.gguf", n_layers=1, n_embd=64, n_ff=32, alignment=64))
    assert f.alignment == 64 and f.data_offset % 64 == 0
    assert all(f.tensor(n).offset % 64 == 0 for n in f.tensor_names())


def test_dequantize_raw_unknown_type_is_unsupported():
    from meldlite.errors import UnsupportedError

    with pytest.raises(UnsupportedError, match="Q8_K"):
        dequantize_raw(np.zeros((1, 292), np.uint8), T.Q8_K)
