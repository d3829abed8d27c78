"""The memory-budgeted expert store: a cache of experts in bounded memory,
filled from the model file on demand and ahead of time by predictive prefetch.

`CachedStore` computes; its parts each have a module:
- plan.py: which bytes of the file hold which expert (`ExpertPlan`);
- pools.py: the slot pools a budget is split into (`SlotPools`);
- residency.py: per expert its state, slot and pins; making room, evicting;
- loads.py: reading an expert by mechanism ("direct" O_DIRECT reads into slabs,
  the default; "pread"; "mmap"), page-cache hygiene, and who reads what when;
- prefetch.py: the guesses and the background loader thread;
- counters.py: named counters, timers and running estimates.

The compute thread (the one calling `moe`) is the only one that runs kernels and
the only one that writes the kernels' `mats` list; the loader thread only reads
files into slots. State shared by the two (the residency table, the load queue,
the policy, counters) is guarded by one condition variable, `table.cond`.

Results are bit-identical to `ResidentStore`: when all of a layer's experts are
cached at once the same `moe_ffn` call runs; otherwise the experts are computed
in groups, each (token, slot) pair with weight 1 (y = 0 + 1*y exactly), and the
pairs are added per token in slot order as `moe_ffn` adds them (`kernels.sum_slots`).
"""

import time
from dataclasses import asdict
from functools import partial

import numpy as np

from meldlite import kernels
from meldlite.errors import OptionError
from meldlite.experts import io as eio
from meldlite.experts.counters import CacheCounters, CacheTimers, Estimates
from meldlite.experts.loads import ExpertReader, Loads
from meldlite.experts.plan import ExpertPlan
from meldlite.experts.policy import make_policy
from meldlite.experts.pools import SlotPools
from meldlite.experts.prefetch import Loader, Prefetcher, RoutePredictor
from meldlite.experts.residency import ABSENT, LOADING, READY, Residency
from meldlite.experts.store import ExpertStore, expert_matrices, layer_biases
from meldlite.options import MECHANISMS

__all__ = ["MECHANISMS", "READY", "CachedStore"]

F32 = np.float32


