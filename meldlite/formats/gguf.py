"""Reading GGUF files: metadata as plain values, tensors as zero-copy views.

`read_gguf(path)` first walks the header within bounds (`validate.check_header`),
then opens the file with gguf-py's memory-mapped `GGUFReader`.  No tensor data
is read or copied at open time: every `TensorView.raw` is a uint8 view into the
one read-only memory map.  Expert weights are reached through a layout-neutral
API (`expert_tensor`, `expert_ranges`, `expert_types`) that reads both the
stacked layout of llama.cpp and meldlite's per-expert layout (see layout.py and
docs/format.md).
"""

import os
import struct
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, Keys

from meldlite.errors import FormatError, OptionError, UnsupportedError
from meldlite.formats import layout
from meldlite.formats.validate import SCALAR_DTYPES, check_header

_RESERVED_PREFIX = "GGUF."  # GGUFReader's pseudo-fields for the header counts


def pread_full(fd, buf, offset):
    """Read the file `fd` from byte `offset` into the writable buffer `buf` (uint8 array
    or memoryview) until it is full or the file ends (os.preadv, no seek: safe across
    threads); returns the number of bytes read."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < view.nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            break
        done += got
    return done


def read_gguf(path):
    """Open the GGUF file at `path` (v2 or v3, little-endian) and return a `GGUFFile`.

    Raises FormatError for a corrupt, truncated or hostile file (message names the
    file, what is wrong and where); OSError if it cannot be opened.
    """
    path = Path(path)
    try:
        header = check_header(path)
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    reader = _open_reader(path, header.array_spans)
    return GGUFFile(path, reader, header)


def _open_reader(path, array_spans):
    try:
        return _CompactReader(path, array_spans)
    except OSError:
        raise
    except Exception as e:  # gguf-py raises ValueError/KeyError/IndexError on bad input
        raise FormatError(
            f"{path}: gguf-py cannot parse the file: {type(e).__name__}: {e}"
        ) from None


class _CompactReader(GGUFReader):
    """GGUFReader keeping each metadata array as one uint8 view of its elements'
    bytes, instead of a numpy view per element (which costs ~800 bytes each:
    ~450 MB and seconds for a 150k-token vocabulary with its merges).
    The element spans come from the header walk, which has already checked them."""

    def __init__(self, path, array_spans):
        self._array_spans = array_spans
        super().__init__(path, "r")

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type != GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        etype = self._get(orig_offs, np.uint32)  # (1,) element type
        count = self._get(orig_offs + 4, np.uint64)  # (1,) element count
        start = orig_offs + 12
        elements = self.data[start : start + self._array_spans[start]]  # uint8 (nbytes,)
        types = [GGUFValueType.ARRAY, GGUFValueType(int(etype[0]))]
        return 12 + elements.nbytes, [etype, count, elements], [2], types


class TensorView:
    """One tensor of a GGUF file, as a view of its bytes (nothing copied).

    shape: numpy order (ne reversed), e.g. token_embd.weight (n_vocab, n_embd).
    raw:   uint8 view (*shape[:-1], row_bytes) of the file's memory map.
    """

    __slots__ = ("ggml_type", "name", "offset", "raw", "shape")

    def __init__(self, name, ggml_type, shape, raw, offset):
        self.name = name
        self.ggml_type = ggml_type  # gguf.GGMLQuantizationType
        self.shape = tuple(shape)  # numpy order, e.g. (n_vocab, n_embd)
        self.raw = raw  # uint8 (*shape[:-1], row_bytes), memmap view
        self.offset = offset  # absolute file offset of the first byte

    @property
    def qtype(self):
        """ggml type name, e.g. "Q4_K"."""
        return self.ggml_type.name

    @property
    def nbytes(self):
        return self.raw.nbytes

    @property
    def row_bytes(self):
        return self.raw.shape[-1]

    def dequantize(self):
        """float32 array of `self.shape`, decoded by `meldlite.kernels.dequantize`."""
        return dequantize_raw(self.raw, self.ggml_type, self.name).reshape(self.shape)

    def expert_slice(self, e, name):
        """View of slice [e] of a stacked (n_expert, rows, cols) tensor, named `name`."""
        sub = self.raw[e]  # uint8 (rows, row_bytes), contiguous
        return TensorView(name, self.ggml_type, self.shape[1:], sub, self.offset + e * sub.nbytes)

    def __repr__(self):
        return f"TensorView({self.name!r}, {self.qtype}, shape={self.shape}, offset={self.offset})"


def dequantize_raw(raw, ggml_type, name="tensor"):
    """Decode uint8 rows (..., row_bytes) of `ggml_type` into float32 (..., n_cols)."""
    from meldlite.kernels import dequantize  # imported here: opening a file needs no Numba

    try:
        return dequantize(raw, ggml_type)
    except UnsupportedError as e:
        raise UnsupportedError(f"{name}: {e}") from None


class GGUFFile:
    """An open GGUF file: metadata, tensors, and experts whatever their layout."""

    def __init__(self, path, reader, header):
        self.path = Path(path)
        self.version = header.version
        self.alignment = header.alignment
        self.data_offset = header.data_offset
        self.metadata, self.metadata_types = _read_metadata(reader, path)
        self._reader = reader
        self._tensors = _tensor_views(reader, header, path)
        self._experts = None
        self._experts_error = None
        self._index_experts()

    # -- metadata and tensors ------------------------------------------------

    @property
    def architecture(self):
        return self.metadata.get(Keys.General.ARCHITECTURE)

    def tensor_names(self):
        """Tensor names in file order."""
        return list(self._tensors)

    def has_tensor(self, name):
        return name in self._tensors

    def tensor(self, name):
        try:
            return self._tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: no tensor named {name!r}") from None

    # -- experts -------------------------------------------------------------

    @property
    def expert_layout(self):
        """ "stacked" (llama.cpp) or "per_expert" (meldlite pack)."""
        return self.metadata.get(layout.KEY_LAYOUT, layout.STACKED)

    @property
    def n_layers(self):
        """Number of transformer blocks ({arch}.block_count)."""
        key = Keys.LLM.BLOCK_COUNT.format(arch=self.architecture)
        value = self.metadata.get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise FormatError(f"{self.path}: metadata {key!r} is missing or not an integer")
        if not 0 <= value <= len(self._tensors):
            raise FormatError(
                f"{self.path}: {key} = {value} is out of range "
                f"(file has {len(self._tensors)} tensors)"
            )
        return value

    def expert_count(self, layer):
        """Number of experts in `layer`; 0 for a dense layer."""
        return self._expert_index(layer).count(layer)

    def expert_tensor(self, layer, kind, e):
        """2-D TensorView (rows, cols) of expert e's `kind` ("gate", "up", "down") matrix."""
        return self._expert_index(layer).tensor(layer, kind, e)

    def expert_ranges(self, layer, e):
        """Absolute (offset, nbytes) file ranges holding expert e's three matrices
        (one merged range in the per-expert layout, three in the stacked one)."""
        return self._expert_index(layer).ranges(layer, e)

    def expert_types(self, layer):
        """[(gate, up, down) ggml type names] for each expert of `layer`
        ("pruned" x 3 for a pruned expert whose tensors are not in the file)."""
        index = self._expert_index(layer)
        return [
            tuple(index.tensor(layer, k, e).qtype for k in layout.KINDS)
            if self.expert_present(layer, e)
            else ("pruned",) * 3
            for e in range(index.count(layer))
        ]

    def expert_present(self, layer, e):
        """False for a pruned expert whose tensors were left out of the file, and for
        every expert of a layer without experts (a dense layer of a MoE model)."""
        index = self._expert_index(layer)
        return index.count(layer) > 0 and index.stored(layer, e)

    def expert_order(self):
        """(layer, e) pairs of every stored expert, sorted by where its gate matrix lies in the file."""
        pairs = [
            (L, e)
            for L in range(self.n_layers)
            for e in range(self.expert_count(L))
            if self.expert_present(L, e)
        ]
        return sorted(pairs, key=lambda p: self.expert_tensor(p[0], "gate", p[1]).offset)

    def expert_tensor_names(self):
        """Names of the tensors that hold expert weights (either layout)."""
        return self._index().expert_tensor_names()

    def _index(self):
        if self._experts is None:
            raise self._experts_error
        return self._experts

    def _expert_index(self, layer):
        index = self._index()
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.n_layers:
            raise OptionError(f"layer {layer} out of range (model has {self.n_layers} layers)")
        return index

    def _index_experts(self):
        """Build the expert index now, so a bad layout fails at open time; if the
        file has no usable block_count, defer the error to the first expert call."""
        try:
            n_layers = self.n_layers
        except FormatError as e:
            self._experts_error = e
            return
        name = self.expert_layout
        try:
            if name == layout.STACKED:
                self._experts = layout.StackedExperts(self, n_layers)
            elif name == layout.PER_EXPERT:
                self._experts = layout.PerExpertExperts(self, n_layers, self.alignment)
                self._check_per_expert()
            else:
                raise FormatError(f"unknown {layout.KEY_LAYOUT} {name!r}")
        except FormatError as e:
            raise FormatError(f"{self.path}: {e}") from None

    def _check_per_expert(self):
        stacked = [
            layout.stacked_name(L, k)
            for L in range(self.n_layers)
            for k in layout.KINDS
            if self.has_tensor(layout.stacked_name(L, k))
        ]
        if stacked:
            raise FormatError(f"per-expert file also holds stacked tensor {stacked[0]!r}")
        order = self.metadata.get(layout.KEY_ORDER)
        if order is None:
            return
        pairs = list(zip(order[0::2], order[1::2])) if isinstance(order, list) else None
        if pairs is None or len(order) % 2 or sorted(pairs) != sorted(self._experts.present()):
            raise FormatError(f"{layout.KEY_ORDER} does not list each stored expert exactly once")

    def close(self):
        """Drop this object's references to the memory map (views handed out stay valid)."""
        self._tensors, self._experts, self._reader = {}, None, None
        self._experts_error = FormatError(f"{self.path}: file is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (
            f"GGUFFile({str(self.path)!r}, v{self.version}, {self.architecture}, "
            f"{len(self._tensors)} tensors, {self.expert_layout})"
        )


