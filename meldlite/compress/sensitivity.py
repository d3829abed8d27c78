"""How much each expert's quantization costs: errors on the profile's calibration rows.

For expert e of layer L with float weights G, U (F, E) and D (E, F), and the
sampled rows x routed to it with router weights w:

    a = act(x G^T) * (x U^T)           (n, F)   the down projection's input
                                                (act: silu, or relu where the
                                                architecture's experts use it)
    y = a D^T                          (n, E)   the expert's output

(with the architecture's expert activation in place of silu, and the expert's gate and
up biases added where the file has them, as gpt-oss's; a down bias cancels in y_t - y).

An expert is two allocation units: "gate_up" (G and U, one type) and "down" (D).
The cost of a unit at type t is the expected squared error it adds to the layer's
output per token, relative to that output's mean energy:

    cost = share_e * mean_rows(w^2 * |y_t - y|^2) / mean_tokens(|sum_e w_e y_e|^2)

where y_t has that unit's matrices round-tripped through type t (the others
exact) and share_e = tokens routed to e / tokens (the profile's counts, from the
whole text). Popularity and routing weight are thus both inside the cost.

Column importance (llama.cpp's imatrix) for quantizing: mean x^2 of the rows
routed to the expert for G and U (the profile's `input_sq_mean`), mean a^2 for D.
"""

from dataclasses import dataclass

import numpy as np
from gguf import Keys

from meldlite.compress import ladder
from meldlite.compress.quantizers import importance_from_activations
from meldlite.config import ARCHITECTURES
from meldlite.experts.store import expert_biases
from meldlite.kernels import dequantize
from meldlite.kernels.mathops import gated

GROUPS = {"gate_up": ("gate", "up"), "down": ("down",)}


@dataclass
class ExpertData:
    """One expert's float weights and its calibration rows."""

    gate: np.ndarray  # (F, E)
    up: np.ndarray  # (F, E)
    down: np.ndarray  # (E, F)
    x: np.ndarray  # (n, E) rows routed to the expert
    w: np.ndarray  # (n,) their router weights
    share: float  # tokens routed to it / tokens (whole profile text)
    importance: dict  # kind -> (cols,) float32 or None
    a: np.ndarray = None  # (n, F) exact inner activation
    y: np.ndarray = None  # (n, E) exact output
    act: str = "silu"  # the architecture's expert activation (kernels.moe.EXPERT_ACTS)
    bias: np.ndarray = None  # (2F + E,) gate, up and down biases, or None

    def inner(self, gate=None, up=None):
        if gate is None and up is None and self.a is not None:
            return self.a
        g = self.x @ (self.gate if gate is None else gate).T  # (n, F)
        u = self.x @ (self.up if up is None else up).T  # (n, F)
        if self.bias is not None:
            n_ff = g.shape[1]
            g, u = g + self.bias[:n_ff], u + self.bias[n_ff : 2 * n_ff]  # (n, F)
        return gated(g, u, self.act)  # (n, F)


def rows_of(sample_layer, e):
    """(x (n, E) float32, w (n,)) of the sampled rows routed to expert e."""
    x, ids, w = sample_layer
    hit = ids == e  # (N, k)
    rows = hit.any(axis=1)
    return x[rows].astype(np.float32), (w * hit).sum(axis=1)[rows].astype(np.float32)


def expert_data(f, layer, e, sample_layer, share, input_sq):
    """ExpertData of expert e from the file `f` and the layer's calibration sample."""
    mats = {k: f.expert_tensor(layer, k, e).dequantize() for k in ("gate", "up", "down")}
    x, w = rows_of(sample_layer, e)
    d = ExpertData(mats["gate"], mats["up"], mats["down"], x, w, float(share), {})
    arch = ARCHITECTURES.get(f.metadata.get(Keys.General.ARCHITECTURE))
    d.act = arch.expert_act if arch else "silu"
    n_ff, n_embd = d.gate.shape
    bias = expert_biases(f, layer, f.expert_count(layer), n_embd, n_ff, expert=e)
    d.bias = bias if bias.size else None
    sq = None if input_sq is None or not np.any(input_sq) else np.asarray(input_sq, np.float32)
    if len(x):
        d.a = d.inner()  # (n, F)
        d.y = d.a @ d.down.T  # (n, E) (a down bias cancels in the errors: left out)
        sq = importance_from_activations(x) if sq is None else sq
    d.importance = {
        "gate": sq,
        "up": sq,
        "down": importance_from_activations(d.a) if len(x) else None,
    }
    return d


def roundtrip(m, qtype, importance=None):
    """m (rows, cols) float32 after quantizing to `qtype` and decoding again."""
    return dequantize(ladder.quantize(m, qtype, importance), qtype)  # (rows, cols)


def unit_errors(d, group, qtypes):
    """[mean over rows of w^2 |y_t - y|^2 for each type t] of one unit, exact elsewhere."""
    if not len(d.x):
        return [0.0] * len(qtypes)
    y = d.y  # (n, E)
    w2 = d.w.astype(np.float64) ** 2  # (n,)
    out = []
    for t in qtypes:
        if group == "down":
            yt = d.inner() @ roundtrip(d.down, t, d.importance["down"]).T  # (n, E)
        else:
            gt = roundtrip(d.gate, t, d.importance["gate"])
            ut = roundtrip(d.up, t, d.importance["up"])
            yt = d.inner(gt, ut) @ d.down.T  # (n, E)
        out.append(float((w2 * ((yt - y).astype(np.float64) ** 2).sum(axis=1)).mean()))
    return out


def relative_error(d, types):
    """|y_q - y|^2 / |y|^2 over the expert's rows (weighted by w^2), with its gate, up
    and down at `types`; 0 when no row was routed to it."""
    if not len(d.x):
        return 0.0
    y = d.y  # (n, E)
    g, u, dn = (
        roundtrip(m, t, d.importance[k])
        for m, t, k in zip((d.gate, d.up, d.down), types, ("gate", "up", "down"))
    )
    yq = d.inner(g, u) @ dn.T  # (n, E)
    w2 = d.w.astype(np.float64)[:, None] ** 2
    return float((w2 * (yq - y) ** 2).sum() / max((w2 * y.astype(np.float64) ** 2).sum(), 1e-30))


def layer_energy(sample_layer, outputs):
    """Mean over sampled tokens of |sum_e w_e y_e|^2; outputs {e: y (n_e, E) on its rows}."""
    x, ids, w = sample_layer
    total = np.zeros(x.shape, np.float64)  # (N, E)
    for e, y in outputs.items():
        hit = ids == e  # (N, k)
        rows = hit.any(axis=1)
        total[rows] += (w * hit).sum(axis=1)[rows, None] * y
    return float((total**2).sum(axis=1).mean()) if len(x) else 1.0
