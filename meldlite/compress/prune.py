"""Expert pruning: the least used experts of each layer are never routed again.

A pruned expert's router logit is masked (-inf before the softmax, see
`ModelConfig.router_bias`), so top-k and the renormalisation run over the
remaining experts only. The file records which experts are pruned in
`meldlite.expert_pruned` (u8, n_layer * n_expert flags, layer-major); in the
per-expert layout the pruned experts' tensors are left out (the size saving).

Which experts are least used comes from a popularity table (n_layer, n_expert):
the share of routed tokens that chose each expert, from `meldlite profile`
(calibration text) or from a file's `meldlite.expert_popularity` metadata.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, Keys

from meldlite.config import ModelConfig
from meldlite.errors import FormatError, OptionError, UnsupportedError
from meldlite.formats import layout
from meldlite.formats.gguf import read_gguf
from meldlite.formats.pack import TensorOut, non_expert_names, write_atomic


@dataclass(frozen=True)
class Pruned:
    path: Path
    n_pruned: int  # pruned experts in the file, all layers
    nbytes: int  # size of the written file


def prune_count(spec, n_expert, n_used):
    """Experts to prune per layer from "N" (a count) or "0.25" (a fraction of n_expert,
    rounded down); at least n_used experts must remain."""
    text = str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        raise OptionError(
            f"--prune-experts {spec!r}: expected a count N or a fraction in [0, 1)"
        ) from None
    if "." in text or "e" in text.lower():
        if not 0 <= value < 1:
            raise OptionError(f"--prune-experts {spec!r}: a fraction must be in [0, 1)")
        n = int(value * n_expert)
    elif value != int(value) or value < 0:
        raise OptionError(f"--prune-experts {spec!r}: a count must be a whole number >= 0")
    else:
        n = int(value)
    if n > n_expert - n_used:
        raise OptionError(
            f"--prune-experts {spec!r}: pruning {n} of {n_expert} experts per layer "
            f"leaves fewer than the {n_used} used per token"
        )
    return n


def least_used(popularity, n_prune, already=None):
    """(L, X) bool: per layer, the n_prune experts of lowest popularity (ties: lower
    id first), counting experts already pruned (`already`, (L, X) bool) among them."""
    pop = np.asarray(popularity, np.float64)  # (L, X)
    done = np.zeros(pop.shape, bool) if already is None else np.asarray(already, bool)
    out = done.copy()  # (L, X)
    for layer in range(pop.shape[0]):
        extra = n_prune - int(done[layer].sum())
        if extra > 0:
            order = np.argsort(np.where(done[layer], np.inf, pop[layer]), kind="stable")
            out[layer, order[:extra]] = True
    return out


def pruned_flags(f):
    """(L, X) bool of the experts `f` (a GGUFFile) already marks pruned."""
    cfg = ModelConfig.from_metadata(f.metadata)
    flags = np.zeros((cfg.n_layer, cfg.n_expert), bool)  # (L, X)
    for layer in range(cfg.n_layer):
        flags[layer, cfg.pruned(layer)] = True
    return flags


def file_popularity(f, cfg):
    """(L, X) popularity from `f`'s meldlite.expert_popularity metadata."""
    value = f.metadata.get(layout.KEY_POPULARITY)
    if value is None:
        raise OptionError(
            f"{f.path} has no {layout.KEY_POPULARITY}: give a profile "
            f"(meldlite profile) to choose the experts to prune"
        )
    pop = np.asarray(value, np.float64)
    if pop.size != cfg.n_layer * cfg.n_expert:
        raise FormatError(
            f"{f.path}: {layout.KEY_POPULARITY} has {pop.size} values, expected "
            f"{cfg.n_layer * cfg.n_expert}"
        )
    return pop.reshape(cfg.n_layer, cfg.n_expert)


def pruned_metadata(flags):
    """The metadata entry recording `flags` (L, X) bool."""
    values = [int(v) for v in np.asarray(flags, np.uint8).ravel()]
    return (layout.KEY_PRUNED, values, GGUFValueType.ARRAY, GGUFValueType.UINT8)


