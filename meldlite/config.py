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
from meldlite.kernels.route import GATINGS


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
    # router gating (kernels.route): "softmax", "sigmoid" (selection bias exp_probs_b),
    # "softmax_weight" (softmax over the chosen k logits)
    gating: str = "softmax"
    # reads expert_weights_norm, expert_weights_scale and expert_gating_func from the
    # file (absent: no renormalisation, no scale, the row's gating), as deepseek2 does
    expert_keys: bool = False
    # Sliding-window attention (SWA), on when the file gives attention.sliding_window > 0.
    # swa_pattern: llama.cpp's hard-coded n_pattern where the file has no
    # attention.sliding_window_pattern (every n-th layer is global; 0 all SWA; -1 the
    # architecture has no SWA); swa_dense_first: the global layer opens each group of n
    # (else it closes it)
    swa_pattern: int = -1
    swa_dense_first: bool = False
    swa_window: int = 0  # a window llama.cpp forces over the file's (0: the file's)
    # SWA layers' RoPE: "own" = rope.freq_base_swa (default 10000) and no scaling (gemma3);
    # "global" = the global base unless rope.freq_base_swa is given, and its scaling
    swa_rope: str = "global"
    nope_step: int = 0  # with SWA on, layers il % nope_step == 0 have no RoPE (0: none)
    ffn_act: str = "silu"  # dense FFN activation: "silu" or "gelu" (ggml's table GELU)
    post_norms: bool = False  # RMSNorms after attention and after the FFN (gemma3)
    embd_scale_sqrt: bool = False  # token embeddings times sqrt(n_embd)
    # Q scaled before attention (1/sqrt(head_dim), or 1/sqrt(n_embd/n_head) for the layer
    # counts listed, as llama.cpp derives Gemma 3's query_pre_attn_scalar) instead of Q.K
    q_prescale: bool = False
    q_scale_embd_layers: tuple = ()
    logit_softcap: bool = False  # reads final_logit_softcapping: c * tanh(logits / c)


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
    norm_topk: bool = False  # renormalise the chosen experts' weights to sum 1
    gating: str = "softmax"  # router gating (kernels.route.GATINGS)
    expert_weights_scale: float = 0.0  # multiplies the routed weights (0 or 1: none)
    n_expert_groups: int = 0  # group-limited top-k: experts in this many groups (<= 1: none)
    n_group_used: int = 0  # ... of which this many groups are kept per token
    n_layer_dense_lead: int = 0  # the first layers have a dense FFN instead of experts
    rope_scale: float = 1.0  # RoPE frequency scale of the global layers: 1/rope.scaling.factor
    n_swa: int = 0  # sliding window: a token sees the n_swa positions up to itself; 0 none
    swa_layers: tuple = ()  # (L,) 1 = the layer uses the sliding window; () none
    rope_base_swa: float = 10000.0  # RoPE base and frequency scale of the SWA layers
    rope_scale_swa: float = 1.0
    nope_layers: tuple = ()  # (L,) 1 = the layer has no RoPE; () none
    q_scale: float = 1.0  # multiplies Q after RoPE (gemma3; attention_scale is then 1)
    logit_softcap: float = 0.0  # logits = c * tanh(logits / c) when c > 0

    @property
    def is_moe(self):
        return self.n_expert > 0

    def moe_layer(self, layer):
        """True when `layer` has routed experts (not one of the leading dense layers)."""
        return self.is_moe and layer >= self.n_layer_dense_lead

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
        routing = _routing(get, traits)
        if traits.embd_scale_sqrt:
            scales["embedding_scale"] = float(np.sqrt(np.float32(n_embd)))
        if traits.q_prescale:
            n_layer = get(Keys.LLM.BLOCK_COUNT)
            qd = n_embd // n_head if n_layer in traits.q_scale_embd_layers else head_dim_k
            scales["q_scale"] = float(np.float32(1.0) / np.sqrt(np.float32(qd)))
            scales["attention_scale"] = 1.0
        if traits.logit_softcap:
            scales["logit_softcap"] = get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, 0.0, float)
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
            **routing,
            **_rope_and_swa(md, arch, traits, get),
            expert_pruned=_pruned_flags(md.get(KEY_PRUNED)),
        )
        cfg.check()
        return cfg

    def is_swa(self, layer):
        """Whether `layer` attends through the sliding window."""
        return bool(self.swa_layers) and bool(self.swa_layers[layer])

    def rope_of(self, layer):
        """(freq_base, freq_scale, n_rot) of `layer`'s RoPE; n_rot 0 for a NoPE layer."""
        n_rot = 0 if self.nope_layers and self.nope_layers[layer] else self.n_rot
        if self.is_swa(layer):
            return self.rope_base_swa, self.rope_scale_swa, n_rot
        return self.rope_base, self.rope_scale, n_rot

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
        if self.n_expert_groups > 1:
            self._check_groups()
        if self.expert_pruned:
            self._check_pruned()

    def _check_groups(self):
        g, used = self.n_expert_groups, self.n_group_used
        if self.n_expert % g or not 0 < used <= g or self.n_expert // g < 2:
            raise FormatError(
                f"{self.arch}: expert_group_count {g} must divide expert_count "
                f"{self.n_expert} into groups of 2 or more, expert_group_used_count {used} "
                f"in 1..{g}"
            )
        if used * (self.n_expert // g) < self.n_expert_used:
            raise FormatError(
                f"{self.arch}: {used} expert groups hold fewer than the "
                f"{self.n_expert_used} experts used per token"
            )

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


def _gating_name(code):
    """The router gating named by an expert_gating_func value (gguf ExpertGatingFuncType)."""
    names = {int(t): t.name.lower() for t in ExpertGatingFuncType}
    if code not in names or names[code] not in GATINGS:
        raise UnsupportedError(f"expert_gating_func {code} is not supported")
    return names[code]


def _routing(get, traits):
    """Router settings: gating, renormalisation, scale, expert groups. Rows with
    `expert_keys` read the first three from the file; groups are read for every row."""
    out = {"norm_topk": traits.norm_topk, "gating": traits.gating}
    if traits.expert_keys:
        out["norm_topk"] = bool(get(Keys.LLM.EXPERT_WEIGHTS_NORM, False, bool))
        out["expert_weights_scale"] = get(Keys.LLM.EXPERT_WEIGHTS_SCALE, 0.0, float)
        code = get(Keys.LLM.EXPERT_GATING_FUNC, 0)
        if code:
            out["gating"] = _gating_name(code)
    out["n_expert_groups"] = get(Keys.LLM.EXPERT_GROUP_COUNT, 0)
    out["n_group_used"] = get(Keys.LLM.EXPERT_GROUP_USED_COUNT, 0)
    return out
def _rope_and_swa(md, arch, traits, get):
    """The RoPE frequency scale and the sliding-window fields, as llama.cpp reads them:
    rope.scaling.factor f gives scale 1/f; the window from attention.sliding_window
    (or the architecture's forced one), the SWA layers from the per-layer array or the
    n_pattern in attention.sliding_window_pattern, else the architecture's pattern."""
    factor = get(Keys.Rope.SCALING_FACTOR, 0.0, float)
    rope_scale = 1.0 / factor if factor else 1.0
    out = {"rope_scale": rope_scale}
    n_swa = get(Keys.Attention.SLIDING_WINDOW, 0) if traits.swa_pattern >= 0 else 0
    if n_swa <= 0:
        return out
    n_swa = traits.swa_window or n_swa
    n_layer = get(Keys.LLM.BLOCK_COUNT)
    layers = _swa_layers(
        md.get(Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch)), n_layer, traits
    )
    if traits.swa_rope == "own":
        base_swa, scale_swa = get(Keys.Rope.FREQ_BASE_SWA, 10000.0, float), 1.0
    else:
        base = get(Keys.Rope.FREQ_BASE, 10000.0, float)
        base_swa, scale_swa = get(Keys.Rope.FREQ_BASE_SWA, base, float), rope_scale
    nope = ()
    if traits.nope_step:
        nope = tuple(int(i % traits.nope_step == 0) for i in range(n_layer))
    return {
        **out,
        "n_swa": n_swa,
        "swa_layers": layers,
        "rope_base_swa": base_swa,
        "rope_scale_swa": scale_swa,
        "nope_layers": nope,
    }


def _swa_layers(value, n_layer, traits):
    """(L,) 0/1 flags of the SWA layers from the pattern key's value (None, n_pattern or
    a per-layer array): every n-th layer is global (llama_hparams::set_swa_pattern)."""
    if isinstance(value, list):
        if len(value) != n_layer or any(v not in (0, 1, True, False) for v in value):
            raise FormatError(f"sliding_window_pattern must have {n_layer} 0/1 flags")
        return tuple(int(v) for v in value)
    n = traits.swa_pattern if value is None else value
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise FormatError(f"sliding_window_pattern has bad value {value!r}")
    if traits.swa_dense_first:
        return tuple(int(n == 0 or i % n != 0) for i in range(n_layer))
    return tuple(int(n == 0 or i % n < n - 1) for i in range(n_layer))


def _pruned_flags(value):
    """KEY_PRUNED's metadata value as a tuple of 0/1, () when absent or all zero."""
    if value is None:
        return ()
    if not isinstance(value, list) or any(v not in (0, 1) for v in value):
        raise FormatError(f"{KEY_PRUNED} must be an array of 0/1 flags")
    return tuple(int(v) for v in value) if any(value) else ()
