"""The expert plan: which bytes of the model file hold which expert's gate, up
and down matrices, and where they go in a slab slot."""

import numpy as np

from meldlite import kernels
from meldlite.errors import FormatError
from meldlite.experts import io as eio
from meldlite.formats.layout import KINDS

SLOT_ALIGN = 64  # slab slots start on cache-line boundaries


class ExpertPlan:
    """Where each expert's bytes are in the file and where they go in a slab.

    Experts are numbered g = layer * n_expert + e. With `align` > 1 (O_DIRECT)
    every read covers whole align-sized blocks and lands on an aligned slab
    offset; the matrices then start a little way into their slot. A pruned
    expert left out of the file (never routed) has no ranges, 0 bytes and
    `present[g]` False; its types are a stored expert's of the same layer."""

    def __init__(self, gguf, cfg, align=1):
        L, X = cfg.n_layer, cfg.n_expert
        n = L * X
        self.n_layer, self.n_expert, self.align = L, X, align
        self.ranges = []  # per g: [(file offset, nbytes)] of its tensors
        self.reads = []  # per g: [(file offset, nbytes, slab offset, need)]
        self.mats = []  # per g: 3 x (slab offset, rows, row_bytes)
        self.nbytes = np.zeros(n, np.int64)  # (L*X,) bytes of a slab slot
        self.read_bytes = np.zeros(n, np.int64)  # (L*X,) bytes one load reads
        self.span = np.zeros(n, np.int64)  # (L*X,) whole pages the ranges cover
        self.offset = np.zeros(n, np.int64)  # (L*X,) file offset of the first byte
        self.types = np.zeros((L, X, 3), np.int32)  # (L, X, 3) ggml type ids
        self.present = np.array(
            [gguf.expert_present(layer, e) for layer in range(L) for e in range(X)], bool
        )  # (L*X,) stored in the file
        expert_names = set(gguf.expert_tensor_names())
        self.other_ranges = [
            (t.offset, t.nbytes)
            for t in map(gguf.tensor, gguf.tensor_names())
            if t.name not in expert_names
        ]  # [(file offset, nbytes)] of the tensors that are not experts
        want = {
            "gate": (cfg.n_ff_exp, cfg.n_embd),
            "up": (cfg.n_ff_exp, cfg.n_embd),
            "down": (cfg.n_embd, cfg.n_ff_exp),
        }
        for layer in range(L):
            for e in range(X):
                g = layer * X + e
                if not self.present[g]:
                    self.ranges.append([])
                    self.reads.append([])
                    self.mats.append(None)
                    continue
                ranges = gguf.expert_ranges(layer, e)
                reads, pos = [], 0
                for off, nb in ranges:
                    start = off // align * align
                    length = -(-(off + nb) // align) * align - start
                    reads.append((start, length, pos, off + nb - start))
                    pos += length
                mats = []
                for j, kind in enumerate(KINDS):
                    t = gguf.expert_tensor(layer, kind, e)
                    if tuple(t.shape) != want[kind]:
                        raise FormatError(
                            f"layer {layer} expert {e} {kind} has shape {t.shape}, "
                            f"expected {want[kind]}"
                        )
                    start, _, at, _need = next(r for r in reads if r[0] <= t.offset < r[0] + r[3])
                    mats.append((at + t.offset - start, t.raw.shape[0], t.raw.shape[1]))
                    self.types[layer, e, j] = int(t.ggml_type)
                self.ranges.append(ranges)
                self.reads.append(reads)
                self.mats.append(mats)
                self.nbytes[g] = -(-pos // max(align, SLOT_ALIGN)) * max(align, SLOT_ALIGN)
                self.read_bytes[g] = pos
                self.span[g] = sum(eio.page_span(off, nb)[1] for off, nb in ranges)
                self.offset[g] = ranges[0][0]
        for layer in range(L):
            stored = self.present[layer * X : (layer + 1) * X]  # (X,)
            self.types[layer, ~stored] = self.types[layer, np.argmax(stored)]
            kernels.check_types(self.types[layer])

    @property
    def expert_bytes(self):
        """Bytes of all expert tensors in the file."""
        return int(sum(nb for ranges in self.ranges for _, nb in ranges))
