"""Seeding a budgeted cache from a compressed file's metadata.

`meldlite quantize` writes, per expert (flat, layer-major, n_layer * n_expert):
- KEY_POPULARITY (f32): the fraction of routed tokens that chose the expert;
- KEY_SENSITIVITY (f32): the relative output error of the expert at its type;
- KEY_PRUNED (u8): 1 = pruned, never routed.
When a file carries popularity (and no profile is given at load), the cache
policy starts from it and the cache is filled at load with the most popular
experts first (ties: the more sensitive first; pruned ones never), so that a
memory budget keeps resident what the router will ask for most.
"""

from dataclasses import dataclass

import numpy as np

from meldlite.errors import FormatError
from meldlite.formats.layout import KEY_POPULARITY, KEY_PRUNED, KEY_SENSITIVITY

TIE = 1e-9  # sensitivity's weight in the policy prior: breaks exact ties only


@dataclass
class Seed:
    popularity: np.ndarray  # (L, X) float64
    sensitivity: np.ndarray  # (L, X) float64, zeros when the file has none
    pruned: np.ndarray  # (L, X) bool

    def prior(self):
        """(L, X) popularity for the policy, exact ties broken by sensitivity."""
        s = self.sensitivity / max(float(self.sensitivity.max()), 1e-30)
        return np.where(self.pruned, 0.0, self.popularity + TIE * s)

    def order(self):
        """Global expert ids g = layer * n_expert + e, most popular first (ties: the
        more sensitive first, then by g), pruned experts left out."""
        pop, sens = self.popularity.reshape(-1), self.sensitivity.reshape(-1)
        g = np.lexsort((np.arange(pop.size), -sens, -pop))
        return g[~self.pruned.reshape(-1)[g]]


def metadata_seed(metadata, n_layer, n_expert):
    """The Seed of a file's metadata, or None without KEY_POPULARITY."""
    pop = _array(metadata, KEY_POPULARITY, n_layer, n_expert)
    if pop is None:
        return None
    sens = _array(metadata, KEY_SENSITIVITY, n_layer, n_expert)
    pruned = _array(metadata, KEY_PRUNED, n_layer, n_expert)
    return Seed(
        pop,
        np.zeros_like(pop) if sens is None else sens,
        np.zeros(pop.shape, bool) if pruned is None else pruned != 0,
    )


def _array(metadata, key, n_layer, n_expert):
    value = metadata.get(key)
    if value is None:
        return None
    try:
        a = np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise FormatError(f"metadata {key} must be a numeric array") from None
    if a.size != n_layer * n_expert:
        raise FormatError(
            f"metadata {key} has {a.size} values, expected n_layer * expert_count "
            f"= {n_layer * n_expert}"
        )
    if not np.isfinite(a).all() or (a < 0).any():
        raise FormatError(f"metadata {key} must hold finite non-negative values")
    return a.reshape(n_layer, n_expert)
