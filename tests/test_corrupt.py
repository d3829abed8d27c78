"""Hostile GGUF input: every damaged file gives FormatError, never anything else.

Three families: truncation (every offset of the header and tensor table, a sample
of the data), seeded random byte changes in the header and tensor table (a damaged
file may happen to stay valid: then opening it, dequantizing every tensor and the
expert API must raise nothing but MeldliteError), and hand-made files for each kind
of damage, built with the small raw encoder below.
"""

import struct

import numpy as np
import pytest
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    Keys,
)
from gguf import (
    GGMLQuantizationType as T,
)
from gguf import (
    GGUFValueType as V,
)
from test_formats import write_moe_gguf

from meldlite.errors import FormatError, MeldliteError
from meldlite.formats import check_header, read_gguf

# ----------------------------------------------------------- raw encoder --


def u32(x):
    return struct.pack("<I", x)


def u64(x):
    return struct.pack("<Q", x)


def gstr(s):
    b = s.encode("utf-8") if isinstance(s, str) else s
    return u64(len(b)) + b


def kv(key, vtype, payload):
    """One metadata entry; payload is the already-encoded value."""
    return gstr(key) + u32(vtype) + payload


def tinfo(name, ne, ggml_type, offset):
    return gstr(name) + u32(len(ne)) + b"".join(u64(n) for n in ne) + u32(ggml_type) + u64(offset)


