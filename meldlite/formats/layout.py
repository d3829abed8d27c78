"""Expert tensor layouts: where expert e of layer L lives in a GGUF file.

Two layouts, one interface (`ExpertIndex`):

- "stacked" (llama.cpp's): one 3-D tensor per layer and matrix kind,
  `blk.{L}.ffn_{kind}_exps.weight`, numpy shape (n_expert, rows, cols); expert e
  is the contiguous slice [e].
- "per_expert" (meldlite's extension, written by `meldlite pack`): three 2-D
  tensors per expert, `blk.{L}.ffn_{kind}_exps.{e}.weight`, written gate, up,
  down back to back so that one expert is one contiguous byte range, each with
  its own ggml type. Metadata `meldlite.expert_layout = "per_expert"`.
"""

import re

from gguf import MODEL_TENSOR, TENSOR_NAMES

from meldlite.errors import FormatError, OptionError

KINDS = ("gate", "up", "down")
_KIND_TENSORS = {
    "gate": MODEL_TENSOR.FFN_GATE_EXP,
    "up": MODEL_TENSOR.FFN_UP_EXP,
    "down": MODEL_TENSOR.FFN_DOWN_EXP,
}

KEY_LAYOUT = "meldlite.expert_layout"  # "per_expert"; absent means "stacked"
KEY_ORDER = "meldlite.expert_order"  # u32 array: layer, expert, layer, expert, ...
KEY_ORDER_POLICY = "meldlite.expert_order_policy"  # name of the order, e.g. "layer-major"
# Written by `meldlite quantize` (compression), read by the runtime. Each is a flat
# array of n_layer * n_expert values, layer-major (index L * n_expert + e).
KEY_POPULARITY = "meldlite.expert_popularity"  # f32: fraction of routed tokens that chose (L, e)
KEY_SENSITIVITY = "meldlite.expert_sensitivity"  # f32: relative output error of (L, e) at its type
KEY_PRUNED = "meldlite.expert_pruned"  # u8: 1 = pruned, never routed (router logit masked)
STACKED, PER_EXPERT = "stacked", "per_expert"

_PER_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)_exps\.(\d+)\.weight$")


def stacked_name(layer, kind):
    """Name of the stacked 3-D expert tensor, e.g. blk.3.ffn_up_exps.weight."""
    return TENSOR_NAMES[_KIND_TENSORS[kind]].format(bid=layer) + ".weight"


def stacked_bias_name(layer, kind):
    """Name of a layer's stacked expert biases (n_expert, n), e.g. blk.3.ffn_up_exps.bias
    (gpt-oss); they stay stacked in both layouts."""
    return TENSOR_NAMES[_KIND_TENSORS[kind]].format(bid=layer) + ".bias"


def expert_name(layer, kind, e):
    """Name of one expert's 2-D tensor in the per-expert layout, e.g. blk.3.ffn_up_exps.7.weight."""
    return TENSOR_NAMES[_KIND_TENSORS[kind]].format(bid=layer) + f".{e}.weight"


def parse_expert_name(name):
    """(layer, kind, e) if `name` is a per-expert tensor name, else None."""
    m = _PER_EXPERT_RE.match(name)
    return (int(m.group(1)), m.group(2), int(m.group(3))) if m else None


def check_kind(kind):
    if kind not in KINDS:
        raise OptionError(f"expert matrix kind {kind!r} is not one of {', '.join(KINDS)}")


def merge_ranges(ranges, alignment):
    """Merge (offset, nbytes) ranges, sorted by offset, that touch or are separated
    only by alignment padding."""
    merged = []
    for off, n in sorted(ranges):
        if merged and off - (merged[-1][0] + merged[-1][1]) < alignment:
            start = merged[-1][0]
            merged[-1] = (start, max(merged[-1][1], off + n - start))
        else:
            merged.append((off, n))
    return merged


class ExpertIndex:
    """Interface both layouts implement; `GGUFFile` delegates to one of them."""

    layout = None

    def count(self, layer):
        """Number of experts in `layer` (0 for a dense layer)."""
        raise NotImplementedError

    def tensor(self, layer, kind, e):
        """2-D TensorView (rows, cols) of expert e's `kind` matrix."""
        raise NotImplementedError

    def ranges(self, layer, e):
        """Absolute (offset, nbytes) file ranges holding expert e's three matrices."""
        return [(v.offset, v.nbytes) for v in (self.tensor(layer, k, e) for k in KINDS)]

    def expert_tensor_names(self):
        """Names of the file's tensors that hold expert weights."""
        raise NotImplementedError

    def stored(self, layer, e):
        """False for a pruned expert whose tensors were left out of the file."""
        return True


