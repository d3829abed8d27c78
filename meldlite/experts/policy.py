"""Cache policies: which cached expert to evict, and whether a speculative load
may displace one.

Experts are numbered globally, g = layer * n_expert + e. A policy sees every
layer visit (`on_use`: how many tokens of the batch picked each expert of the
layer), every load (`on_load`), and ranks eviction candidates with `value`
(the lowest value goes first). All state is in NumPy arrays of n_layer*n_expert.

- "lru": least recently used, over all layers together. On a decode step the
  layers are visited in a cycle, so when the cache is smaller than one token's
  working set LRU evicts exactly the experts the next token's early layers
  will ask for first (the classic loop pathology); kept as the baseline.
- "lfu": activation counts (aged: each visit of a layer multiplies its counts
  by `decay`), seeded from a profile's popularity when one is given.
- "forecast": estimates when each expert will next be used and evicts the one
  expected furthest away (an online approximation of Belady's MIN). For expert
  e of layer l, p = P(e is picked on the next visit of l) is an exponential
  moving average of its past picks (seeded from the profile); the next visit of
  l is d layer steps ahead in the layer cycle, so the expected distance to the
  next use is d + n_layer * (1 - p) / p. A prefetch prediction raises p for the
  predicted experts of the next layer until that layer runs.
"""

import numpy as np

from meldlite.errors import OptionError
from meldlite.options import POLICIES


class Policy:
    name = None

    def __init__(self, n_layer, n_expert, k, prior=None):
        self.n_layer, self.n_expert, self.k = n_layer, n_expert, k
        n = n_layer * n_expert
        self.last_use = np.zeros(n, np.float64)  # (L*X,) tick of the last pick or load
        self.layer_of = np.repeat(np.arange(n_layer), n_expert)  # (L*X,)
        self.prior = self._prior(prior)  # (L, X) P(picked per token), sums to k

    def _prior(self, prior):
        if prior is None:
            return np.full((self.n_layer, self.n_expert), self.k / self.n_expert)
        share = np.asarray(prior, np.float64)
        if share.shape != (self.n_layer, self.n_expert):
            raise OptionError(
                f"profile popularity has shape {share.shape}, the model needs "
                f"({self.n_layer}, {self.n_expert})"
            )
        share = np.maximum(share, 0) + 1e-6
        return share / share.sum(axis=1, keepdims=True) * self.k

    def on_use(self, layer, counts, n_tok, tick, recent):
        """Layer `layer` ran a batch of n_tok tokens: counts (X,) picks per expert;
        `recent` (X,) bool: picked by the batch's last token."""
        base = layer * self.n_expert
        lu = self.last_use[base : base + self.n_expert]
        lu[counts > 0] = tick
        lu[recent] = tick + 0.5  # the last token's picks count as more recent

    def on_load(self, g, tick):
        self.last_use[g] = max(self.last_use[g], tick)

    def expect(self, gs, q):
        """Experts `gs` are predicted for the next layer with confidence q (0..1)."""

    def value(self, gs, layer_now):
        """Keep-value of candidates gs (higher = keep); `layer_now` is running."""
        return self.last_use[gs]

    def admit(self, g, victim, layer_now, predicted):
        """May a speculative load of g evict `victim`? A load the router predicted
        for the next layer may (classic prefetch); a popularity guess only if g is
        worth more than the victim."""
        if predicted:
            return True
        both = np.array([g, victim])
        v = self.value(both, layer_now)
        return v[0] > v[1]

    def likely(self, layer, n):
        """The n experts of `layer` most likely to be picked next (prefetch fallback)."""
        base = layer * self.n_expert
        return np.argsort(-self.last_use[base : base + self.n_expert], kind="stable")[:n]


class LRU(Policy):
    name = "lru"


class LFU(Policy):
    name = "lfu"

    def __init__(self, n_layer, n_expert, k, prior=None, decay=0.98, prior_weight=8.0):
        super().__init__(n_layer, n_expert, k, prior)
        self.decay = decay
        self.count = (self.prior * prior_weight).reshape(-1)  # (L*X,) aged pick counts

    def on_use(self, layer, counts, n_tok, tick, recent):
        super().on_use(layer, counts, n_tok, tick, recent)
        base = layer * self.n_expert
        c = self.count[base : base + self.n_expert]
        c *= self.decay**n_tok
        c += counts

    def value(self, gs, layer_now):
        # count first; among equal counts the least recent goes first
        return self.count[gs] + 1e-9 * self.last_use[gs]

    def likely(self, layer, n):
        base = layer * self.n_expert
        return np.argsort(-self.count[base : base + self.n_expert], kind="stable")[:n]


class Forecast(Policy):
    name = "forecast"

    def __init__(self, n_layer, n_expert, k, prior=None, beta=0.95):
        super().__init__(n_layer, n_expert, k, prior)
        self.beta = beta
        self.p = np.clip(self.prior, 1e-3, 1.0).reshape(-1)  # (L*X,) P(picked at next visit)
        self.boost = np.zeros(n_layer * n_expert)  # (L*X,) prediction confidence

    def on_use(self, layer, counts, n_tok, tick, recent):
        super().on_use(layer, counts, n_tok, tick, recent)
        base = layer * self.n_expert
        p = self.p[base : base + self.n_expert]
        if n_tok == 1:
            p *= self.beta
            p += (1 - self.beta) * (counts > 0)
        else:
            # the EMA over a batch, in closed form: recent tokens weigh most
            frac = counts / n_tok
            p *= self.beta**n_tok
            p += (1 - self.beta**n_tok) * (0.5 * frac + 0.5 * recent)
        np.clip(p, 1e-3, 1.0, out=p)
        self.boost[base : base + self.n_expert] = 0.0

    def expect(self, gs, q):
        self.boost[gs] = np.maximum(self.boost[gs], q)

    def distance(self, gs, layer_now):
        """Expected number of layer steps until each of gs is picked again."""
        layers = self.layer_of[gs]
        d = (layers - layer_now - 1) % self.n_layer + 1  # 1 .. n_layer
        p = np.maximum(self.p[gs], self.boost[gs])
        return d + self.n_layer * (1 - p) / p

    def value(self, gs, layer_now):
        return -self.distance(gs, layer_now) + 1e-12 * self.last_use[gs]

    def admit(self, g, victim, layer_now, predicted):
        both = np.array([g, victim])
        d = self.distance(both, layer_now)
        return d[1] > d[0]

    def likely(self, layer, n):
        base = layer * self.n_expert
        return np.argsort(-self.p[base : base + self.n_expert], kind="stable")[:n]


def make_policy(name, n_layer, n_expert, k, prior=None):
    classes = {"lru": LRU, "lfu": LFU, "forecast": Forecast}
    if name not in classes:
        raise OptionError(f"cache_policy {name!r} is not one of {', '.join(POLICIES)}")
    return classes[name](n_layer, n_expert, k, prior)
