"""Resident (non-expert) weights, looked up by their GGUF tensor names.

`Weights["blk.0.attn_q.weight"]` gives a `QMatrix` for a 2-D tensor (kept in
its quantized form, multiplied by the kernels) or a float32 array for a 1-D
tensor (norms, biases). Nothing is renamed, so loading needs no mapping table.

By default the tensors are views of the file's memory map, pages the kernel may
drop under memory pressure and read again on the next token. `keep_resident`
copies them into anonymous memory instead (done when a memory budget is in force:
the budget leaves the rest of memory tight, and these weights are read every token).
"""

import os

import numpy as np
from gguf import GGMLQuantizationType

from meldlite import kernels
from meldlite.errors import FormatError, UnsupportedError
from meldlite.formats.gguf import TensorView, pread_full
from meldlite.formats.pack import non_expert_names
from meldlite.kernels.actquant import NONE, mode_of
from meldlite.kernels.matmul import readonly_matrix
from meldlite.kernels.qdot import linear


class QMatrix:
    """A 2-D weight matrix in its GGUF quantized form, y = x @ W.T."""

    def __init__(self, tensor, llama_numerics=True):
        if len(tensor.shape) != 2:
            raise FormatError(f"tensor {tensor.name!r} should be 2-D, has shape {tensor.shape}")
        self.name = tensor.name
        self.qtype = tensor.qtype
        self.ggml_type = tensor.ggml_type
        self.shape = tensor.shape  # (n_out, n_in)
        self.raw = np.asarray(tensor.raw)  # (n_out, row_bytes) uint8, memmap view
        self.nbytes = tensor.nbytes
        self.llama_numerics = llama_numerics
        try:
            self.mat = readonly_matrix(
                self.raw, kernels.check_type(self.ggml_type)
            )  # for jitted code
        except UnsupportedError:
            self.mat = None  # __matmul__ raises the kernels' error
        self.t = int(self.ggml_type)
        # how the input is rounded first: as llama.cpp does for this type, or not at all
        self.mode = mode_of(self.ggml_type) if llama_numerics else NONE

    def __matmul__(self, x):
        """x: (T, n_in) or (n_in,) float32 -> (T, n_out) or (n_out,).

        With llama_numerics, x is first rounded as llama.cpp rounds the
        activations for this weight type (see kernels.actquant), and quantized
        types multiply by integer dot products (kernels.qdot)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.mat is None:
            return kernels.matmul(self.raw, self.ggml_type, x)
        x2 = x.reshape(-1, self.shape[1])  # (T, n_in)
        if not x2.flags.writeable:
            x2 = x2.copy()
        out = np.empty((x2.shape[0], self.shape[0]), np.float32)  # (T, n_out)
        linear(self.mat, self.t, self.mode, x2, out)
        return out.reshape(*x.shape[:-1], self.shape[0])

    def rows(self, ids):
        """Dequantized rows (embedding lookup): ids (T,) -> (T, n_in) float32."""
        return kernels.dequantize(self.raw[np.asarray(ids)], self.ggml_type)


def f32_view(name, a):
    """A TensorView over a float32 matrix a (rows, cols) held in memory."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    return TensorView(name, GGMLQuantizationType.F32, a.shape, a.view(np.uint8), 0)


class Weights:
    """Lazy, cached access to a GGUF file's non-expert tensors by name."""

    def __init__(self, gguf, llama_numerics=True):
        self.gguf = gguf
        self.llama_numerics = llama_numerics
        self._cache = {}
        self._copies = {}  # name -> TensorView of an anonymous copy (keep_resident)

    @property
    def resident_bytes(self):
        """Bytes of the tensors copied into anonymous memory by `keep_resident`."""
        return sum(t.nbytes for t in self._copies.values())

    def keep_resident(self, skip=()):
        """Copy every non-expert tensor but those named in `skip` out of the memory map
        into anonymous memory (read with pread, so no page of the map is touched, then
        dropped from the page cache). Call before any tensor is looked up: views made
        earlier stay views."""
        fd = os.open(self.gguf.path, os.O_RDONLY)
        try:
            for name in non_expert_names(self.gguf):
                if name in skip:
                    continue
                t = self.gguf.tensor(name)
                buf = np.empty(t.raw.shape, np.uint8)  # (*shape[:-1], row_bytes)
                done = pread_full(fd, buf, t.offset)
                if done < buf.size:
                    raise FormatError(f"file ends inside a tensor at offset {t.offset + done}")
                buf.flags.writeable = False  # as read-only as the map
                self._copies[name] = TensorView(name, t.ggml_type, t.shape, buf, t.offset)
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(fd, t.offset, t.nbytes, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def tensor(self, name):
        """The TensorView of `name`: its resident copy, else the memory map's view."""
        return self._copies.get(name) or self.gguf.tensor(name)

    def __contains__(self, name):
        return self.gguf.has_tensor(name)

    def __getitem__(self, name):
        if name not in self._cache:
            tensor = self.tensor(name)
            if len(tensor.shape) == 1:
                self._cache[name] = np.ascontiguousarray(tensor.dequantize(), dtype=np.float32)
            else:
                self._cache[name] = QMatrix(tensor, self.llama_numerics)
        return self._cache[name]

    def heads(self, name):
        """A 3-D tensor (H, rows, cols) of per-head matrices as one QMatrix of H*rows rows
        (MLA's attn_k_b / attn_v_b); cached like the others."""
        key = name + "#heads"
        if key not in self._cache:
            t = self.tensor(name)
            if len(t.shape) != 3:
                raise FormatError(f"tensor {name!r} should be 3-D, has shape {t.shape}")
            flat = (t.shape[0] * t.shape[1], t.shape[2])
            view = TensorView(name, t.ggml_type, flat, t.raw.reshape(flat[0], -1), t.offset)
            self._cache[key] = QMatrix(view, self.llama_numerics)
        return self._cache[key]

    def split_kv_b(self, name, n_head, nope, dv):
        """The older MLA form: attn_kv_b (H*(nope+Dv), R) split into (attn_k_b, attn_v_b) as
        the converter splits it now: float32 QMatrices of H*R rows of nope values (each
        head's K part transposed) and H*Dv rows of R values."""
        kv = self[name].rows(np.arange(self[name].shape[0]))  # (H*(nope+Dv), R)
        kv = kv.reshape(n_head, nope + dv, -1)  # (H, nope+Dv, R)
        k_b = np.ascontiguousarray(kv[:, :nope].transpose(0, 2, 1))  # (H, R, nope)
        v_b = np.ascontiguousarray(kv[:, nope:])  # (H, Dv, R)
        return tuple(
            QMatrix(f32_view(f"{name}:{part}", a.reshape(-1, a.shape[-1])), self.llama_numerics)
            for part, a in (("k_b", k_b), ("v_b", v_b))
        )

    def get(self, name):
        """The tensor, or None when the file does not have it (optional tensors)."""
        return self[name] if name in self else None

    def vector(self, name, length):
        """A 1-D float32 tensor checked against its expected length."""
        v = self[name]
        if not isinstance(v, np.ndarray) or v.shape != (length,):
            raise FormatError(
                f"tensor {name!r} should have shape ({length},), has {getattr(v, 'shape', None)}"
            )
        return v

    def matrix(self, name, n_out, n_in):
        """A 2-D QMatrix checked against its expected (n_out, n_in)."""
        m = self[name]
        if not isinstance(m, QMatrix) or m.shape != (n_out, n_in):
            raise FormatError(
                f"tensor {name!r} should have shape ({n_out}, {n_in}), "
                f"has {getattr(m, 'shape', None)}"
            )
        return m