def _read_metadata(reader, path):
    """Key -> plain Python value, and key -> (GGUFValueType, array element type or None)."""
    values, types = {}, {}
    for key, field in reader.fields.items():
        if key.startswith(_RESERVED_PREFIX) and field.offset < 24:
            continue
        main = field.types[0]
        sub = field.types[1] if main == GGUFValueType.ARRAY else None
        try:
            values[key] = _array_value(field, sub) if sub is not None else field.contents()
        except Exception as e:
            raise FormatError(
                f"{path}: metadata {key!r} at byte {field.offset} cannot be decoded: {e}"
            ) from None
        types[key] = (main, sub)
    return values, types


def _array_value(field, etype):
    """List of an array field's elements, from the one view `_CompactReader` keeps."""
    elements = field.parts[field.data[0]]  # uint8 (nbytes,)
    count = int(field.parts[field.data[0] - 1][0])  # parts: ..., etype, count, elements
    if etype != GGUFValueType.STRING:
        return elements.view(np.dtype(SCALAR_DTYPES[etype]).newbyteorder("<")).tolist()
    buf, out, pos = elements.tobytes(), [], 0
    for _ in range(count):
        (n,) = struct.unpack_from("<Q", buf, pos)
        out.append(buf[pos + 8 : pos + 8 + n].decode("utf-8"))
        pos += 8 + n
    return out


def _tensor_views(reader, header, path):
    """name -> TensorView, from the validated header; cross-checked against gguf-py."""
    if [t.name for t in reader.tensors] != [t.name for t in header.tensors]:
        raise FormatError(f"{path}: gguf-py and the header walk disagree on the tensor list")
    views = {}
    for info, rt in zip(header.tensors, reader.tensors):
        start = header.data_offset + info.offset
        if rt.data_offset != start or rt.n_bytes != info.nbytes:
            raise FormatError(
                f"{path}: tensor {info.name!r}: gguf-py places it at byte "
                f"{rt.data_offset}, the header walk at {start}"
            )
        views[info.name] = _view(reader.data, info, start)
    return views


def _view(data, info, start):
    shape = tuple(reversed(info.ne))  # numpy order
    block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
    row_bytes = shape[-1] // block_size * type_size
    raw = data[start : start + info.nbytes].reshape(
        shape[:-1] + (row_bytes,)
    )  # uint8 (..., row_bytes)
    return TensorView(info.name, info.ggml_type, shape, raw, start)
