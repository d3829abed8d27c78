"""Per-expert mixed files: measure every expert unit on the ladder, allocate the
budget (plan.py), write the per-expert layout with popularity and sensitivity."""

import math

import numpy as np
from gguf import GGUFValueType

from meldlite.compress import ladder, plan, sensitivity, write
from meldlite.compress.result import QuantizeResult
from meldlite.errors import OptionError
from meldlite.formats import layout
from meldlite.formats.pack import non_expert_names
from meldlite.formats.profile import decode_array, load_calibration, read_profile

_INFO_BYTES = 8 + 4 + 4 * 8 + 4 + 8  # a tensor info besides its name (at most 4 dims)


def quantize_mixed(f, out, budget, profile, progress=None, ladder_types=None):
    """Write the per-expert file `out` from the float GGUFFile `f`, at most `budget` bytes."""
    prof = profile if isinstance(profile, dict) else read_profile(profile)
    check_profile(prof, f)
    sample = load_calibration(prof)
    allowed = set(ladder.quantizable_types())
    qtypes = [ladder.parse_type(t) for t in ladder_types] if ladder_types else list(ladder.LADDER)
    experts = [(L, e) for L in range(f.n_layers) for e in range(f.expert_count(L))]
    names = non_expert_names(f)
    n_params = sum(math.prod(f.tensor(n).shape) for n in f.tensor_names())
    header = header_bound(f, experts)
    keys, ladders, nbytes = unit_options(f, experts, qtypes, allowed)
    types, fixed = non_expert_plan(
        f, names, budget, header, n_params, sum(min(b) for b in nbytes), allowed
    )
    step = _stepper(progress, len(experts), "measuring")
    costs, imps = measure(f, prof, sample, experts, ladders, step)
    units = [list(zip(b, costs[k])) for k, b in zip(keys, nbytes)]
    choice = plan.allocate(units, budget - fixed)
    chosen = {k: ladders[k][c] for k, c in zip(keys, choice)}
    expert_types = {
        (L, e): (chosen[(L, e, "gate_up")],) * 2 + (chosen[(L, e, "down")],) for L, e in experts
    }
    step = _stepper(progress, len(experts), "sensitivity")
    sens = sensitivities(f, sample, expert_types, imps, step)
    pop = popularity(prof, f)
    meta = [
        write.f32_array_metadata(layout.KEY_POPULARITY, pop),
        write.f32_array_metadata(layout.KEY_SENSITIVITY, sens),
        ("meldlite.quantize.budget", int(budget), GGUFValueType.UINT64, None),
    ]
    step = _stepper(progress, None, "writing")
    w = write.write_per_expert(
        f,
        out,
        types,
        expert_types,
        ladder.file_type(main_type(f, expert_types)),
        meta,
        imps,
        progress=step,
    )
    if w.nbytes > budget:  # header_bound is an upper bound: this cannot happen
        raise OptionError(f"wrote {w.nbytes:,} bytes, over the budget of {budget:,}")
    counts = {}
    for t in expert_types.values():
        key = "/".join(x.name for x in t)
        counts[key] = counts.get(key, 0) + 1
    return QuantizeResult(w.path, w.nbytes, w.tensor_types, counts, budget)


def check_profile(prof, f):
    m = prof.get("model", {})
    want = {"n_layer": f.n_layers, "n_expert": max(f.expert_count(L) for L in range(f.n_layers))}
    got = {k: m.get(k) for k in want}
    if got != want or len(prof.get("layers", ())) != f.n_layers:
        raise OptionError(
            f"the profile is of a model with {got['n_layer']} layers x "
            f"{got['n_expert']} experts, SRC has {want['n_layer']} x {want['n_expert']}"
        )


def unit_options(f, experts, qtypes, allowed):
    """Keys (layer, e, group) of all units, {key: its types, cheapest first} and the
    bytes (alignment-padded) of each of those types per unit."""
    keys, ladders, nbytes = [], {}, []
    for L, e in experts:
        for group, kinds in sensitivity.GROUPS.items():
            shapes = [f.expert_tensor(L, k, e).shape for k in kinds]
            lad = plan.unit_ladder(qtypes, shapes[0][-1], allowed)
            keys.append((L, e, group))
            ladders[(L, e, group)] = lad
            nbytes.append(
                [
                    sum(plan.padded(ladder.tensor_bytes(t, s), f.alignment) for s in shapes)
                    for t in lad
                ]
            )
    return keys, ladders, nbytes


