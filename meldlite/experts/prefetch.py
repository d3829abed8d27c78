"""Predictive prefetch: guess the next layer's experts and load them in the background.

- `RoutePredictor` (compute thread): applies layer L+1's ffn_norm and router to
  layer L's hidden state (the input of layer L's experts) and takes its top-k.
  The residual stream changes little from one layer to the next, so this
  guesses ~80% of the next layer's experts on the trained model
  (../shared/models/README.md). It runs a small (n_expert x n_embd) matmul on the
  compute thread, like every kernel.
- `LoadQueue`: pending speculative loads by priority (predictions in rank order,
  then popularity guesses), one entry per expert.
- `Prefetcher` (compute thread): after each layer's routing, queues the
  predictor's guesses for the coming layers and scores the earlier ones. Where
  the router reads the layer input (smallthinker), it runs before the layer's
  attention and `announce` queues exactly its experts, ahead of every guess, so
  their loads overlap that attention.
- `Loader` (background thread): drives a `LoadSource` through its public
  methods: takes the next load the source allows (the source decides what it
  may evict), reads it with os.preadv / madvise (which release the GIL) and
  hands back the outcome. It never calls a Numba kernel, so the compute thread
  is the only one using Numba's threading layer.

Misses the compute thread needs now are read by the compute thread itself (no
hand-off between threads), and the guesses still queued for that layer are
dropped. So a wrong guess costs at most the one read in flight when the compute
thread needs the device, and a right guess still in flight when its layer runs
is waited for instead of read again: it costs no more than the miss would have.
"""

import heapq
import threading
from typing import Protocol

import numpy as np

from meldlite.config import tensor_name
from meldlite.experts.residency import ABSENT, READY

EXACT = 0  # priority band of announced loads: the router already chose them
PREDICTED = 1  # priority band of predicted loads (plus rank / 1000)
HINTED = 2  # popularity fallback and external hints


class RoutePredictor:
    """Top-k guesses of layer L+1's experts from layer L's expert input."""

    def __init__(self, weights, cfg):
        self.cfg = cfg
        self.k = cfg.n_expert_used
        self.routers = [
            weights.get(f"blk.{i}.ffn_gate_inp.weight") for i in range(cfg.n_layer)
        ]  # None for a dense layer (never a target: it serves no experts)
        self.biases = [weights.get(f"blk.{i}.ffn_gate_inp.bias") for i in range(cfg.n_layer)]
        self.norms = [
            np.asarray(weights[tensor_name(cfg.traits.ffn_norm, i)], np.float32)
            for i in range(cfg.n_layer)
        ]
        # a router on the layer input reads x itself; rmsnorm(x) is x up to a
        # positive factor per token, which changes no top-k
        on_input = cfg.traits.router_input == "layer"
        self.router_norms = [np.ones_like(n) for n in self.norms] if on_input else self.norms
        self._ratios = {}

    def ratio(self, layer, target):
        """h_L = rmsnorm(x) * n_L, so rmsnorm(x) * n_T = h_L * (n_T / n_L)
        (n_T = 1 for a router on the layer input)."""
        key = (layer, target)
        if key not in self._ratios:
            self._ratios[key] = _ratio(self.router_norms[target], self.norms[layer])
        return self._ratios[key]

    def predict(self, layer, h, limit, target=None):
        """Experts of layer `target` (default layer+1) ranked by how many of the
        batch's tokens they are predicted for (then by router probability), at
        most `limit` of them."""
        nxt = layer + 1 if target is None else target
        z = np.ascontiguousarray(h * self.ratio(layer, nxt), dtype=np.float32)  # (T, E)
        logits = self.routers[nxt] @ z  # (T, X)
        if self.biases[nxt] is not None:
            logits = logits + self.biases[nxt]  # (T, X) the router's bias (gpt-oss)
        if logits.shape[0] == 1:
            return np.argsort(-logits[0], kind="stable")[: min(self.k, limit)]
        top = np.argpartition(-logits, self.k - 1, axis=-1)[:, : self.k]  # (T, k)
        votes = np.bincount(top.reshape(-1), minlength=logits.shape[1])  # (X,)
        order = np.lexsort((-logits.max(axis=0), -votes))
        return order[votes[order] > 0][:limit]


