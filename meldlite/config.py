"""Model configuration: hyper-parameters from GGUF metadata plus a table of
per-architecture traits.

Architectures are data, not code: everything one supported architecture does
differently from another is a field of `ArchTraits`, and the forward pass
(`meldlite.model`) reads these fields. llama.cpp hard-codes some of these per
architecture (expert-weight renormalisation, RoPE style) rather than reading
them from the file; the table mirrors what its graph builders do.
"""

from dataclasses import dataclass

import numpy as np
from gguf import ExpertGatingFuncType, Keys

from meldlite.errors import FormatError, UnsupportedError
from meldlite.formats.layout import KEY_PRUNED


@dataclass(frozen=True)
class ArchTraits:
    """What differs between supported architectures."""

    rope_neox: bool  # NEOX RoPE rotates (x[i], x[i+d/2]); normal rotates (x[2i], x[2i+1])
    qk_norm: (
        str  # "" none, "head": RMSNorm per head (qwen3), "full": over the whole projection (olmoe)
    )
    norm_topk: bool  # renormalise the chosen experts' weights to sum 1
    # a dense shared expert beside the routed ones: "" none, "sigmoid" always present, its
    # output gated by sigmoid(h . ffn_gate_inp_shexp) (qwen2moe), "plain" ungated and
    # present only when the file gives its width (Granite MoE Shared)
    shared_expert: str
    expert_ff_key: str  # metadata key giving the routed experts' FFN width
    expert_ff_split: bool = False  # without that key, experts are n_ff / n_expert_used wide
    tied_output: bool = True  # `output.weight` may be absent: use `token_embd.weight`
    multipliers: bool = False  # reads Granite's embedding/residual/attention/logit scales
    expert_act: str = "silu"  # the routed experts' gate activation: "silu" or "relu"
    # what the router reads: "ffn_norm" the FFN-normed hidden state after attention,
    # "layer" the layer's input before attention, not normed (smallthinker): the
    # routing is then known one attention earlier (`ExpertStore.announce`)
    router_input: str = "ffn_norm"
    gating_key: bool = False  # the file's expert_gating_func says the router's gating
    swa_key: bool = False  # a sliding_window key > 0 in the file turns on SWA (refused)