class CachedStore(ExpertStore):
    """Experts in a cache of `budget` bytes, loaded from the file when routed to.

    See the module docstring; options are documented in `meldlite.load`."""

    def __init__(
        self,
        gguf,
        cfg,
        weights,
        budget,
        *,
        policy="forecast",
        prefetch=True,
        mechanism="direct",
        llama_numerics=True,
        io_throttle=None,
        prior=None,
        drop_cache=True,
        prefetch_depth=1,
    ):
        if mechanism not in MECHANISMS:
            raise OptionError(f"expert_io {mechanism!r} is not one of {', '.join(MECHANISMS)}")
        self.cfg = cfg
        self.n_layer, self.n_expert, self.k = cfg.n_layer, cfg.n_expert, cfg.n_expert_used
        self.llama_numerics = llama_numerics
        self.reader = ExpertReader(gguf, mechanism, io_throttle, drop_cache)
        self.mechanism, self.slabs = self.reader.mechanism, self.reader.slabs
        self.plan = plan = ExpertPlan(gguf, cfg, eio.DIO_ALIGN if self.reader.file.direct else 1)
        self.pools = SlotPools(plan, budget, self.k, self.slabs)
        self.reader.quiet_map(plan, willneed=not weights.resident_bytes)

        self.types = [np.ascontiguousarray(plan.types[i]) for i in range(self.n_layer)]
        self.bias = layer_biases(gguf, cfg)  # per layer (X, 2F+E) or (0, 0), resident
        self.act = cfg.traits.expert_act
        if not self.slabs:
            self.mats = [
                expert_matrices(gguf, i, self.n_expert, cfg.n_embd, cfg.n_ff_exp)[0]
                for i in range(self.n_layer)
            ]
        else:
            self.mats = [
                kernels.expert_list([None] * (3 * self.n_expert)) for _ in range(self.n_layer)
            ]
        self._bound = np.full(self.n_layer * self.n_expert, -1, np.int64)  # (L*X,) slot bound

        self.counters, self.timers, self.estimates = CacheCounters(), CacheTimers(), Estimates()
        self.policy = make_policy(policy, self.n_layer, self.n_expert, self.k, prior)
        drop = partial(self.reader.drop_pages, plan)
        self.table = Residency(plan, self.pools, self.policy, self.counters, drop)
        # prefill protection: experts kept per layer for decode (a share of the cache)
        self._protect_quota = max(0, (self.pools.capacity_experts - self.k) // self.n_layer)
        self.loads = Loads(self.reader, self.table, self.timers, self.estimates)
        self.prefetcher = self.loader = None
        if prefetch:
            predictor = RoutePredictor(weights, cfg)
            self.prefetcher = Prefetcher(
                predictor, self.table, self.loads.queue, self.k, prefetch_depth
            )
            self.loader = Loader(self.loads)
            self.loader.start()

    # -- the ExpertStore interface -----------------------------------------------

    def moe(self, layer, x, ids, weights):
        ids = np.asarray(ids)
        weights = np.asarray(weights, dtype=F32)
        n_tok, X, tab = x.shape[0], self.n_expert, self.table
        tab.track_phase(layer, n_tok)
        counts = np.bincount(ids[ids >= 0], minlength=X)  # (X,)
        used = np.flatnonzero(counts)
        gs = layer * X + used  # (U,)
        recent = np.zeros(X, bool)  # (X,)
        if n_tok:
            recent[ids[-1][ids[-1] >= 0]] = True
        if self.prefetcher is not None:
            self.prefetcher.score(layer, used, n_tok)
        with tab.cond:
            state = tab.visit(layer, gs, counts, n_tok, recent)
            hit = state == READY
            for g in gs[state == ABSENT]:
                self.loads.queue.discard(int(g))  # read below, on this thread
        held = {int(g) for g in gs}  # pinned by this call until computed
        try:
            if self.prefetcher is not None:
                self.prefetcher.guess(layer, x)
            if hit.all():
                out = self._compute_all(layer, x, ids, weights, gs)
            else:
                out = self._compute_missing(layer, x, ids, weights, gs, hit, state, held)
        finally:
            tab.unpin(list(held), held)
        if n_tok > 1:
            tab.protect(layer, self._protect_quota)
        return out

    def hint(self, layer, ids):
        """Queue background loads of experts `ids` of `layer` (ignored without prefetch)."""
        if self.prefetcher is not None:
            self.prefetcher.hint(layer, ids)

    def announce(self, layer, ids):
        """Load exactly the experts `ids` (T, k) of `layer` first, in the background
        (its router ran before its attention; ignored without prefetch)."""
        if self.prefetcher is not None:
            self.prefetcher.announce(layer, ids)

    def preload(self, order):
        """Read the experts `order` (global ids, most wanted first) into the cache
        until it is full, on this thread; returns how many were read. An expert
        that does not fit (its size class is full) is skipped, not made room for."""
        n, tab = 0, self.table
        for g in np.asarray(order, np.int64):
            g = int(g)
            with tab.cond:
                if tab.state[g] != ABSENT or not self.plan.present[g] or not self.pools.has_room(g):
                    continue
                tab.claim(g)
            self.loads.read_claimed(g)
            with tab.cond:
                self.counters.loads_preload += 1
            n += 1
        return n

    def serve_only(self, mask):
        """Only the experts where mask (n_layer, n_expert) is True will be asked of
        this store (a peer coordinator's local share): prefetch guesses no others.
        Demand reads (e.g. a failover) are served as before."""
        mask = np.asarray(mask, bool)
        if mask.shape != (self.n_layer, self.n_expert):
            raise OptionError(
                f"served-expert mask has shape {mask.shape}, the model needs "
                f"({self.n_layer}, {self.n_expert})"
            )
        with self.table.cond:
            self.table.served = mask.reshape(-1) & self.plan.present
            for g in np.flatnonzero(~self.table.served):
                self.loads.queue.discard(int(g))

    def stats(self):
        tab = self.table
        with tab.cond:
            c = asdict(self.counters)
            t = asdict(self.timers)
            cached = int((tab.state == READY).sum())
            loads_pruned = int(tab.load_count[~self.plan.present].sum())
        throttle = self.reader.file.throttle
        return {
            **c,
            **t,
            "hit_rate": c["expert_hits"] / max(1, c["expert_uses"]),
            "prefetch_precision": c["prefetch_useful"] / max(1, c["prefetch_issued"]),
            "prefetch_recall": c["prefetch_useful"]
            / max(1, c["prefetch_useful"] + c["expert_misses"]),
            "predictor_precision": c["predicted_right"] / max(1, c["predicted"]),
            "predictor_recall": c["predicted_right"] / max(1, c["actual_routed"]),
            "experts_cached": cached,
            "budget_bytes": self.pools.budget,
            "cache_bytes": self.pools.capacity_bytes,
            "min_budget_bytes": self.pools.minimum,
            "expert_bytes": self.plan.expert_bytes,
            "experts_present": int(self.plan.present.sum()),
            "loads_pruned": loads_pruned,
            "cache_policy": self.policy.name,
            "expert_io": self.mechanism,
            "prefetch": self.loader is not None,
            "io_throttle_bytes_per_s": throttle.bytes_per_s if throttle else None,
        }

    def close(self):
        if self.loader is not None:
            self.loader.stop()
            self.loader = None
        self.reader.close()

    # -- compute -------------------------------------------------------------

    def _bind(self, layer, gs):
        """Point the kernel's mats entries of experts gs at their slots (pread)."""
        if not self.slabs:
            return
        mats = self.mats[layer]
        for g in gs:
            s = int(self.table.slot[g])
            if self._bound[g] == s:
                continue
            arrays = [
                self.pools.view(g, s, off, rows * rb).reshape(rows, rb)
                for off, rows, rb in self.plan.mats[g]
            ]
            kernels.set_expert(mats, int(g - layer * self.n_expert), *arrays)
            self._bound[g] = s

    def _kernel(self, layer, x, ids, weights):
        """`kernels.moe_ffn` on layer's experts (bound to their slots)."""
        return kernels.moe_ffn(
            x,
            ids,
            weights,
            self.mats[layer],
            self.types[layer],
            llama_numerics=self.llama_numerics,
            act=self.act,
            bias=self.bias[layer],
        )

    def _compute_all(self, layer, x, ids, weights, gs, n_pairs=None):
        self._bind(layer, gs)
        t0 = time.perf_counter()
        out = self._kernel(layer, x, ids, weights)
        self.estimates.note_compute(time.perf_counter() - t0, n_pairs or int((ids >= 0).sum()))
        return out

    def _compute_group(self, layer, x, ids, gs, Y):
        """Y[t, j] = expert ids[t, j]'s output for token t, for the experts in gs."""
        self._bind(layer, gs)
        mask = np.isin(ids, gs - layer * self.n_expert)  # (T, k)
        t_idx, j_idx = np.nonzero(mask)
        xp = np.ascontiguousarray(x[t_idx], dtype=F32)  # (P, E)
        ip = np.ascontiguousarray(ids[t_idx, j_idx][:, None], dtype=np.int32)  # (P, 1)
        wp = np.ones((len(t_idx), 1), F32)  # (P, 1)
        t0 = time.perf_counter()
        Y[t_idx, j_idx] = self._kernel(layer, xp, ip, wp)
        self.estimates.note_compute(time.perf_counter() - t0, len(t_idx))
        self.counters.groups_split += 1

    def _compute_missing(self, layer, x, ids, weights, gs, hit, state, held):
        """Read the missing experts nobody is loading (on this thread, as on demand:
        no hand-off), wait for those the loader has in flight, and compute. The
        cached experts are computed first, while the loads run, when that overlap
        is worth a second kernel call; experts are also computed early (and
        released) when the budget cannot hold the whole layer at once."""
        Y = None
        ready = [int(g) for g in gs[hit]]
        inflight = [int(g) for g in gs[state == LOADING]]
        absent = [int(g) for g in gs[state == ABSENT]]
        absent.sort(key=lambda g: self.plan.offset[g])

        def flush():  # `ready` is emptied in place: callers hold the list
            nonlocal Y
            if Y is None:
                Y = np.zeros((*ids.shape, x.shape[1]), F32)  # (T, k, E)
            self._compute_group(layer, x, ids, np.array(sorted(ready), np.int64), Y)
            self.table.unpin(ready, held)
            ready.clear()

        hit_pairs = int(np.isin(ids, gs[hit] - layer * self.n_expert).sum())
        missing_bytes = int(self.plan.read_bytes[inflight + absent].sum())
        if ready and inflight and self.estimates.worth_splitting(hit_pairs, missing_bytes):
            flush()
        while absent or inflight:
            if absent:
                self.loads.read_demand(absent, ready, inflight, flush)
            else:
                done, lost = self.loads.wait_any(inflight)
                inflight = [g for g in inflight if g not in done and g not in lost]
                ready += done
                absent += lost  # its background read failed: read it here
        if Y is None:
            return self._compute_all(layer, x, ids, weights, gs)
        if ready:
            flush()
        T, k, E = Y.shape  # pair (t, j) sits in row t * k + j
        rows = np.arange(T * k).reshape(T, k)  # (T, k)
        return kernels.sum_slots(ids, weights, Y.reshape(T * k, E), rows)  # (T, E)