def _ratio(num, den):
    """num / den elementwise, 0 where den is 0."""
    safe = np.where(den != 0, den, np.float32(1))
    return np.where(den != 0, num / safe, np.float32(0)).astype(np.float32)


class LoadQueue:
    """Pending loads, lowest (priority, order) first; an expert is queued once,
    at the best priority it was asked for."""

    def __init__(self):
        self._heap = []  # (priority, seq, g, target) ; target = (layer, visit) or None
        self._best = {}  # g -> best queued priority
        self._seq = 0

    def push(self, g, priority, target=None):
        if self._best.get(g, float("inf")) <= priority:
            return False
        self._best[g] = priority
        self._seq += 1
        heapq.heappush(self._heap, (priority, self._seq, g, target))
        return True

    def peek(self):
        """The best live entry (priority, seq, g, target), dropping superseded ones."""
        while self._heap:
            prio, _, g, _ = self._heap[0]
            if self._best.get(g) == prio:
                return self._heap[0]
            heapq.heappop(self._heap)
        return None

    def pop(self):
        entry = heapq.heappop(self._heap)
        self._best.pop(entry[2], None)
        return entry

    def discard(self, g):
        self._best.pop(g, None)

    def queued(self, g):
        return g in self._best

    def clear(self):
        self._heap.clear()
        self._best.clear()

    def __len__(self):
        return len(self._best)