ARCHITECTURES = {
    "qwen3moe": ArchTraits(
        rope_neox=True,
        qk_norm="head",
        norm_topk=True,
        shared_expert="",
        expert_ff_key=Keys.LLM.EXPERT_FEED_FORWARD_LENGTH,
        expert_ff_split=True,
    ),
    "qwen2moe": ArchTraits(
        rope_neox=True,
        qk_norm="",
        norm_topk=False,
        shared_expert="sigmoid",
        expert_ff_key=Keys.LLM.EXPERT_FEED_FORWARD_LENGTH,
    ),
    "olmoe": ArchTraits(
        rope_neox=True,
        qk_norm="full",
        norm_topk=False,
        shared_expert="",
        expert_ff_key=Keys.LLM.FEED_FORWARD_LENGTH,
        tied_output=False,
    ),
    "llama": ArchTraits(
        rope_neox=False,
        qk_norm="",
        norm_topk=True,
        shared_expert="",
        expert_ff_key=Keys.LLM.FEED_FORWARD_LENGTH,
    ),
    "qwen2": ArchTraits(
        rope_neox=True,
        qk_norm="",
        norm_topk=False,
        shared_expert="",
        expert_ff_key=Keys.LLM.FEED_FORWARD_LENGTH,
    ),
    "qwen3": ArchTraits(
        rope_neox=True,
        qk_norm="head",
        norm_topk=False,
        shared_expert="",
        expert_ff_key=Keys.LLM.FEED_FORWARD_LENGTH,
    ),
    "granitemoe": ArchTraits(
        rope_neox=False,
        qk_norm="",
        norm_topk=True,
        shared_expert="plain",
        expert_ff_key=Keys.LLM.FEED_FORWARD_LENGTH,
        multipliers=True,
    ),
    "smallthinker": ArchTraits(
        rope_neox=True,
        qk_norm="",
        norm_topk=True,
        shared_expert="",
        expert_ff_key=Keys.LLM.EXPERT_FEED_FORWARD_LENGTH,
        expert_act="relu",
        router_input="layer",
        gating_key=True,
        swa_key=True,
    ),
}


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one model, all read from GGUF metadata."""

    arch: str
    traits: ArchTraits
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    n_rot: int
    rope_base: float
    rms_eps: float
    n_ff: int  # dense FFN width (also the shared expert's default)
    n_expert: int  # 0 for a dense model
    n_expert_used: int
    n_ff_exp: int  # routed expert FFN width
    n_ff_shexp: int  # shared expert FFN width (0 without one)
    attention_scale: float  # multiplies Q.K before the softmax: 1/sqrt(head_dim_k) unless given
    embedding_scale: float = 1.0  # multiplies the token embeddings
    residual_scale: float = 1.0  # multiplies each block's attention and FFN output
    logit_scale: float = 1.0  # the logits are multiplied by 1/logit_scale
    expert_pruned: tuple = ()  # (L*X,) 1 = expert never routed (meldlite.expert_pruned); () none

    @property
    def is_moe(self):
        return self.n_expert > 0

    @classmethod
    def from_metadata(cls, md, n_vocab=None):
        """Build the config from a GGUF metadata dict; raise on missing or bad keys."""
        arch = md.get(Keys.General.ARCHITECTURE)
        if arch not in ARCHITECTURES:
            raise UnsupportedError(
                f"unsupported architecture {arch!r}; supported: " + ", ".join(sorted(ARCHITECTURES))
            )
        traits = ARCHITECTURES[arch]

        def get(key, default=None, kind=int):
            name = key.format(arch=arch)
            value = md.get(name, default)
            if value is None:
                raise FormatError(f"missing metadata key {name!r} required for {arch}")
            if isinstance(value, list):  # per-layer arrays: meldlite needs one value
                if not value or any(v != value[0] for v in value):
                    raise UnsupportedError(f"per-layer values for {name!r} are not supported")
                value = value[0]
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise FormatError(f"metadata key {name!r} has bad value {value!r}") from None

        n_embd = get(Keys.LLM.EMBEDDING_LENGTH)
        n_head = get(Keys.Attention.HEAD_COUNT)
        n_head_kv = get(Keys.Attention.HEAD_COUNT_KV, n_head)
        head_dim_k = get(Keys.Attention.KEY_LENGTH, n_embd // max(n_head, 1))
        n_expert = get(Keys.LLM.EXPERT_COUNT, 0)
        n_ff = get(Keys.LLM.FEED_FORWARD_LENGTH, 0)
        n_expert_used = get(Keys.LLM.EXPERT_USED_COUNT, 0)
        n_ff_exp = 0
        if n_expert:
            fallback = n_ff // max(n_expert_used, 1) if traits.expert_ff_split else n_ff
            n_ff_exp = get(traits.expert_ff_key, fallback or None)
        scales = _multipliers(get, head_dim_k, traits.multipliers)
        _check_gating(get, traits.gating_key)
        _check_no_swa(get, traits.swa_key)
        cfg = cls(
            arch=arch,
            traits=traits,
            n_vocab=n_vocab if n_vocab is not None else get(Keys.LLM.VOCAB_SIZE, 0),
            n_ctx_train=get(Keys.LLM.CONTEXT_LENGTH, 2048),
            n_embd=n_embd,
            n_layer=get(Keys.LLM.BLOCK_COUNT),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim_k=head_dim_k,
            head_dim_v=get(Keys.Attention.VALUE_LENGTH, head_dim_k),
            n_rot=get(Keys.Rope.DIMENSION_COUNT, head_dim_k),
            rope_base=get(Keys.Rope.FREQ_BASE, 10000.0, float),
            rms_eps=get(Keys.Attention.LAYERNORM_RMS_EPS, kind=float),
            n_ff=n_ff,
            n_expert=n_expert,
            n_expert_used=n_expert_used,
            n_ff_exp=n_ff_exp,
            n_ff_shexp=(
                get(
                    Keys.LLM.EXPERT_SHARED_FEED_FORWARD_LENGTH,
                    n_ff if traits.shared_expert == "sigmoid" else 0,
                )
                if traits.shared_expert
                else 0
            ),
            **scales,
            expert_pruned=_pruned_flags(md.get(KEY_PRUNED)),
        )
        cfg.check()
        return cfg

    def pruned(self, layer):
        """Ids of the pruned experts of `layer` (never routed)."""
        if not self.expert_pruned:
            return []
        row = self.expert_pruned[layer * self.n_expert : (layer + 1) * self.n_expert]
        return [e for e, flag in enumerate(row) if flag]

    def router_bias(self, layer):
        """(X,) float32 added to `layer`'s router logits: -inf for pruned experts, else 0;
        empty when nothing is pruned (the router runs unchanged)."""
        if not self.expert_pruned:
            return np.zeros(0, np.float32)
        bias = np.zeros(self.n_expert, np.float32)  # (X,)
        bias[self.pruned(layer)] = -np.inf
        return bias

    def check(self):
        """Reject hyper-parameters that cannot describe a working model."""
        positive = ("n_embd", "n_layer", "n_head", "n_head_kv", "head_dim_k", "head_dim_v", "n_rot")
        for name in positive:
            if getattr(self, name) <= 0:
                raise FormatError(
                    f"{self.arch}: {name} must be positive, got {getattr(self, name)}"
                )
        if self.n_head % self.n_head_kv:
            raise FormatError(
                f"{self.arch}: head_count {self.n_head} is not a multiple of "
                f"head_count_kv {self.n_head_kv}"
            )
        if self.n_rot > self.head_dim_k or self.n_rot % 2:
            raise FormatError(
                f"{self.arch}: rope dimension_count {self.n_rot} must be even "
                f"and at most the head size {self.head_dim_k}"
            )
        if self.n_expert and not 0 < self.n_expert_used <= self.n_expert:
            raise FormatError(
                f"{self.arch}: expert_used_count {self.n_expert_used} must be in "
                f"1..expert_count ({self.n_expert})"
            )
        if self.n_expert and self.n_ff_exp <= 0:
            raise FormatError(f"{self.arch}: expert FFN width must be positive")
        if not self.n_expert and self.n_ff <= 0:
            raise FormatError(f"{self.arch}: feed_forward_length must be positive")
        if self.expert_pruned:
            self._check_pruned()

    def _check_pruned(self):
        if len(self.expert_pruned) != self.n_layer * self.n_expert:
            raise FormatError(
                f"{KEY_PRUNED} has {len(self.expert_pruned)} values, expected "
                f"n_layer * expert_count = {self.n_layer * self.n_expert}"
            )
        for layer in range(self.n_layer):
            kept = self.n_expert - len(self.pruned(layer))
            if kept < self.n_expert_used:
                raise FormatError(
                    f"{KEY_PRUNED}: layer {layer} keeps {kept} experts, fewer than "
                    f"the {self.n_expert_used} used per token"
                )


def _multipliers(get, head_dim_k, present):
    """The attention, embedding, residual and logit scales. Granite's files carry them;
    as in llama.cpp, an absent or 0 value means none (and 1/sqrt(head_dim_k) for the
    attention scale)."""
    given = {}
    if present:
        keys = {
            "attention_scale": Keys.Attention.SCALE,
            "embedding_scale": Keys.LLM.EMBEDDING_SCALE,
            "residual_scale": Keys.LLM.RESIDUAL_SCALE,
            "logit_scale": Keys.LLM.LOGIT_SCALE,
        }
        given = {name: get(key, 0.0, float) for name, key in keys.items()}
        given = {name: value for name, value in given.items() if value}
    return {"attention_scale": float(1.0 / np.sqrt(head_dim_k)), **given}


def _check_gating(get, from_file):
    """The file's expert_gating_func, where the architecture reads it: softmax only
    (sigmoid gating is not supported yet)."""
    if not from_file:
        return
    kind = get(Keys.LLM.EXPERT_GATING_FUNC, int(ExpertGatingFuncType.SOFTMAX))
    if kind != ExpertGatingFuncType.SOFTMAX:
        names = {int(t): t.name.lower() for t in ExpertGatingFuncType}
        raise UnsupportedError(
            f"expert gating {names.get(kind, kind)!r} is not supported (softmax only)"
        )


def _check_no_swa(get, from_file):
    """Sliding-window attention is not supported yet: refuse files that turn it on."""
    if from_file and get(Keys.Attention.SLIDING_WINDOW, 0):
        raise UnsupportedError("sliding-window attention is not supported")


def _pruned_flags(value):
    """KEY_PRUNED's metadata value as a tuple of 0/1, () when absent or all zero."""
    if value is None:
        return ()
    if not isinstance(value, list) or any(v not in (0, 1) for v in value):
        raise FormatError(f"{KEY_PRUNED} must be an array of 0/1 flags")
    return tuple(int(v) for v in value) if any(value) else ()
