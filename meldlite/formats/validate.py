"""Bounded pre-walk of a GGUF header: reject hostile files before anything allocates.

gguf-py's `GGUFReader` trusts the counts and lengths it reads (it loops over a
claimed tensor count, slices a claimed string length, indexes a claimed type id),
so a damaged file gives IndexError, KeyError, a huge allocation or a very long
loop.  `check_header` walks the same structure with `struct` over a read-only
mmap, compares every count and length with the bytes that remain *before* using
it, and raises `FormatError` naming what is wrong and at which byte offset (or
in which tensor).  The work it does is bounded by the file size.

What is checked (following ggml's `gguf.cpp`, which is stricter than the spec):
magic; version 2 or 3 (v1 and byte-swapped files rejected); tensor and key
counts; string lengths and UTF-8; value type ids; arrays (no nesting, element
count within the file); duplicate keys; `general.alignment` (u32, power of two);
tensor names (non-empty, at most 63 bytes, unique); 1..4 dims, each >= 1, no
overflow; known ggml type with ne[0] a multiple of its block size; each data
offset aligned, equal to the running padded sum in tensor-info order (so no
overlap, gap or reordering) and inside the file.
"""

import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    Keys,
)

from meldlite.errors import FormatError

SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 63  # GGML_MAX_NAME - 1 (room for the NUL in C)
# Metadata becomes Python lists: bound their total size (a 256k-token vocabulary
# with scores, types and merges is about 1M elements).
MAX_ARRAY_ELEMENTS = 1 << 23
INT64_MAX = 2**63 - 1

SCALAR_DTYPES = {
    GGUFValueType.UINT8: np.uint8,
    GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16,
    GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32,
    GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32,
    GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64,
    GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}
SCALAR_SIZES = {t: np.dtype(d).itemsize for t, d in SCALAR_DTYPES.items()}

# Smallest encodings, used to bound counts against the bytes that remain.
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name len, 1-byte name, n_dims, ne[0], type, offset


@dataclass(frozen=True)
class TensorInfo:
    """One tensor-info record as found in the header."""

    name: str
    ggml_type: GGMLQuantizationType
    ne: tuple  # ggml order: ne[0] is the contiguous axis
    offset: int  # relative to the data section
    nbytes: int
    info_offset: int  # absolute file offset of the record (for messages)


@dataclass(frozen=True)
class Header:
    """What the pre-walk learned; the reader cross-checks gguf-py against it."""

    version: int
    n_kv: int
    alignment: int
    data_offset: int  # absolute start of the data section
    file_size: int
    tensors: tuple  # of TensorInfo, in file order
    array_spans: dict  # absolute offset of each metadata array's elements -> their byte size


class _Cursor:
    """Sequential little-endian reads over a buffer, bounds-checked before each read."""

    def __init__(self, buf, size):
        self.buf, self.size, self.pos = buf, size, 0

    def remaining(self):
        return self.size - self.pos

    def need(self, n, what):
        if n > self.remaining():
            raise FormatError(
                f"truncated file: {what} at byte {self.pos} needs {n} bytes, "
                f"only {self.remaining()} remain"
            )

    def unpack(self, fmt, what):
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what):
        return self.unpack("<I", what)

    def u64(self, what):
        return self.unpack("<Q", what)

    def skip(self, n, what):
        self.need(n, what)
        self.pos += n

    def string(self, what):
        start = self.pos
        length = self.u64(f"length of {what}")
        self.need(length, f"{what} ({length} bytes, length at byte {start})")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{what} at byte {start} is not valid UTF-8 ({e.reason})") from None