def non_expert_plan(f, names, budget, header, n_params, cheapest, allowed):
    """(non-expert types, their bytes with the header) for the budget: the preset of the
    budget's bits per weight, or a cheaper one when the experts' cheapest types do not
    fit beside it. OptionError naming the smallest possible file when none fits."""

    def plan_at(lo):
        types = plan.non_expert_types(f, names, lo, allowed)
        return types, header + sum(
            plan.padded(ladder.tensor_bytes(t, f.tensor(n).shape), f.alignment)
            for n, t in types.items()
        )

    bpw = plan.mean_bpw(budget, n_params)
    for lo in reversed([lo for lo, _ in plan.PRESETS if lo <= bpw]):
        types, fixed = plan_at(lo)
        if fixed + cheapest <= budget:
            return types, fixed
    minimum = plan_at(0.0)[1] + cheapest
    raise OptionError(
        f"size {budget:,} bytes is below the smallest file this model can be "
        f"quantized to ({minimum:,} bytes)"
    )


def measure(f, prof, sample, experts, ladders, step):
    """({(layer, e, group): cost at each type of its ladder}, column importance
    {(layer, e): {kind: (cols,)}} used to quantize)."""
    raw, costs, imps, by_layer = {}, {}, {}, {}
    for L, e in experts:
        by_layer.setdefault(L, []).append(e)
    done = 0
    for L, es in by_layer.items():
        lay = prof["layers"][L]
        share = plan.shares(lay["counts"], lay["tokens"])
        input_sq = decode_array(lay["input_sq_mean"]) if "input_sq_mean" in lay else None
        outs = {}
        for e in es:
            d = sensitivity.expert_data(
                f, L, e, sample[L], share[e], None if input_sq is None else input_sq[e]
            )
            imps[(L, e)] = d.importance
            if d.y is not None:
                outs[e] = d.y
            for group in sensitivity.GROUPS:
                errs = sensitivity.unit_errors(d, group, ladders[(L, e, group)])
                raw[(L, e, group)] = [d.share * err for err in errs]
            done += 1
            step(done)
        energy = sensitivity.layer_energy(sample[L], outs)
        for e in es:
            for group in sensitivity.GROUPS:
                costs[(L, e, group)] = [c / energy for c in raw[(L, e, group)]]
    return costs, imps


def header_bound(f, experts):
    """An upper bound of the bytes before the tensor data of the mixed file: SRC's own
    header (its metadata and tensor infos), the per-expert tensor infos, the metadata
    quantize adds, and the alignment padding."""
    names = sum(len(layout.expert_name(L, "gate", e)) + 8 + _INFO_BYTES for L, e in experts) * 3
    n = len(experts)
    added = 2 * (64 + 4 * n) + (64 + 8 * n) + 512  # popularity, sensitivity, order, strings
    return f.data_offset + names + added + f.alignment


def sensitivities(f, sample, expert_types, imps, step):
    """(n_layer * n_expert,) relative output error of each expert at its types."""
    X = max(f.expert_count(L) for L in range(f.n_layers))
    out = np.zeros(f.n_layers * X, np.float32)
    for i, ((L, e), types) in enumerate(sorted(expert_types.items())):
        d = sensitivity.expert_data(f, L, e, sample[L], 0.0, None)
        d.importance = imps[(L, e)]
        out[L * X + e] = sensitivity.relative_error(d, types)
        step(i + 1)
    return out


def popularity(prof, f):
    """(n_layer * n_expert,) fraction of tokens routed to each expert, layer-major."""
    X = max(f.expert_count(L) for L in range(f.n_layers))
    out = np.zeros((f.n_layers, X), np.float32)
    for L, lay in enumerate(prof["layers"]):
        if f.expert_count(L):
            out[L] = plan.shares(lay["counts"], lay["tokens"])
    return out.ravel()


def main_type(f, expert_types):
    """The type holding most expert parameters (for general.file_type)."""
    mass = {}
    for (L, e), types in expert_types.items():
        for kind, t in zip(layout.KINDS, types):
            mass[t] = mass.get(t, 0) + math.prod(f.expert_tensor(L, kind, e).shape)
    return max(mass, key=mass.get)


def _stepper(progress, total, what):
    if not progress:
        return lambda *a: None
    if total is None:
        return lambda i, n: progress(i, n, what)
    return lambda i: progress(i, total, what)
