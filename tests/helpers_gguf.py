"""Reusable GGUF helpers for tests: write small files with gguf-py, quantize them with
llama.cpp's own quantizer (through llama-cpp-python), read tensors back with gguf-py.
"""

import ctypes
import os

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

# llama.cpp ftype name -> the ggml type every 2-D weight gets with `pure=True`
LLAMACPP_FTYPES = {
    "F16": GGMLQuantizationType.F16,
    "BF16": GGMLQuantizationType.BF16,
    "Q4_0": GGMLQuantizationType.Q4_0,
    "Q4_1": GGMLQuantizationType.Q4_1,
    "Q5_0": GGMLQuantizationType.Q5_0,
    "Q5_1": GGMLQuantizationType.Q5_1,
    "Q8_0": GGMLQuantizationType.Q8_0,
    "Q2_K": GGMLQuantizationType.Q2_K,
    "Q3_K_S": GGMLQuantizationType.Q3_K,
    "Q3_K_M": GGMLQuantizationType.Q3_K,
    "Q4_K_S": GGMLQuantizationType.Q4_K,
    "Q5_K_S": GGMLQuantizationType.Q5_K,
    "Q6_K": GGMLQuantizationType.Q6_K,
    "IQ4_NL": GGMLQuantizationType.IQ4_NL,
    "IQ4_XS": GGMLQuantizationType.IQ4_XS,
    "MXFP4_MOE": GGMLQuantizationType.MXFP4,
}


def write_weights_gguf(path, tensors, n_embd=None):
    """Write 2-D float `tensors` {name: (rows, cols) array} as a minimal "llama" GGUF that
    llama_model_quantize accepts (hparams only; no vocab, no attention tensors).
    Use weight-like names such as "blk.0.ffn_up.weight"."""
    n_embd = n_embd or max(a.shape[-1] for a in tensors.values())
    w = GGUFWriter(os.fspath(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(n_embd)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize_with_llamacpp(src, dst, ftype_name, pure=True, nthread=2):
    """Quantize `src` into `dst` with llama.cpp (ftype_name e.g. "Q4_K_S", "MXFP4_MOE")."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
    params.nthread = nthread
    params.pure = pure
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(dst), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({ftype_name}) failed with {rc}")
    return dst


def read_tensors(path):
    """{name: gguf-py ReaderTensor} of a GGUF file."""
    return {t.name: t for t in GGUFReader(os.fspath(path)).tensors}


def weight_like(rng, rows, cols, outliers=True):
    """Random float32 (rows, cols) with per-row scales and a few outliers, like real weights."""
    a = rng.standard_normal((rows, cols)).astype(np.float32)
    a *= np.exp(rng.normal(0.0, 0.5, size=(rows, 1))).astype(np.float32) * np.float32(cols**-0.5)
    if outliers:
        idx = rng.integers(0, a.size, size=max(1, a.size // 500))
        a.flat[idx] *= np.float32(8.0)
    return a