def check_header(path):
    """Walk the header of the GGUF file at `path` within bounds; return a `Header`.

    Raises FormatError on anything malformed; OSError if the file cannot be read.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 4 + 4 + 8 + 8:
            raise FormatError(f"truncated file: {size} bytes is shorter than a GGUF header (24)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(_Cursor(buf, size))


def _walk(cur):
    _check_magic(cur)
    version = _check_version(cur)
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata key count")
    _check_count(cur, n_kv, _MIN_KV_BYTES, "metadata key count")
    alignment, arrays = _walk_metadata(cur, n_kv)
    _check_count(cur, n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor count")
    infos = [_read_tensor_info(cur) for _ in range(n_tensors)]
    data_offset = _pad(cur.pos, alignment)
    _check_tensor_data(infos, alignment, data_offset, cur.size)
    return Header(version, n_kv, alignment, data_offset, cur.size, tuple(infos), arrays.spans)


def _check_magic(cur):
    magic = cur.u32("magic")
    if magic != GGUF_MAGIC:
        raise FormatError(f"not a GGUF file: bad magic {struct.pack('<I', magic)!r} at byte 0")


def _check_version(cur):
    version = cur.u32("version")
    if version & 0xFFFF == 0 and version != 0:
        raise FormatError(
            f"byte-swapped (big-endian) GGUF is not supported "
            f"(version field 0x{version:08x} at byte 4)"
        )
    if version == 1:
        raise FormatError("GGUF version 1 is no longer supported (byte 4); re-convert the model")
    if version not in SUPPORTED_VERSIONS:
        raise FormatError(
            f"unsupported GGUF version {version} at byte 4 "
            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
        )
    return version


def _check_count(cur, count, min_bytes, what):
    if count * min_bytes > cur.remaining():
        raise FormatError(
            f"absurd {what} {count} at byte {cur.pos}: "
            f"at least {count * min_bytes} bytes needed, {cur.remaining()} remain"
        )


class _Arrays:
    """Where the metadata arrays' elements lie, and how many there are in all."""

    def __init__(self):
        self.spans, self.n_elements = {}, 0


def _walk_metadata(cur, n_kv):
    """Walk the key/value section; return the data alignment it declares and its arrays."""
    seen = set()
    alignment = GGUF_DEFAULT_ALIGNMENT
    arrays = _Arrays()
    for _ in range(n_kv):
        start = cur.pos
        key = cur.string("metadata key")
        if not key:
            raise FormatError(f"empty metadata key at byte {start}")
        if key in seen:
            raise FormatError(f"duplicate metadata key {key!r} at byte {start}")
        seen.add(key)
        vtype = _value_type(cur, f"value type of key {key!r}")
        if key == Keys.General.ALIGNMENT:
            alignment = _read_alignment(cur, vtype)
        else:
            _skip_value(cur, vtype, key, arrays)
    return alignment, arrays


def _value_type(cur, what):
    pos = cur.pos
    raw = cur.u32(what)
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise FormatError(f"unknown {what}: {raw} at byte {pos}") from None


def _read_alignment(cur, vtype):
    pos = cur.pos
    if vtype != GGUFValueType.UINT32:
        raise FormatError(
            f"bad {Keys.General.ALIGNMENT}: type {vtype.name} at byte {pos}, expected UINT32"
        )
    alignment = cur.u32(Keys.General.ALIGNMENT)
    if alignment == 0 or alignment & (alignment - 1):
        raise FormatError(
            f"bad {Keys.General.ALIGNMENT} {alignment} at byte {pos}: "
            f"must be a non-zero power of two"
        )
    return alignment


def _skip_value(cur, vtype, key, arrays):
    if vtype in SCALAR_SIZES:
        cur.skip(SCALAR_SIZES[vtype], f"value of key {key!r}")
    elif vtype == GGUFValueType.STRING:
        cur.string(f"string value of key {key!r}")
    else:
        _skip_array(cur, key, arrays)


