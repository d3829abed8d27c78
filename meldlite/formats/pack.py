"""`meldlite pack`: write a per-expert-layout GGUF whose experts come from several
quantizations of the same model, each expert from the one its SPEC rule names.

Nothing is re-quantized: a stacked expert tensor keeps each expert's rows
contiguous, so expert e of a source is a byte slice, copied as is (and its gate,
up and down keep whatever types that source gave them).  Non-expert tensors and
all metadata come from SRC unchanged.  Bytes are streamed from the sources'
memory maps through gguf-py's `GGUFWriter`; the model is never loaded whole.
"""

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter, Keys, LlamaFileType

from meldlite.errors import OptionError, UnsupportedError
from meldlite.formats import layout
from meldlite.formats.gguf import read_gguf
from meldlite.formats.spec import ExpertSpec, parse_spec

SRC_LABEL = "SRC"
LAYER_MAJOR = "layer-major"
_FTYPE_PREFIXES = ("MOSTLY_", "ALL_")
_OWN_KEYS = (layout.KEY_LAYOUT, layout.KEY_ORDER, layout.KEY_ORDER_POLICY)


@dataclass(frozen=True)
class Choice:
    """Expert e of `layer` is copied from `source` (the file labelled `label`)."""

    layer: int
    e: int
    label: str
    source: object  # GGUFFile


@dataclass(frozen=True)
class PackResult:
    path: Path
    n_experts: int
    labels: dict  # label -> number of experts taken from it
    nbytes: int  # size of the written file


def pack(src, out, spec, sources=None, *, order=None, order_policy=None):
    """Write `out` in the per-expert layout.

    src:     path of the model to pack (stacked or per-expert layout).
    spec:    SPEC text (see spec.py) or an ExpertSpec: expert -> source label.
    sources: {label: path} of other quantizations of the same model. SRC is a
             source too, under "SRC", its file type name (e.g. Q4_K_M, for a stacked
             file) and its expert type when uniform (e.g. Q4_K); explicit labels win.
    order:   (layer, e) pairs in the order to write experts; default layer-major.
    order_policy: name stored in the file for that order (default "layer-major",
             or "custom" when `order` is given).
    """
    spec = spec if isinstance(spec, ExpertSpec) else parse_spec(spec)
    src_file = read_gguf(src)
    files = open_sources(src_file, sources or {})
    choices = plan(src_file, spec, files, order)
    policy = order_policy or (LAYER_MAJOR if order is None else "custom")
    out = Path(out)
    write_per_expert(out, src_file, choices, policy)
    return PackResult(
        out, len(choices), dict(Counter(c.label for c in choices)), out.stat().st_size
    )


# -- sources ----------------------------------------------------------------


def describe(f):
    """Labels that describe a file's quantization: its expert type if uniform
    (e.g. "Q4_K") and, for a stacked file, its general.file_type name ("Q4_K_M")."""
    names = set()
    gate_types = {t[0] for L in range(f.n_layers) for t in f.expert_types(L)}
    if len(gate_types) == 1:
        names |= gate_types
    if f.expert_layout == layout.STACKED:
        ftype = _file_type_name(f.metadata.get(Keys.General.FILE_TYPE))
        if ftype:
            names.add(ftype)
    return names


def _file_type_name(value):
    try:
        name = LlamaFileType(value).name
    except (ValueError, TypeError):
        return None
    for prefix in _FTYPE_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None


def _is_type_label(label):
    known = set(GGMLQuantizationType.__members__)
    known |= {n for n in (_file_type_name(t.value) for t in LlamaFileType) if n}
    return label in known


def open_sources(src_file, sources):
    """{label: GGUFFile}: SRC under its own labels, then each --from file (checked to
    be the same model as SRC, and to be what a type-like label says it is)."""
    files = dict.fromkeys(describe(src_file) | {SRC_LABEL}, src_file)
    explicit = set()
    for label, path in sources.items():
        label = label.upper()
        if label == SRC_LABEL or label in explicit:
            raise OptionError(f"source label {label} is reserved or given twice")
        explicit.add(label)
        same = Path(path).resolve() == src_file.path.resolve()
        f = src_file if same else read_gguf(path)
        check_same_model(src_file, f)
        if _is_type_label(label) and label not in describe(f):
            raise OptionError(
                f"source {label}={path} does not hold {label} experts "
                f"(it is {', '.join(sorted(describe(f))) or 'mixed'})"
            )
        files[label] = f
    return files


def check_same_model(a, b):
    """OptionError unless `b` has the same architecture, tensors, shapes and experts as `a`."""
    what = f"{b.path} is not the same model as {a.path}"
    if a.architecture != b.architecture or a.n_layers != b.n_layers:
        raise OptionError(
            f"{what}: architecture {b.architecture}/{b.n_layers} layers, "
            f"expected {a.architecture}/{a.n_layers} layers"
        )
    for L in range(a.n_layers):
        if a.expert_count(L) != b.expert_count(L):
            raise OptionError(
                f"{what}: layer {L} has {b.expert_count(L)} experts, expected {a.expert_count(L)}"
            )
        for kind in layout.KINDS if a.expert_count(L) else ():
            sa, sb = a.expert_tensor(L, kind, 0).shape, b.expert_tensor(L, kind, 0).shape
            if sa != sb:
                raise OptionError(
                    f"{what}: layer {L} {kind} experts have shape {sb}, expected {sa}"
                )
    _check_same_tensors(a, b, what)


