"""The expert budget from a total memory limit (`mem_limit`, docs/experts.md "Sizing
the budget from a memory limit").

    budget = limit - resident - kv - margin

resident: the process's RSS when the store is about to be built, after the model is
opened: the runtime (interpreter, NumPy, Numba, the tokenizer, the file's metadata)
and the non-expert weights, copied into memory by then (`Weights.keep_resident`);
kv: the KV cache's bytes for all its positions and sequences (allocated, filled as
tokens come); margin: what the first forward passes add and the RSS above does not
hold yet: the kernels loaded from Numba's cache, activations of an n_batch-token
prompt chunk, the store's bookkeeping, and the embedding rows a prompt reads
(measured, see `margin_bytes`).
"""

from dataclasses import dataclass

from meldlite.errors import OptionError
from meldlite.units import format_bytes

# measured (docs/experts.md): 14-31 MiB above the RSS at sizing besides activations
# (kernels loaded at the first forward passes, heap growth over a chunked prompt), and
# 6-8 float32 values per prompt token per unit of width in a chunk
MARGIN_FIXED = 40 * 2**20  # bytes
MARGIN_PER_TOKEN_VALUES = 10  # float32 values per token of a chunk and per unit of width


@dataclass(frozen=True)
class LimitSizing:
    """How `mem_limit` was split (bytes); `budget` is what the experts get."""

    limit: int
    resident: int  # RSS before the store: runtime + weights
    weights: int  # of which the non-expert weights copied into memory
    kv: int
    margin: int

    @property
    def budget(self):
        return self.limit - self.resident - self.kv - self.margin

    def needed(self, minimum):
        """The smallest limit under which the expert cache gets `minimum` bytes."""
        return self.limit - self.budget + minimum

    def too_small(self, minimum):
        """OptionError: the limit leaves the experts less than `minimum` bytes."""
        need = self.needed(minimum)
        return OptionError(
            f"mem_limit {format_bytes(self.limit)} is too small: this model needs at least "
            f"{format_bytes(need)} ({need} bytes: runtime "
            f"{format_bytes(self.resident - self.weights)} + non-expert weights "
            f"{format_bytes(self.weights)} + KV cache {format_bytes(self.kv)} + margin "
            f"{format_bytes(self.margin)} + the smallest expert cache {format_bytes(minimum)}; "
            f"a smaller n_batch lowers the margin)"
        )

    def stats(self):
        """The split as `Model.stats()` reports it."""
        return {
            "mem_limit_bytes": self.limit,
            "limit_runtime_bytes": self.resident - self.weights,
            "limit_weights_bytes": self.weights,
            "limit_kv_bytes": self.kv,
            "limit_margin_bytes": self.margin,
        }


def margin_bytes(cfg, n_batch):
    """What the first forward passes add to the RSS measured before the store (see the
    module docstring): a fixed part and the activations of an n_batch-token chunk,
    proportional to its tokens and the model's width (n_embd + the used experts' and
    the shared expert's inner widths)."""
    width = cfg.n_embd + cfg.n_expert_used * cfg.n_ff_exp + cfg.n_ff_shexp
    return MARGIN_FIXED + 4 * MARGIN_PER_TOKEN_VALUES * n_batch * width
