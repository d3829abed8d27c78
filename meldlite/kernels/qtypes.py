"""The ggml types the kernels decode and their block sizes, as integer constants for
jitted code.

All numbers come from gguf-py's tables (`GGMLQuantizationType`, `GGML_QUANT_SIZES`);
jitted code switches on the module-level ints below (Numba freezes them).
"""

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from meldlite.errors import OptionError, UnsupportedError

F32 = int(GGMLQuantizationType.F32)
F16 = int(GGMLQuantizationType.F16)
BF16 = int(GGMLQuantizationType.BF16)
Q4_0 = int(GGMLQuantizationType.Q4_0)
Q4_1 = int(GGMLQuantizationType.Q4_1)
Q5_0 = int(GGMLQuantizationType.Q5_0)
Q5_1 = int(GGMLQuantizationType.Q5_1)
Q8_0 = int(GGMLQuantizationType.Q8_0)
Q2_K = int(GGMLQuantizationType.Q2_K)
Q3_K = int(GGMLQuantizationType.Q3_K)
Q4_K = int(GGMLQuantizationType.Q4_K)
Q5_K = int(GGMLQuantizationType.Q5_K)
Q6_K = int(GGMLQuantizationType.Q6_K)
IQ4_NL = int(GGMLQuantizationType.IQ4_NL)
IQ4_XS = int(GGMLQuantizationType.IQ4_XS)
MXFP4 = int(GGMLQuantizationType.MXFP4)


def _block(qtype: int) -> tuple[int, int]:
    """(values, bytes) of one block of `qtype`, from gguf-py's table."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]


QK = _block(Q8_0)[0]  # values per block of the 32-value types (Q4_0 ... Q8_0, IQ4_NL, MXFP4)
QK_K = _block(Q4_K)[0]  # values per super-block of the K-quants and IQ4_XS
# bytes per block of the types with integer dot products (qdot.py)
Q4_0_BYTES, Q5_0_BYTES, Q8_0_BYTES, Q4_K_BYTES, Q6_K_BYTES, MXFP4_BYTES = (
    _block(t)[1] for t in (Q4_0, Q5_0, Q8_0, Q4_K, Q6_K, MXFP4)
)
Q2_K_BYTES, Q3_K_BYTES, Q5_K_BYTES, IQ4_NL_BYTES, IQ4_XS_BYTES, Q4_1_BYTES, Q5_1_BYTES = (
    _block(t)[1] for t in (Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS, Q4_1, Q5_1)
)

SUPPORTED_TYPES = tuple(
    GGMLQuantizationType[name]
    for name in (
        "F32",
        "F16",
        "BF16",
        "Q4_0",
        "Q4_1",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "IQ4_NL",
        "IQ4_XS",
        "MXFP4",
    )
)
SUPPORTED_IDS = np.array([int(t) for t in SUPPORTED_TYPES], dtype=np.int32)  # (n_supported,)

# (bytes per block) indexed by type id; 0 for types the kernels do not decode.
_MAX_ID = max(int(t) for t in GGMLQuantizationType)
BLOCK_ELEMS = np.zeros(_MAX_ID + 1, dtype=np.int64)  # (n_type_ids,)
BLOCK_BYTES = np.zeros(_MAX_ID + 1, dtype=np.int64)  # (n_type_ids,)
for _t in SUPPORTED_TYPES:
    BLOCK_ELEMS[int(_t)], BLOCK_BYTES[int(_t)] = GGML_QUANT_SIZES[_t]


def check_type(ggml_type) -> GGMLQuantizationType:
    """Return `ggml_type` as a `GGMLQuantizationType`, or raise UnsupportedError."""
    try:
        qtype = GGMLQuantizationType(int(ggml_type))
    except (ValueError, TypeError):
        raise UnsupportedError(f"unknown ggml type {ggml_type!r}") from None
    if qtype not in SUPPORTED_TYPES:
        raise UnsupportedError(
            f"ggml type {qtype.name} is not supported by the kernels "
            f"(supported: {', '.join(t.name for t in SUPPORTED_TYPES)})"
        )
    return qtype


def row_bytes(qtype: GGMLQuantizationType, n_cols: int) -> int:
    """Bytes of one row of `n_cols` values of type `qtype`."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    if n_cols % elems:
        raise OptionError(
            f"{n_cols} columns is not a multiple of the {qtype.name} block size {elems}"
        )
    return n_cols // elems * nbytes


def row_cols(qtype: GGMLQuantizationType, n_bytes: int) -> int:
    """Number of values in a row of `n_bytes` bytes of type `qtype`."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    if n_bytes % nbytes:
        raise OptionError(
            f"a row of {n_bytes} bytes is not a whole number of "
            f"{qtype.name} blocks ({nbytes} bytes each)"
        )
    return n_bytes // nbytes * elems