def _check_same_tensors(a, b, what):
    na, nb = non_expert_names(a), non_expert_names(b)
    if set(na) != set(nb):
        diff = sorted(set(na) ^ set(nb))
        raise OptionError(f"{what}: tensor {diff[0]!r} is in only one of them")
    for name in na:
        if a.tensor(name).shape != b.tensor(name).shape:
            raise OptionError(
                f"{what}: tensor {name!r} has shape {b.tensor(name).shape}, "
                f"expected {a.tensor(name).shape}"
            )


def non_expert_names(f):
    """Tensor names in file order, without the expert weights (either layout)."""
    experts = set(f.expert_tensor_names())
    return [n for n in f.tensor_names() if n not in experts]


# -- plan -------------------------------------------------------------------


def layer_major(f):
    """Every (layer, e) of `f`, by layer then expert."""
    return [(L, e) for L in range(f.n_layers) for e in range(f.expert_count(L))]


def plan(src_file, spec, files, order=None):
    """One Choice per expert, in write order."""
    everyone = layer_major(src_file)
    order = everyone if order is None else [tuple(map(int, p)) for p in order]
    if sorted(order) != everyone:
        raise OptionError(
            f"expert order must list each of the {len(everyone)} experts exactly once"
        )
    missing = sorted(spec.labels() - set(files))
    if missing:
        raise OptionError(
            f"SPEC names source {missing[0]} but no file has that label "
            f"(add --from {missing[0]}=FILE; known: {', '.join(sorted(files))})"
        )
    return [_choose(spec, files, L, e) for L, e in order]


def _choose(spec, files, layer, e):
    label = spec.label_for(layer, e)
    if label is None:
        raise OptionError(
            f"SPEC {spec} gives no source for layer {layer} expert {e} (add a default)"
        )
    return Choice(layer, e, label, files[label])


# -- write ------------------------------------------------------------------


def write_per_expert(out, src_file, choices, order_policy=LAYER_MAJOR):
    """Write `out`: SRC's metadata and non-expert tensors, then the experts in
    `choices` order, each as gate, up, down back to back. Atomic (temp + rename)."""
    tensors = [(n, src_file.tensor(n)) for n in non_expert_names(src_file)]
    for c in choices:
        tensors += [
            (layout.expert_name(c.layer, k, c.e), c.source.expert_tensor(c.layer, k, c.e))
            for k in layout.KINDS
        ]
    write_atomic(
        out,
        src_file,
        [TensorOut.copy(name, view) for name, view in tensors],
        _layout_metadata(choices, order_policy),
    )


def _layout_metadata(choices, order_policy):
    order = [x for c in choices for x in (c.layer, c.e)]
    return [
        (layout.KEY_LAYOUT, layout.PER_EXPERT, GGUFValueType.STRING, None),
        (layout.KEY_ORDER, order, GGUFValueType.ARRAY, GGUFValueType.UINT32),
        (layout.KEY_ORDER_POLICY, order_policy, GGUFValueType.STRING, None),
    ]


@dataclass(frozen=True)
class TensorOut:
    """One tensor to write: name, ggml type, raw shape (*shape[:-1], row_bytes) and
    `data()`, which gives those bytes (uint8) when the tensor's turn comes."""

    name: str
    ggml_type: GGMLQuantizationType
    raw_shape: tuple
    data: object

    @property
    def nbytes(self):
        return int(np.prod(self.raw_shape))

    @classmethod
    def copy(cls, name, view):
        """The bytes of a source TensorView, streamed from its memmap."""
        return cls(name, view.ggml_type, tuple(view.raw.shape), lambda: view.raw)


def write_atomic(out, src_file, tensors, extra_metadata, skip_keys=()):
    """Write `out` (via `out.part`, read back, then renamed): SRC's metadata except
    `skip_keys`, then `extra_metadata` [(key, value, value type, sub type)], then the
    TensorOut list in order."""
    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    try:
        _write(tmp, src_file, tensors, extra_metadata, skip_keys)
        read_gguf(tmp)  # what we wrote must read back
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write(path, src_file, tensors, extra_metadata, skip_keys=()):
    w = GGUFWriter(path, src_file.architecture)
    try:
        _copy_metadata(w, src_file, skip_keys)
        for key, value, vtype, sub in extra_metadata:
            if value != []:
                w.add_key_value(key, value, vtype, sub_type=sub)
        for t in tensors:
            w.add_tensor_info(t.name, t.raw_shape, np.uint8, t.nbytes, raw_dtype=t.ggml_type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            w.write_tensor_data(t.data())  # uint8 (*shape[:-1], row_bytes)
    finally:
        w.close()


def _copy_metadata(w, src_file, skip_keys=()):
    """SRC's keys, values and value types, except the ones GGUFWriter or pack owns."""
    for key, value in src_file.metadata.items():
        if key in _OWN_KEYS or key in skip_keys or key == Keys.General.ARCHITECTURE:
            continue
        if key == Keys.General.ALIGNMENT:
            w.add_custom_alignment(value)
            continue
        vtype, sub = src_file.metadata_types[key]
        if vtype == GGUFValueType.ARRAY and not value:
            raise UnsupportedError(
                f"{src_file.path}: metadata {key!r} is an empty array, "
                f"which gguf-py's writer cannot write"
            )
        w.add_key_value(key, value, vtype, sub_type=sub)
