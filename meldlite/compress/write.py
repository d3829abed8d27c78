"""Writing quantized GGUF files: llama.cpp's stacked layout (uniform files) or
meldlite's per-expert layout (mixed files), through `formats.pack`'s writer.

Each tensor's bytes are computed when the writer reaches it (dequantize the
source rows to float32, quantize), so only one tensor is in memory at a time.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFValueType, Keys
from gguf import GGMLQuantizationType as T

from meldlite.compress import ladder
from meldlite.errors import OptionError
from meldlite.formats import layout
from meldlite.formats.pack import TensorOut, non_expert_names, write_atomic

# Keys of the source that a quantized file must not inherit (they would be wrong).
OWN_KEYS = (
    Keys.General.FILE_TYPE,
    Keys.General.QUANTIZATION_VERSION,
    layout.KEY_LAYOUT,
    layout.KEY_ORDER,
    layout.KEY_ORDER_POLICY,
    layout.KEY_POPULARITY,
    layout.KEY_SENSITIVITY,
)


@dataclass(frozen=True)
class Written:
    path: Path
    nbytes: int  # size of the file
    tensor_types: dict  # type name -> number of tensors


def check_float_source(f):
    """OptionError unless every weight of `f` is F32, F16 or BF16, or, for the routed
    experts, MXFP4: gpt-oss is published with MXFP4 experts, which decode exactly."""
    experts = set(f.expert_tensor_names())
    for name in f.tensor_names():
        t = f.tensor(name)
        ok = ladder.FLOAT_TYPES + ((T.MXFP4,) if name in experts else ())
        if t.ggml_type not in ok:
            raise OptionError(
                f"{f.path}: quantize needs an F32/F16/BF16 model (MXFP4 experts allowed), "
                f"tensor {name!r} is {t.qtype}"
            )


def quantized(view, qtype, importance=None, name=None):
    """TensorOut of `view` (2-D or stacked 3-D, float) converted to `qtype` when written.

    importance: (cols,) or, for a stacked tensor, (n_expert, cols) column weights.
    """
    shape = tuple(view.shape)
    raw_shape = (*shape[:-1], ladder.row_bytes(qtype, shape[-1]))
    if qtype == view.ggml_type:
        return TensorOut.copy(name or view.name, view)

    def data():
        w = view.dequantize()  # (..., rows, cols)
        if w.ndim == 2:
            return ladder.quantize(w, qtype, importance)  # (rows, row_bytes)
        out = np.empty(raw_shape, np.uint8)  # (X, rows, row_bytes)
        for e in range(shape[0]):
            imp = None if importance is None else importance[e]
            out[e] = ladder.quantize(w[e], qtype, imp)
        return out

    return TensorOut(name or view.name, qtype, raw_shape, data)


def uniform_plan(f, qtype):
    """{tensor name: type} of a uniform `qtype` file, as llama.cpp's pure quantization
    chooses: every quantizable weight at `qtype` or its fallback, the rest unchanged."""
    types, allowed = {}, ladder.quantizable_types()
    for name in f.tensor_names():
        view = f.tensor(name)
        if not ladder.is_quantizable(name, view.shape):
            types[name] = view.ggml_type
            continue
        types[name] = t = ladder.fit_type(qtype, view.shape[-1])
        if t not in allowed:
            raise OptionError(
                f"tensor {name!r} has rows of {view.shape[-1]} values, so "
                f"{qtype.name} falls back to {t.name} (as in llama.cpp), "
                f"which meldlite cannot quantize"
            )
    return types


def write_stacked(f, out, types, file_type, progress=None):
    """Write `out` with `f`'s tensors in `f`'s order (stacked experts), each at types[name]."""
    tensors = [quantized(f.tensor(n), types[n]) for n in f.tensor_names()]
    return _write(f, out, tensors, _type_metadata(file_type), progress)


def write_per_expert(
    f, out, types, expert_types, file_type, extra_metadata=(), importance=None, progress=None
):
    """Write `out` in the per-expert layout (layer-major expert order).

    types:        {non-expert tensor name: type}
    expert_types: {(layer, e): (gate, up, down) types}
    importance:   {(layer, e): {kind: (cols,) float32}} column weights (optional)
    """
    tensors = [quantized(f.tensor(n), types[n]) for n in non_expert_names(f)]
    order = sorted(expert_types)
    for L, e in order:
        imp = (importance or {}).get((L, e), {})
        for kind, qtype in zip(layout.KINDS, expert_types[(L, e)]):
            tensors.append(
                quantized(
                    f.expert_tensor(L, kind, e),
                    qtype,
                    imp.get(kind),
                    name=layout.expert_name(L, kind, e),
                )
            )
    meta = (
        _type_metadata(file_type)
        + [
            (layout.KEY_LAYOUT, layout.PER_EXPERT, GGUFValueType.STRING, None),
            (
                layout.KEY_ORDER,
                [x for p in order for x in p],
                GGUFValueType.ARRAY,
                GGUFValueType.UINT32,
            ),
            (layout.KEY_ORDER_POLICY, "layer-major", GGUFValueType.STRING, None),
        ]
        + list(extra_metadata)
    )
    return _write(f, out, tensors, meta, progress)


def f32_array_metadata(key, values):
    """A metadata entry holding a flat float32 array."""
    return (
        key,
        [float(v) for v in np.asarray(values, np.float32).ravel()],
        GGUFValueType.ARRAY,
        GGUFValueType.FLOAT32,
    )


def _type_metadata(file_type):
    return [
        (Keys.General.FILE_TYPE, int(file_type), GGUFValueType.UINT32, None),
        (Keys.General.QUANTIZATION_VERSION, GGML_QUANT_VERSION, GGUFValueType.UINT32, None),
    ]


def _write(f, out, tensors, metadata, progress):
    total = len(tensors)
    if progress:
        tensors = [_counted(t, i + 1, total, progress) for i, t in enumerate(tensors)]
    write_atomic(out, f, tensors, metadata, skip_keys=OWN_KEYS)
    counts = {}
    for t in tensors:
        counts[t.ggml_type.name] = counts.get(t.ggml_type.name, 0) + 1
    out = Path(out)
    return Written(out, out.stat().st_size, counts)


def _counted(t, i, total, progress):
    def data():
        raw = t.data()
        progress(i, total)
        return raw

    return TensorOut(t.name, t.ggml_type, t.raw_shape, data)
