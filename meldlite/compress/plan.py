"""The per-expert precision policy: which type each unit gets under a byte budget.

A unit (one expert's gate+up, or its down) has options (bytes, cost) on its type
ladder. Every unit starts at its cheapest option; the upgrades are then taken in
order of cost reduction per added byte, as long as they fit. Per unit only the
options on the lower convex hull of (bytes, cost) are steps (a dearer option that
does not reduce the cost, or does so less per byte than a later one, is skipped),
so the steps of one unit come in decreasing order of gain per byte and the greedy
order is the optimal one of the continuous relaxation; once a unit's next step
does not fit, that unit stops while smaller steps of other units still fill the rest.
"""

import numpy as np

from meldlite.compress import ladder
from meldlite.errors import OptionError


def hull_steps(options):
    """Indices of options (bytes, cost), sorted by bytes, on the lower convex hull
    from the cheapest, each step lowering the cost."""
    order = sorted(range(len(options)), key=lambda i: (options[i][0], options[i][1]))
    hull = [order[0]]
    for i in order[1:]:
        b, c = options[i]
        if c >= options[hull[-1]][1] or b == options[hull[-1]][0]:
            continue
        while len(hull) >= 2:
            (b0, c0), (b1, c1) = options[hull[-2]], options[hull[-1]]
            if (c0 - c1) * (b - b1) <= (c1 - c) * (b1 - b0):  # hull[-1] gains less per byte
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(units, budget):
    """Choose one option per unit with total bytes <= budget.

    units: list of [(bytes, cost), ...] per unit. Returns the chosen option index per
    unit; OptionError if even the cheapest options exceed the budget.
    """
    hulls = [hull_steps(opts) for opts in units]
    choice = [h[0] for h in hulls]
    spent = sum(units[u][c][0] for u, c in enumerate(choice))
    if spent > budget:
        raise OptionError(
            f"the experts alone need {spent:,} bytes at their cheapest types, "
            f"more than the {budget:,} left for them"
        )
    steps = []  # (gain per byte, unit, position on its hull)
    for u, h in enumerate(hulls):
        for j in range(1, len(h)):
            (b0, c0), (b1, c1) = units[u][h[j - 1]], units[u][h[j]]
            steps.append(((c0 - c1) / (b1 - b0), u, j))
    steps.sort(key=lambda s: -s[0])
    pos = [0] * len(units)
    for _, u, j in steps:
        if pos[u] != j - 1:  # an earlier step of this unit did not fit
            continue
        extra = units[u][hulls[u][j]][0] - units[u][hulls[u][j - 1]][0]
        if spent + extra <= budget:
            spent += extra
            pos[u] = j
            choice[u] = hulls[u][j]
        else:
            pos[u] = -2  # stop this unit
    return choice


# Non-expert tensors: (bits per weight of the whole budget from which the preset
# applies, {role: type}); roles are "output", "token_embd" and "other" (attention,
# shared experts, dense FFNs). Like llama.cpp's mixes: the output matrix at Q6_K or
# better, the rest a step above what the experts can afford on average.
T = ladder.T
PRESETS = (
    (0.0, {"output": T.Q6_K, "token_embd": T.Q2_K, "other": T.Q2_K}),
    (2.8, {"output": T.Q6_K, "token_embd": T.Q2_K, "other": T.Q3_K}),
    (3.0, {"output": T.Q6_K, "token_embd": T.Q3_K, "other": T.Q4_K}),
    (3.8, {"output": T.Q6_K, "token_embd": T.Q4_K, "other": T.Q5_K}),
    (4.8, {"output": T.Q6_K, "token_embd": T.Q6_K, "other": T.Q6_K}),
    (6.0, {"output": T.Q8_0, "token_embd": T.Q8_0, "other": T.Q8_0}),
)


def role(name):
    return name.split(".")[0] if name in ("output.weight", "token_embd.weight") else "other"


def preset(bpw):
    """The PRESETS entry for a budget of `bpw` bits per parameter."""
    return [p for lo, p in PRESETS if bpw >= lo][-1]


def non_expert_types(f, names, bpw, allowed):
    """{name: type} for the non-expert tensors `names` of file `f` at budget `bpw`:
    the preset's type (with llama.cpp's fallback for short rows) for quantizable
    weights, the source type for the rest (norms, routers, biases)."""
    p = preset(bpw)
    types = {}
    for name in names:
        view = f.tensor(name)
        if not ladder.is_quantizable(name, view.shape):
            types[name] = view.ggml_type
            continue
        t = ladder.fit_type(p[role(name)], view.shape[-1])
        types[name] = t if t in allowed else ladder.fit_type(T.Q8_0, view.shape[-1])
    return types


def unit_ladder(qtypes, n_cols, allowed):
    """The distinct types a unit with rows of `n_cols` can take, cheapest first."""
    fit = {ladder.fit_type(t, n_cols) for t in qtypes}
    fit = [t for t in fit if t in allowed]
    if not fit:
        raise OptionError(f"no type of the ladder can hold rows of {n_cols} values")
    return sorted(fit, key=lambda t: ladder.row_bytes(t, n_cols) / n_cols)


def padded(nbytes, alignment):
    return -(-int(nbytes) // alignment) * alignment


def mean_bpw(nbytes, n_params):
    return 8.0 * nbytes / max(1, n_params)


def shares(counts, tokens):
    """(n_expert,) fraction of tokens routed to each expert."""
    return np.asarray(counts, np.float64) / max(1, tokens)
