"""The residency table: for every expert, whether it is cached, in which slot,
and who holds it; making room (eviction as the policy says) and evicting.

The compute thread and the loader thread share the table; `cond` guards all of
it (methods here expect it held unless they say otherwise) and is notified when
a load ends.
"""

import threading

import numpy as np

ABSENT, LOADING, READY = 0, 1, 2


class Residency:
    """State of the n = n_layer * n_expert experts g = layer * n_expert + e."""

    def __init__(self, plan, pools, policy, counters, drop_pages):
        n = plan.n_layer * plan.n_expert
        self.cond = threading.Condition()
        self.plan, self.pools, self.policy, self.counters = plan, pools, policy, counters
        self.drop_pages = drop_pages  # g -> None: give an evicted expert's pages back
        self.state = np.zeros(n, np.int8)  # (L*X,) ABSENT / LOADING / READY
        self.slot = np.full(n, -1, np.int64)  # (L*X,) slot of a cached expert
        self.pins = np.zeros(n, np.int32)  # (L*X,) compute thread is using / waiting for it
        self.protected = np.zeros(n, bool)  # (L*X,) kept for decode after a prefill
        self.reserved = np.zeros(n, bool)  # (L*X,) predicted for the next layer
        self.by_prefetch = np.zeros(n, bool)  # (L*X,) loaded by prefetch, not used yet
        self.errors = {}  # g -> exception of a failed background read
        self.served = plan.present.copy()  # (L*X,) experts this store is asked for
        self.load_count = np.zeros(n, np.int64)  # (L*X,) loads of each expert
        self.tick = 0  # layer visits so far (the policy's clock)
        self.layer_now = plan.n_layer - 1  # the layer running
        self.visits = np.zeros(plan.n_layer, np.int64)  # (L,) visits of each layer
        self.in_prefill = False  # the last batch had more than one token

    def visit(self, layer, gs, counts, n_tok, recent):
        """Layer `layer` runs a batch of n_tok tokens routed to experts gs (U,)
        (counts (X,) picks per expert, `recent` (X,) the last token's): pin them,
        count hits and misses, tell the policy. Returns their states (U,)."""
        c = self.counters
        self.tick += 1
        self.layer_now = layer
        self.visits[layer] += 1
        state = self.state[gs]  # (U,)
        hit = state == READY  # (U,)
        self.pins[gs] += 1
        c.moe_calls += 1
        c.expert_uses += len(gs)
        c.expert_hits += int(hit.sum())
        c.expert_misses += int((~hit).sum())
        c.prefetch_late += int((state == LOADING).sum())
        c.prefetch_useful += int(self.by_prefetch[gs[hit]].sum())
        self.by_prefetch[gs] = False
        self.policy.on_use(layer, counts, n_tok, self.tick, recent)
        return state

    def make_room(self, g, speculative, allow_protected=False, predicted=False):
        """Reserve space for expert g (evicting as the policy says); mark it LOADING.
        False if nothing may be evicted. Demand loads leave the experts protected
        for decode alone unless `allow_protected`; speculative loads also may not
        displace predicted experts, nor one the policy values more."""
        pools = self.pools
        while not pools.has_room(g):
            cand = (self.state == READY) & (self.pins == 0) & (pools.of == pools.of[g])
            if speculative:
                cand &= ~self.protected & ~self.reserved
            elif not allow_protected:
                cand &= ~self.protected
            idx = np.flatnonzero(cand)
            if idx.size == 0:
                return False
            victim = int(idx[np.argmin(self.policy.value(idx, self.layer_now))])
            if speculative and not self.policy.admit(g, victim, self.layer_now, predicted):
                return False
            self.evict(victim)
        self.claim(g)
        return True

    def claim(self, g):
        """Take a slot for g (there is room) and mark it LOADING."""
        self.slot[g] = self.pools.take(g)
        self.state[g] = LOADING

    def evict(self, g):
        self.drop_pages(g)
        self.release(g)
        self.counters.evictions += 1
        if self.by_prefetch[g]:
            self.counters.prefetch_wasted += 1
            self.by_prefetch[g] = False

    def release(self, g):
        """Give g's slot back: ABSENT (an eviction, or a failed read)."""
        self.pools.give(g, self.slot[g])
        self.state[g] = ABSENT
        self.slot[g] = -1

    def filling(self, g):
        """Is a slot of g's pool being filled now?"""
        return bool(((self.state == LOADING) & (self.pools.of == self.pools.of[g])).any())

    def loaded(self, g, speculative):
        """g's read ended well: READY, counted."""
        c, nbytes = self.counters, int(self.plan.read_bytes[g])
        self.state[g] = READY
        self.policy.on_load(g, self.tick)
        self.load_count[g] += 1
        c.loads += 1
        c.bytes_read += nbytes
        if speculative:
            c.bytes_read_prefetch += nbytes
            c.prefetch_issued += 1
            if self.pins[g] == 0:
                self.by_prefetch[g] = True  # useful if used before it is evicted
            else:
                c.prefetch_useful += 1  # late: the compute thread was waiting for it

    def failed(self, g, err, speculative):
        """g's read raised `err`: ABSENT again; the error is kept for the compute
        thread if it waits for g."""
        self.release(g)
        if self.pins[g] > 0 or not speculative:
            self.errors[g] = err

    def unpin(self, gs, held):
        """Drop one caller's pins on gs and forget them in `held` (takes `cond`)."""
        gs = [int(g) for g in gs if int(g) in held]
        if not gs:
            return
        with self.cond:
            self.pins[gs] -= 1
        held.difference_update(gs)

    # -- prefill protection (these take `cond`) ------------------------------------

    def track_phase(self, layer, n_tok):
        """Prefill (batches) vs decode (one token): a new prefill, and the first
        decode step after one, end the protection."""
        if n_tok > 1 and layer == 0:
            self.in_prefill = True
            self.unprotect()
        elif n_tok == 1 and self.in_prefill:
            self.in_prefill = False
            self.unprotect()

    def protect(self, layer, quota):
        """After a prefill batch ran `layer`: keep the `quota` experts its last tokens
        make most likely (the policy's ranking), if cached, through the rest of the
        prefill, so that decoding starts with them cached."""
        if quota == 0:
            return
        with self.cond:
            best = layer * self.plan.n_expert + np.asarray(
                self.policy.likely(layer, quota), np.int64
            )
            self.protected[best[self.state[best] == READY]] = True

    def unprotect(self):
        with self.cond:
            self.protected[:] = False