def gguf_bytes(
    kvs=(),
    infos=(),
    data=b"",
    *,
    magic=b"GGUF",
    version=3,
    n_kv=None,
    n_tensors=None,
    alignment=GGUF_DEFAULT_ALIGNMENT,
):
    head = magic + u32(version)
    head += u64(len(infos) if n_tensors is None else n_tensors)
    head += u64(len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    pad = -len(body) % alignment
    return body + b"\0" * pad + data


F32_ROW = tinfo("w", [8], T.F32, 0)  # one valid 8-float tensor ...
F32_DATA = np.arange(8, dtype=np.float32).tobytes()  # ... and its 32 bytes
UNKNOWN_TYPE_ID = next(i for i in range(1000) if i not in {t.value for t in T})
UNKNOWN_VALUE_TYPE = max(v.value for v in V) + 1


def check_rejected(tmp_path, blob, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(blob)
    with pytest.raises(FormatError, match=match):
        read_gguf(path)


# ---------------------------------------------------------- a good file --


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(bytes, data_offset) of a small valid qwen3moe-like file with Q8_0 experts."""
    path = write_moe_gguf(
        tmp_path_factory.mktemp("good") / "good.gguf",
        n_layers=2,
        n_expert=2,
        n_embd=32,
        n_ff=32,
        n_vocab=8,
        expert_type=T.Q8_0,
        dense_layers=(1,),
    )
    exercise(read_gguf(path))
    return path.read_bytes(), check_header(path).data_offset


def exercise(f):
    """Everything a runtime would touch; only MeldliteError may come out."""
    for name in f.tensor_names():
        v = f.tensor(name)
        assert v.dequantize().shape == v.shape
    try:
        for layer in range(f.n_layers):
            for e in range(f.expert_count(layer)):
                f.expert_ranges(layer, e)
                f.expert_tensor(layer, "down", e).dequantize()
            f.expert_types(layer)
    except MeldliteError:
        pass


def open_or_reject(path):
    """FormatError, or a file that survives `exercise`."""
    try:
        f = read_gguf(path)
    except FormatError:
        return False
    try:
        exercise(f)
    except MeldliteError:
        pass
    return True


# ------------------------------------------------------------ truncation --


def test_truncation_every_header_offset(good, tmp_path):
    blob, data_offset = good
    path = tmp_path / "t.gguf"
    for n in range(data_offset + 1):
        path.write_bytes(blob[:n])
        with pytest.raises(FormatError):
            read_gguf(path)


def test_truncation_in_data(good, tmp_path):
    blob, data_offset = good
    path = tmp_path / "t.gguf"
    rng = np.random.default_rng(1)
    for n in sorted(set(rng.integers(data_offset + 1, len(blob), size=200).tolist())):
        path.write_bytes(blob[:n])
        # only the last tensor's trailing alignment padding can go without harm
        if not open_or_reject(path):
            continue
        assert len(blob) - n < GGUF_DEFAULT_ALIGNMENT


# ---------------------------------------------------------- random flips --


def test_random_byte_changes_in_header(good, tmp_path):
    """1-3 bytes of the header or tensor table changed: to any byte, or (half the time)
    to a printable one, so that damaged names often stay valid and get opened."""
    blob, data_offset = good
    path = tmp_path / "f.gguf"
    rng = np.random.default_rng(1234)
    survived = 0
    for _ in range(400):
        damaged = bytearray(blob)
        printable = rng.random() < 0.5
        for pos in rng.integers(0, data_offset, size=rng.integers(1, 4)):
            damaged[pos] = int(rng.integers(0x20, 0x7F) if printable else rng.integers(0, 256))
        path.write_bytes(damaged)
        survived += open_or_reject(path)
    assert 0 < survived < 400  # most damage caught, some harmless damage opened


def numeric_fields(path):
    """(offset, size) of every count, length, dim, type and offset field of the header."""
    header = check_header(path)
    fields = [(8, 8), (16, 8)]  # tensor count, key count
    for info in header.tensors:
        pos = info.info_offset
        fields.append((pos, 8))  # name length
        pos += 8 + len(info.name.encode("utf-8"))
        fields.append((pos, 4))  # n_dims
        fields += [(pos + 4 + 8 * i, 8) for i in range(len(info.ne))]
        pos += 4 + 8 * len(info.ne)
        fields += [(pos, 4), (pos + 4, 8)]  # type, offset
    return fields


def test_random_values_in_numeric_fields(good, tmp_path):
    """Counts, lengths, dims, types and offsets set to small, boundary and huge values."""
    blob, _ = good
    path = tmp_path / "n.gguf"
    path.write_bytes(blob)
    fields = numeric_fields(path)
    rng = np.random.default_rng(7)
    specials = [0, 1, 2, 3, 31, 32, 33, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
    for _ in range(300):
        pos, size = fields[rng.integers(len(fields))]
        value = (
            int(rng.choice(specials))
            if rng.random() < 0.5
            else int(rng.integers(0, 2**63)) >> int(rng.integers(0, 63))
        )
        value &= (1 << 8 * size) - 1
        damaged = bytearray(blob)
        damaged[pos : pos + size] = value.to_bytes(size, "little")
        path.write_bytes(damaged)
        open_or_reject(path)


def test_random_byte_changes_in_data_never_raise(good, tmp_path):
    blob, data_offset = good
    path = tmp_path / "d.gguf"
    rng = np.random.default_rng(99)
    for _ in range(20):
        damaged = bytearray(blob)
        for pos in rng.integers(data_offset, len(blob), size=8):
            damaged[pos] = int(rng.integers(0, 256))
        path.write_bytes(damaged)
        exercise(read_gguf(path))


# ------------------------------------------------------- hand-made cases --

HEADER_CASES = {
    "bad magic": (gguf_bytes(magic=b"GGUX"), "bad magic"),
    "version 1": (gguf_bytes(version=1), "version 1"),
    "version 4": (gguf_bytes(version=4), "unsupported GGUF version 4"),
    "version 0": (gguf_bytes(version=0), "unsupported GGUF version 0"),
    "byte-swapped": (b"GGUF" + struct.pack(">I", 3) + struct.pack(">QQ", 0, 0), "byte-swapped"),
    "absurd tensor count": (gguf_bytes(n_tensors=2**62), "absurd tensor count"),
    "absurd key count": (gguf_bytes(n_kv=2**64 - 1), "absurd metadata key count"),
    "absurd key length": (gguf_bytes([u64(2**63) + b"k" + u32(V.UINT8) + b"\1"]), "metadata key"),
    "absurd string value": (
        gguf_bytes([kv("a", V.STRING, u64(2**40) + b"xyz")]),
        "string value of key 'a'",
    ),
    "absurd array length": (
        gguf_bytes([kv("a", V.ARRAY, u32(V.UINT32) + u64(2**61))]),
        "absurd array length",
    ),
    "absurd string array": (
        gguf_bytes([kv("a", V.ARRAY, u32(V.STRING) + u64(2**40) + gstr("x"))]),
        "absurd array length",
    ),
    "absurd string in array": (
        gguf_bytes([kv("a", V.ARRAY, u32(V.STRING) + u64(2) + gstr("x") + u64(2**50))]),
        "element 1 of key 'a'",
    ),
    "nested array": (
        gguf_bytes([kv("a", V.ARRAY, u32(V.ARRAY) + u64(1) + u32(V.UINT8) + u64(1) + b"\1")]),
        "nested array",
    ),
    "unknown value type": (
        gguf_bytes([kv("a", UNKNOWN_VALUE_TYPE, b"\0" * 8)]),
        "unknown value type",
    ),
    "unknown array element type": (
        gguf_bytes([kv("a", V.ARRAY, u32(UNKNOWN_VALUE_TYPE) + u64(1))]),
        "unknown array element type",
    ),
    "duplicate key": (
        gguf_bytes([kv("a", V.UINT8, b"\1"), kv("a", V.UINT8, b"\2")]),
        "duplicate metadata key 'a'",
    ),
    "bad utf-8 key": (gguf_bytes([kv(b"\xff\xfe", V.UINT8, b"\1")]), "UTF-8"),
    "bad utf-8 value": (gguf_bytes([kv("a", V.STRING, gstr(b"\xc3"))]), "UTF-8"),
    "alignment zero": (
        gguf_bytes([kv(Keys.General.ALIGNMENT, V.UINT32, u32(0))]),
        "general.alignment 0",
    ),
    "alignment not power of 2": (
        gguf_bytes([kv(Keys.General.ALIGNMENT, V.UINT32, u32(24))]),
        "general.alignment 24",
    ),
    "alignment wrong type": (gguf_bytes([kv(Keys.General.ALIGNMENT, V.UINT64, u64(32))]), "UINT64"),
    "empty file": (b"", "truncated"),
    "short file": (b"GGUF\3\0\0\0", "truncated"),
    "key count beyond data": (gguf_bytes([kv("a", V.UINT8, b"\1")], n_kv=2), "empty metadata key"),
    "key count beyond file": (
        gguf_bytes([kv("a", V.UINT8, b"\1")], n_kv=3, alignment=1),
        "absurd metadata key count",
    ),
}


@pytest.mark.parametrize("case", HEADER_CASES, ids=str)
def test_hostile_header(tmp_path, case):
    blob, match = HEADER_CASES[case]
    check_rejected(tmp_path, blob, match)


TENSOR_CASES = {
    "n_dims 5": ([tinfo("w", [8, 1, 1, 1, 1], T.F32, 0)], F32_DATA, "n_dims 5"),
    "n_dims 0": ([tinfo("w", [], T.F32, 0)], F32_DATA, "n_dims 0"),
    "n_dims huge": ([gstr("w") + u32(2**31) + u64(8)], F32_DATA, "n_dims 2147483648"),
    "zero dim": ([tinfo("w", [8, 0], T.F32, 0)], F32_DATA, r"ne\[1\] = 0"),
    "dims overflow": ([tinfo("w", [2**32, 2**32, 2**32], T.F32, 0)], F32_DATA, "overflow"),
    "dims huge but no overflow": ([tinfo("w", [2**20, 2**20], T.F32, 0)], F32_DATA, "past the end"),
    "unknown type id": (
        [tinfo("w", [8], UNKNOWN_TYPE_ID, 0)],
        F32_DATA,
        f"unknown ggml type id {UNKNOWN_TYPE_ID}",
    ),
    "row not whole blocks": (
        [tinfo("w", [48], T.Q4_0, 0)],
        b"\0" * 64,
        "not a multiple of the Q4_0 block size 32",
    ),
    "offset past end": ([tinfo("w", [8], T.F32, 2**40)], F32_DATA, "past the end"),
    "data truncated": ([tinfo("w", [16], T.F32, 0)], F32_DATA, "'w'.*past the end"),
    "misaligned offset": (
        [F32_ROW, tinfo("v", [4], T.F32, 48)],
        F32_DATA * 3,
        "not a multiple of the alignment 32",
    ),
    "overlapping": ([F32_ROW, tinfo("v", [8], T.F32, 0)], F32_DATA * 2, "'v'.*overlaps"),
    "out of order": (
        [tinfo("v", [8], T.F32, 32), tinfo("w", [8], T.F32, 0)],
        F32_DATA * 2,
        "'v'.*expected 0",
    ),
    "gap": ([tinfo("w", [8], T.F32, 64)], F32_DATA * 3, "'w'.*expected 0"),
    "duplicate name": (
        [F32_ROW, tinfo("w", [8], T.F32, 32)],
        F32_DATA * 2,
        "duplicate tensor name 'w'",
    ),
    "empty name": ([tinfo("", [8], T.F32, 0)], F32_DATA, "name length 0"),
    "name too long": ([tinfo("x" * 64, [8], T.F32, 0)], F32_DATA, "name length 64"),
    "absurd name length": ([u64(2**62) + b"w"], F32_DATA, "tensor name"),
}


@pytest.mark.parametrize("case", TENSOR_CASES, ids=str)
def test_hostile_tensor_info(tmp_path, case):
    infos, data, match = TENSOR_CASES[case]
    check_rejected(tmp_path, gguf_bytes([], infos, data), match)


def test_tensor_error_names_the_tensor_and_offset(tmp_path):
    blob = gguf_bytes(
        [kv("a", V.UINT8, b"\1")], [F32_ROW, tinfo("blk.0.bad", [8, 2**62], T.F32, 32)], F32_DATA
    )
    check_rejected(tmp_path, blob, r"tensor 'blk.0.bad' \(info at byte \d+\)")


def test_error_names_the_file(tmp_path):
    check_rejected(tmp_path, gguf_bytes(magic=b"XXXX"), "bad.gguf")


def test_misaligned_with_custom_alignment(tmp_path):
    align = kv(Keys.General.ALIGNMENT, V.UINT32, u32(64))
    blob = gguf_bytes([align], [F32_ROW, tinfo("v", [8], T.F32, 32)], F32_DATA * 4, alignment=64)
    check_rejected(tmp_path, blob, "alignment 64")


def test_valid_hand_made_file_opens(tmp_path):
    """The encoder itself is right: the same structure, undamaged, reads back."""
    q = GGML_QUANT_SIZES[T.Q8_0][1] * 2
    blob = gguf_bytes(
        [kv("a", V.ARRAY, u32(V.STRING) + u64(2) + gstr("x") + gstr("yz"))],
        [F32_ROW, tinfo("q", [64], T.Q8_0, 32)],
        F32_DATA + b"\0" * q,
    )
    path = tmp_path / "ok.gguf"
    path.write_bytes(blob)
    f = read_gguf(path)
    assert f.metadata["a"] == ["x", "yz"]
    np.testing.assert_array_equal(f.tensor("w").dequantize(), np.arange(8))
    assert f.tensor("q").shape == (64,)


def test_reserved_key_name_clash_is_format_error(tmp_path):
    """gguf-py keeps its own 'GGUF.version' field; a file key of that name must not crash it."""
    check_rejected(tmp_path, gguf_bytes([kv("GGUF.version", V.UINT32, u32(3))]), "gguf-py")


def test_absurd_block_count_fails_on_expert_calls(tmp_path):
    key = Keys.LLM.BLOCK_COUNT.format(arch="qwen3moe")
    blob = gguf_bytes(
        [kv(Keys.General.ARCHITECTURE, V.STRING, gstr("qwen3moe")), kv(key, V.UINT64, u64(2**60))],
        [F32_ROW],
        F32_DATA,
    )
    path = tmp_path / "b.gguf"
    path.write_bytes(blob)
    f = read_gguf(path)
    with pytest.raises(FormatError, match="block_count"):
        f.expert_count(0)


def test_unknown_expert_layout(tmp_path):
    blob = gguf_bytes(
        [
            kv(Keys.LLM.BLOCK_COUNT.format(arch="None"), V.UINT32, u32(1)),
            kv("meldlite.expert_layout", V.STRING, gstr("diagonal")),
        ],
        [F32_ROW],
        F32_DATA,
    )
    check_rejected(tmp_path, blob, "diagonal")


def test_bad_expert_order_metadata(tmp_path):
    arch = kv(Keys.General.ARCHITECTURE, V.STRING, gstr("qwen3moe"))
    blocks = kv(Keys.LLM.BLOCK_COUNT.format(arch="qwen3moe"), V.UINT32, u32(1))
    layout = kv("meldlite.expert_layout", V.STRING, gstr("per_expert"))
    order = kv("meldlite.expert_order", V.ARRAY, u32(V.UINT32) + u64(2) + u32(0) + u32(5))
    infos = [
        tinfo(f"blk.0.ffn_{k}_exps.0.weight", [8], T.F32, 32 * i)
        for i, k in enumerate(("gate", "up", "down"))
    ]
    check_rejected(
        tmp_path, gguf_bytes([arch, blocks, layout, order], infos, F32_DATA * 3), "expert_order"
    )


def test_metadata_array_element_limit(tmp_path, monkeypatch):
    from meldlite.formats import validate

    monkeypatch.setattr(validate, "MAX_ARRAY_ELEMENTS", 10)
    arr = lambda n: u32(V.UINT8) + u64(n) + b"\1" * n  # noqa: E731
    check_rejected(
        tmp_path,
        gguf_bytes([kv("a", V.ARRAY, arr(6)), kv("b", V.ARRAY, arr(6))]),
        "key 'b'.*12 array elements",
    )


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(OSError):
        read_gguf(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "absent.gguf")