class StackedExperts(ExpertIndex):
    """llama.cpp's layout: blk.L.ffn_{kind}_exps.weight of shape (n_expert, rows, cols)."""

    layout = STACKED

    def __init__(self, gguf_file, n_layers):
        self._stacks = {}  # layer -> {kind: TensorView (n_expert, rows, cols)}
        for layer in range(n_layers):
            found = {
                k: gguf_file.tensor(stacked_name(layer, k))
                for k in KINDS
                if gguf_file.has_tensor(stacked_name(layer, k))
            }
            if found:
                self._stacks[layer] = _check_stack(layer, found)

    def count(self, layer):
        stack = self._stacks.get(layer)
        return stack["gate"].shape[0] if stack else 0

    def tensor(self, layer, kind, e):
        check_kind(kind)
        _check_expert(layer, e, self.count(layer))
        return self._stacks[layer][kind].expert_slice(e, expert_name(layer, kind, e))

    def expert_tensor_names(self):
        return [v.name for stack in self._stacks.values() for v in stack.values()]


def _check_stack(layer, found):
    missing = [stacked_name(layer, k) for k in KINDS if k not in found]
    if missing:
        raise FormatError(f"layer {layer} has stacked experts but lacks {', '.join(missing)}")
    for view in found.values():
        if len(view.shape) != 3:
            raise FormatError(
                f"tensor {view.name!r}: stacked experts need 3 dims, shape is {view.shape}"
            )
    counts = {k: v.shape[0] for k, v in found.items()}
    if len(set(counts.values())) != 1:
        raise FormatError(f"layer {layer}: expert tensors disagree on the expert count {counts}")
    return found


class PerExpertExperts(ExpertIndex):
    """meldlite's layout: blk.L.ffn_{kind}_exps.{e}.weight, one 2-D tensor per matrix."""

    layout = PER_EXPERT

    def __init__(self, gguf_file, n_layers, alignment):
        self._alignment = alignment
        self._experts = {}  # layer -> list over e of {kind: TensorView (rows, cols)}, None if pruned
        pruned = _pruned_by_layer(gguf_file.metadata.get(KEY_PRUNED), n_layers)
        found = {}
        for name in gguf_file.tensor_names():
            parsed = parse_expert_name(name)
            if parsed:
                layer, kind, e = parsed
                found.setdefault(layer, {}).setdefault(e, {})[kind] = gguf_file.tensor(name)
        for layer, experts in found.items():
            if layer >= n_layers:
                raise FormatError(
                    f"expert tensors for layer {layer}, but the model has {n_layers} layers"
                )
            self._experts[layer] = _check_experts(layer, experts, pruned.get(layer, ()))

    def count(self, layer):
        return len(self._experts.get(layer, ()))

    def tensor(self, layer, kind, e):
        check_kind(kind)
        _check_expert(layer, e, self.count(layer))
        if self._experts[layer][e] is None:
            raise OptionError(
                f"expert {e} of layer {layer} is pruned: its tensors are not in the file"
            )
        return self._experts[layer][e][kind]

    def ranges(self, layer, e):
        return merge_ranges(super().ranges(layer, e), self._alignment)

    def expert_tensor_names(self):
        return [
            v.name
            for experts in self._experts.values()
            for ex in experts
            if ex
            for v in ex.values()
        ]

    def stored(self, layer, e):
        _check_expert(layer, e, self.count(layer))
        return self._experts[layer][e] is not None

    def present(self):
        """Set of (layer, e) pairs stored in the file."""
        return {
            (L, e) for L, experts in self._experts.items() for e, ex in enumerate(experts) if ex
        }


def _pruned_by_layer(flags, n_layers):
    """{layer: set of pruned expert ids} from KEY_PRUNED's flat layer-major flags."""
    if flags is None or not isinstance(flags, list) or not n_layers or len(flags) % n_layers:
        return {}  # absent, or malformed: ModelConfig reports the latter
    n_expert = len(flags) // n_layers
    return {
        L: {e for e in range(n_expert) if flags[L * n_expert + e] == 1} for L in range(n_layers)
    }


def _check_experts(layer, experts, pruned=()):
    """Per-expert tensors of one layer -> list over e of {kind: view}, None for a pruned
    expert whose tensors are absent (only pruned experts may be missing)."""
    n = max([*experts, *pruned]) + 1
    missing = [e for e in range(n) if e not in experts and e not in pruned]
    if missing:
        raise FormatError(
            f"layer {layer}: per-expert tensors number experts {sorted(experts)}, "
            f"expected 0..{n - 1}"
        )
    for e, kinds in experts.items():
        missing = [expert_name(layer, k, e) for k in KINDS if k not in kinds]
        if missing:
            raise FormatError(f"layer {layer} expert {e} lacks {', '.join(missing)}")
        for view in kinds.values():
            if len(view.shape) != 2:
                raise FormatError(
                    f"tensor {view.name!r}: an expert matrix needs 2 dims, shape is {view.shape}"
                )
    return [experts.get(e) for e in range(n)]


def _check_expert(layer, e, count):
    if not 0 <= e < count:
        raise OptionError(f"expert {e} out of range for layer {layer} ({count} experts)")
