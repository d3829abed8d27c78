"""Which ggml type each tensor gets, and turning float rows into those types.

The rules follow llama.cpp's `llama-quant.cpp` (read there for the exact
semantics): which tensors are quantized at all (`tensor_allows_quantization`:
2-D and 3-D `*weight` tensors except norms and routers) and the fallback when a
row length is not a multiple of a type's block (`tensor_type_fallback`: Q2_K and
Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, then F16).
"""

import re

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from meldlite.errors import OptionError

T = GGMLQuantizationType
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
# The per-expert ladder, cheapest first (each entry's fallback joins it when rows need one).
LADDER = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0)
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}

# Names llama.cpp never quantizes (besides 1-D tensors and names not ending in "weight").
_KEEP = re.compile(
    r"_norm\.weight$|ffn_gate_inp\.weight$|^position_embd\.weight$|"
    r"^token_types\.weight$"
)


def quantizable_types():
    """Types meldlite can write: the kernels' QUANTIZABLE (float types included)."""
    from meldlite.compress.quantizers import QUANTIZABLE

    return tuple(sorted(QUANTIZABLE, key=int))


def parse_type(name):
    """GGMLQuantizationType from a name like "q4_k"; OptionError if meldlite cannot write it."""
    try:
        qtype = T[str(name).upper()]
    except KeyError:
        raise OptionError(f"unknown quantization type {name!r}") from None
    known = quantizable_types()
    if qtype not in known:
        raise OptionError(
            f"meldlite cannot quantize to {qtype.name} "
            f"(it writes {', '.join(t.name for t in known)})"
        )
    return qtype


def is_quantizable(name, shape):
    """Whether llama.cpp would quantize tensor `name` of numpy `shape` at all."""
    return len(shape) >= 2 and name.endswith("weight") and not _KEEP.search(name)


def fit_type(qtype, n_cols):
    """`qtype`, or llama.cpp's fallback when rows of `n_cols` are not whole blocks of it."""
    for t in (qtype, FALLBACK.get(qtype, T.F16), T.F16):
        if n_cols % GGML_QUANT_SIZES[t][0] == 0:
            return t
    return T.F16


def row_bytes(qtype, n_cols):
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    return n_cols // elems * nbytes


def tensor_bytes(qtype, shape):
    """Bytes of a tensor of numpy `shape` stored as `qtype` (rows whole blocks)."""
    return int(np.prod(shape[:-1], dtype=np.int64)) * row_bytes(qtype, shape[-1])


def file_type(qtype):
    """The `general.file_type` (LlamaFileType) of a file mostly of `qtype` (a K-quant
    without its own file type takes its _M mix's, as llama.cpp's pure files do)."""
    names = {
        T.F32: "ALL_F32",
        T.F16: "MOSTLY_F16",
        T.BF16: "MOSTLY_BF16",
        T.Q3_K: "MOSTLY_Q3_K_M",
        T.Q4_K: "MOSTLY_Q4_K_M",
        T.Q5_K: "MOSTLY_Q5_K_M",
    }
    return LlamaFileType[names.get(qtype, f"MOSTLY_{qtype.name}")]


def quantize(x, qtype, importance=None):
    """x (rows, cols) float32 -> (rows, row_bytes) uint8 of `qtype`, by the kernels'
    `quantize_rows` (float types are plain conversions), weighted per column by
    `importance` (cols,) when given."""
    from meldlite.compress.quantizers import quantize_rows

    return quantize_rows(x, qtype, importance)  # (rows, row_bytes)