def _skip_array(cur, key, arrays):
    etype = _value_type(cur, f"array element type of key {key!r}")
    pos = cur.pos
    count = cur.u64(f"array length of key {key!r}")
    if etype == GGUFValueType.ARRAY:
        raise FormatError(f"nested array in key {key!r} at byte {pos - 4}: not supported")
    min_size = SCALAR_SIZES.get(etype, 8)  # a string needs at least its length
    if count * min_size > cur.remaining():
        raise FormatError(
            f"absurd array length {count} for key {key!r} at byte {pos}: "
            f"{cur.remaining()} bytes remain"
        )
    arrays.n_elements += count
    if arrays.n_elements > MAX_ARRAY_ELEMENTS:
        raise FormatError(
            f"array of key {key!r} at byte {pos} brings the metadata to "
            f"{arrays.n_elements} array elements (limit {MAX_ARRAY_ELEMENTS})"
        )
    start = cur.pos
    if etype == GGUFValueType.STRING:
        for i in range(count):
            cur.string(f"element {i} of key {key!r}")
    else:
        cur.skip(count * min_size, f"array of key {key!r}")
    arrays.spans[start] = cur.pos - start


def _read_tensor_info(cur):
    start = cur.pos
    name = cur.string("tensor name")
    where = f"tensor {name!r} (info at byte {start})"
    if not name or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise FormatError(
            f"bad tensor name length {len(name.encode('utf-8'))} at byte {start} "
            f"(must be 1..{MAX_NAME_BYTES} bytes)"
        )
    n_dims = cur.u32(f"n_dims of {where}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise FormatError(f"{where}: n_dims {n_dims} out of range 1..{MAX_DIMS}")
    ne = tuple(cur.u64(f"ne[{i}] of {where}") for i in range(n_dims))
    ggml_type = _tensor_type(cur, where)
    offset = cur.u64(f"data offset of {where}")
    nbytes = _tensor_nbytes(ne, ggml_type, where)
    return TensorInfo(name, ggml_type, ne, offset, nbytes, start)


def _tensor_type(cur, where):
    pos = cur.pos
    raw = cur.u32(f"type of {where}")
    try:
        ggml_type = GGMLQuantizationType(raw)
    except ValueError:
        raise FormatError(f"{where}: unknown ggml type id {raw} at byte {pos}") from None
    if ggml_type not in GGML_QUANT_SIZES:
        raise FormatError(f"{where}: ggml type {ggml_type.name} has no known block size")
    return ggml_type


def _tensor_nbytes(ne, ggml_type, where):
    n_elements = 1
    for i, n in enumerate(ne):
        if n < 1:
            raise FormatError(f"{where}: ne[{i}] = {n} (dimensions must be >= 1)")
        n_elements *= n
        if n_elements > INT64_MAX:
            raise FormatError(f"{where}: dimensions {list(ne)} overflow 64-bit element count")
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    if ne[0] % block_size:
        raise FormatError(
            f"{where}: row length ne[0] = {ne[0]} is not a multiple of "
            f"the {ggml_type.name} block size {block_size}"
        )
    return n_elements // block_size * type_size


def _check_tensor_data(infos, alignment, data_offset, file_size):
    """Each tensor's bytes: aligned, packed in info order, inside the file."""
    seen = {}
    expected, previous = 0, None
    for info in infos:
        if info.name in seen:
            raise FormatError(
                f"duplicate tensor name {info.name!r} at byte {info.info_offset} "
                f"(first at byte {seen[info.name]})"
            )
        seen[info.name] = info.info_offset
        end = data_offset + info.offset + info.nbytes
        if end > file_size:
            raise FormatError(
                f"tensor {info.name!r}: data [{data_offset + info.offset}, {end}) "
                f"runs past the end of the file ({file_size} bytes)"
            )
        _check_offset(info, alignment, expected, previous)
        expected, previous = info.offset + _pad(info.nbytes, alignment), info


def _check_offset(info, alignment, expected, previous):
    where = f"tensor {info.name!r}"
    if info.offset % alignment:
        raise FormatError(
            f"{where}: data offset {info.offset} is not a multiple of the alignment {alignment}"
        )
    if info.offset < expected:
        raise FormatError(
            f"{where}: data offset {info.offset} overlaps or precedes tensor "
            f"{previous.name!r} (expected {expected})"
        )
    if info.offset > expected:
        raise FormatError(
            f"{where}: data offset {info.offset}, expected {expected} "
            f"(tensor data must be packed in tensor-info order)"
        )


def _pad(n, alignment):
    return (n + alignment - 1) // alignment * alignment