class Prefetcher:
    """The guesses of a `CachedStore`: after each layer's routing, the predicted
    experts of the next `depth` layers (the next token's first layer from
    popularity) join the load queue; on decode the guesses are scored so that
    later ones carry a confidence per predicted rank."""

    def __init__(self, predictor, table, queue, k, depth=1):
        self.predictor, self.table, self.queue, self.k = predictor, table, queue, k
        self.n_layer, self.n_expert = table.plan.n_layer, table.plan.n_expert
        self.prefetch_depth = depth  # layers guessed ahead
        self.prefetch_top = k  # guesses per layer (router's top ones)
        self._pred = [None] * self.n_layer  # per layer: (guesses, their ranks) or None
        self.exact_early = True  # announced experts are loaded first (`announce`)
        self._rank_hits = np.full(k, 1.0)  # per predicted rank: hits (+1 prior)
        self._rank_tries = np.full(k, 2.0)  # per predicted rank: tries (+2 prior)

    def guess(self, layer, x):
        """Queue the guesses that follow layer `layer`'s expert input x (T, E)."""
        tab, X = self.table, self.n_expert
        jobs = []  # (target layer, experts, confidence, priority)
        for d in range(1, self.prefetch_depth + 1):
            tgt = layer + d
            if tgt > self.n_layer or (tgt == self.n_layer and d > 1):
                break
            tgt %= self.n_layer
            served = tab.served[tgt * X : (tgt + 1) * X]  # (X,)
            if (tab.state[tgt * X : (tgt + 1) * X][served] == READY).all():
                continue  # nothing to fetch for that layer
            if tgt > layer:
                experts = self.predictor.predict(layer, x, self.prefetch_top, tgt)
                conf = self._rank_hits / self._rank_tries * (0.8 ** (d - 1))  # (k,)
                prio = PREDICTED + 0.1 * (d - 1)
            else:  # next token's first layer: popularity
                experts, conf, prio = tab.policy.likely(tgt, self.k), np.full(self.k, 0.5), HINTED
            keep = served[experts]  # experts served elsewhere are not guessed
            experts, conf = np.asarray(experts)[keep], conf[: len(keep)][keep]
            if d == 1 and tgt > layer:
                self._pred[tgt] = (experts, np.flatnonzero(keep))  # guesses and their ranks
            jobs.append((tgt, experts, conf, prio))
        if not jobs:
            return
        with tab.cond:
            tab.reserved[:] = False
            pushed = False
            for tgt, experts, conf, prio in jobs:
                gs = tgt * X + np.asarray(experts, np.int64)
                tab.reserved[gs] = True
                tab.policy.expect(gs, conf)
                for r, g in enumerate(gs):
                    if tab.state[g] == ABSENT:
                        pushed |= self.queue.push(
                            int(g), prio + r / 1000, (tgt, int(tab.visits[tgt]))
                        )
            if pushed:
                tab.cond.notify_all()

    def score(self, layer, used, n_tok):
        """Layer `layer` routed to experts `used`: count how the guesses for it did."""
        pred = self._pred[layer]
        self._pred[layer] = None
        if pred is None or n_tok != 1:
            return
        pred, ranks = pred
        right = np.isin(pred, used)
        c = self.table.counters
        c.predicted += len(pred)
        c.predicted_right += int(right.sum())
        c.actual_routed += int(self.table.served[layer * self.n_expert + used].sum())
        self._rank_tries[ranks] += 1
        self._rank_hits[ranks] += right

    def announce(self, layer, ids):
        """Layer `layer` will use exactly the experts in ids (T, k) (-1 = skipped):
        queue their loads ahead of every guess, keep them from eviction by guesses,
        and drop the queued guesses for that layer that they prove wrong."""
        if not self.exact_early:
            return
        tab, X = self.table, self.n_expert
        ids = np.asarray(ids)
        used = np.unique(ids[ids >= 0])  # (U,)
        base = layer * X
        gs = base + used.astype(np.int64)  # (U,)
        wrong = np.setdiff1d(np.arange(base, base + X), gs)  # (X - U,)
        with tab.cond:
            for g in wrong:
                self.queue.discard(int(g))
            tab.reserved[wrong] = False
            tab.reserved[gs] = True
            tab.policy.expect(gs, np.ones(len(gs)))
            tab.counters.announced += len(gs)
            pushed = False
            for r, g in enumerate(gs):
                if tab.state[g] == ABSENT and tab.served[g]:
                    pushed |= self.queue.push(
                        int(g), EXACT + r / 1000, (layer, int(tab.visits[layer]))
                    )
            if pushed:
                tab.cond.notify_all()

    def hint(self, layer, ids):
        """Queue loads of experts `ids` of `layer` at the hint priority."""
        tab = self.table
        with tab.cond:
            for e in np.unique(np.asarray(ids).reshape(-1)):
                g = layer * self.n_expert + int(e)
                if 0 <= e < self.n_expert and tab.state[g] == ABSENT and tab.served[g]:
                    self.queue.push(g, HINTED, (layer, int(tab.visits[layer])))
            tab.cond.notify_all()


class LoadSource(Protocol):
    """What `Loader` drives: a source of speculative loads, one at a time.

    `claim_next` and `finish` are called with `cond` held; `read` without it
    (it may take long and releases the GIL while it waits)."""

    cond: threading.Condition

    def claim_next(self) -> int | None:
        """The next expert to read, its place already reserved; None: nothing now."""

    def read(self, g: int) -> None:
        """Read expert g into its place."""

    def finish(self, g: int, err: BaseException | None) -> None:
        """The read of g ended; err is its exception, or None."""


class Loader(threading.Thread):
    """The background reader of a `LoadSource` (I/O only, never a kernel)."""

    def __init__(self, source: LoadSource):
        super().__init__(name="meldlite-expert-loader", daemon=True)
        self.source = source
        self.stopping = False

    def run(self):
        src, cond = self.source, self.source.cond
        while True:
            with cond:
                g = None
                while g is None:
                    if self.stopping:
                        return
                    g = src.claim_next()
                    if g is None:
                        cond.wait()
            err = None
            try:
                src.read(g)
            except BaseException as e:  # reported to the compute thread
                err = e
            with cond:
                src.finish(g, err)
                cond.notify_all()

    def stop(self):
        with self.source.cond:
            self.stopping = True
            self.source.cond.notify_all()
        self.join(timeout=10)
