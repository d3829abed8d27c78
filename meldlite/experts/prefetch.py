"""Predictive prefetch: guess the next layer's experts and load them in the background.

- `RoutePredictor` (compute thread): applies layer L+1's ffn_norm and router to
  layer L's hidden state (the input of layer L's experts) and takes its top-k.
  The residual stream changes little from one layer to the next, so this
  guesses ~80% of the next layer's experts on the trained model
  (../shared/models/README.md). It runs a small (n_expert x n_embd) matmul on the
  compute thread, like every kernel.
- `LoadQueue`: pending speculative loads by priority (predictions in rank order,
  then popularity guesses), one entry per expert.
- `Loader` (background thread): takes the next load the store allows (the store
  decides what it may evict), reads it with os.preadv / madvise (which release
  the GIL) and marks it ready. It never calls a Numba kernel, so the compute
  thread is the only one using Numba's threading layer.

Misses the compute thread needs now are read by the compute thread itself (no
hand-off between threads), and the guesses still queued for that layer are
dropped. So a wrong guess costs at most the one read in flight when the compute
thread needs the device, and a right guess still in flight when its layer runs
is waited for instead of read again: it costs no more than the miss would have.
"""

import heapq
import threading

import numpy as np

PREDICTED = 1  # priority band of predicted loads (plus rank / 1000)
HINTED = 2  # popularity fallback and external hints


class RoutePredictor:
    """Top-k guesses of layer L+1's experts from layer L's expert input."""

    def __init__(self, weights, cfg):
        self.cfg = cfg
        self.k = cfg.n_expert_used
        self.routers = [weights[f"blk.{i}.ffn_gate_inp.weight"] for i in range(cfg.n_layer)]
        self.norms = [
            np.asarray(weights[f"blk.{i}.ffn_norm.weight"], np.float32) for i in range(cfg.n_layer)
        ]
        self._ratios = {}

    def ratio(self, layer, target):
        """h_L = rmsnorm(x) * n_L, so rmsnorm(x) * n_T = h_L * (n_T / n_L)."""
        key = (layer, target)
        if key not in self._ratios:
            self._ratios[key] = _ratio(self.norms[target], self.norms[layer])
        return self._ratios[key]

    def predict(self, layer, h, limit, target=None):
        """Experts of layer `target` (default layer+1) ranked by how many of the
        batch's tokens they are predicted for (then by router probability), at
        most `limit` of them."""
        nxt = layer + 1 if target is None else target
        z = np.ascontiguousarray(h * self.ratio(layer, nxt), dtype=np.float32)  # (T, E)
        logits = self.routers[nxt] @ z  # (T, X)
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


class Loader(threading.Thread):
    """The background reader of a `CachedStore` (I/O only, never a kernel)."""

    def __init__(self, store):
        super().__init__(name="meldlite-expert-loader", daemon=True)
        self.store = store
        self.stopping = False

    def run(self):
        st = self.store
        cond = st._cond
        while True:
            with cond:
                job = None
                while job is None:
                    if self.stopping:
                        return
                    job = st._claim_next()
                    if job is None:
                        cond.wait()
            err = None
            try:
                st._read(job)
            except BaseException as e:  # reported to the compute thread
                err = e
            with cond:
                st._finish(job, err)
                cond.notify_all()

    def stop(self):
        with self.store._cond:
            self.stopping = True
            self.store._cond.notify_all()
        self.join(timeout=10)