def prune_plan(f, profile=None, prune="0"):
    """(L, X) bool: the experts of `f` (a GGUFFile) pruned after pruning `prune`
    (count or fraction) per layer, by popularity from `profile` or `f`'s metadata."""
    from meldlite.formats.profile import load_prior

    cfg = ModelConfig.from_metadata(f.metadata)
    if not cfg.is_moe:
        raise OptionError(f"{f.path}: a dense model has no experts to prune")
    n_prune = prune_count(prune, cfg.n_expert, cfg.n_expert_used)
    pop = load_prior(profile, cfg) if profile is not None else file_popularity(f, cfg)
    return least_used(pop, n_prune, pruned_flags(f))


def check_request(src, profile, prune):
    """For the CLI's --prune-experts: OptionError before anything is written if `prune`
    cannot be applied to `src` with popularity from `profile` (required there)."""
    if profile is None:
        raise OptionError("--prune-experts needs --profile (expert popularity)")
    prune_plan(read_gguf(src), profile, prune)


def prune_file(src, out, profile=None, prune="0"):
    """Write `out`: `src` in the per-expert layout without its `prune` (count or
    fraction, per layer) least used experts, which are marked in meldlite.expert_pruned.

    profile: a `meldlite profile` result (path or dict) giving the popularity; None
    uses `src`'s meldlite.expert_popularity. Experts `src` already prunes stay pruned
    and count towards `prune`. The other experts' bytes are copied unchanged, in
    `src`'s expert order. `out` may be `src` (written to a temporary, then renamed).
    """
    f = read_gguf(src)
    flags = prune_plan(f, profile, prune)  # (L, X)
    kept = [(L, e) for L, e in f.expert_order() if not flags[L, e]]
    tensors = [TensorOut.copy(n, f.tensor(n)) for n in non_expert_names(f)]
    for L, e in kept:
        tensors += [
            TensorOut.copy(layout.expert_name(L, k, e), f.expert_tensor(L, k, e))
            for k in layout.KINDS
        ]
    meta = [
        (layout.KEY_LAYOUT, layout.PER_EXPERT, GGUFValueType.STRING, None),
        (layout.KEY_ORDER, [x for p in kept for x in p], GGUFValueType.ARRAY, GGUFValueType.UINT32),
        (
            layout.KEY_ORDER_POLICY,
            f.metadata.get(layout.KEY_ORDER_POLICY, "layer-major"),
            GGUFValueType.STRING,
            None,
        ),
        pruned_metadata(flags),
    ]
    out = Path(out)
    write_atomic(out, f, tensors, meta, skip_keys=(layout.KEY_PRUNED,))
    return Pruned(out, int(flags.sum()), out.stat().st_size)


def remove_experts(src, out, flags):
    """Write `out`: the stacked (llama.cpp layout) `src` with the flagged experts (L, X)
    removed, their router rows and expert slices dropped and expert_count lowered, so
    that llama.cpp runs the pruned model (its softmax then spans the kept experts only,
    as the mask does). Every layer must drop the same number; expert ids are renumbered."""
    f = read_gguf(src)
    if f.expert_layout != layout.STACKED:
        raise UnsupportedError(f"{src}: removing experts needs the stacked layout")
    flags = np.asarray(flags, bool)  # (L, X)
    kept = [np.flatnonzero(~row) for row in flags]  # per layer (X',)
    if len({len(k) for k in kept}) != 1:
        raise OptionError("removing experts needs the same number pruned in every layer")
    stacked = set(f.expert_tensor_names())
    tensors = []
    for name in f.tensor_names():
        view = f.tensor(name)
        if name in stacked or name.endswith(".ffn_gate_inp.weight"):
            rows = kept[int(name.split(".")[1])]
            tensors.append(
                TensorOut(
                    name,
                    view.ggml_type,
                    (len(rows), *view.raw.shape[1:]),
                    lambda v=view, r=rows: np.ascontiguousarray(v.raw[r]),
                )
            )
        else:
            tensors.append(TensorOut.copy(name, view))
    key = Keys.LLM.EXPERT_COUNT.format(arch=f.architecture)
    write_atomic(
        out,
        f,
        tensors,
        [(key, len(kept[0]), GGUFValueType.UINT32, None)],
        skip_keys=(key, layout.KEY_PRUNED, layout.KEY_POPULARITY, layout.KEY_SENSITIVITY),
    )
    return Path(out)
