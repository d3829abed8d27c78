"""The cache's memory: slot pools and how a budget is split between them.

With slabs ("direct", "pread") every size class of expert gets one `SlabPool`
of equal slots, the budget split between the classes in proportion to their
share of the expert bytes (`split_budget`). With the memory map ("mmap") one
`BytePool` counts the mapped bytes. `SlotPools` holds them all and knows which
pool each expert's slot comes from.
"""

import mmap

import numpy as np

from meldlite.errors import BudgetError
from meldlite.experts import io as eio
from meldlite.units import format_bytes


class SlabPool:
    """n_slots slots of slot_bytes each, in one anonymous mapping (slab mechanisms).

    The mapping is committed page by page as slots are first filled, so RSS grows
    up to the pool's size and no further."""

    def __init__(self, slot_bytes, n_slots):
        self.slot_bytes, self.n_slots = int(slot_bytes), int(n_slots)
        self.capacity = self.slot_bytes * self.n_slots
        self._mem = mmap.mmap(-1, max(self.capacity, eio.PAGE))
        self.buf = np.frombuffer(self._mem, np.uint8)  # (capacity,)
        self._free = list(range(self.n_slots - 1, -1, -1))

    def has_room(self, nbytes):
        return bool(self._free)

    def take(self, nbytes):
        return self._free.pop()

    def give(self, nbytes, slot):
        self._free.append(slot)

    def view(self, slot, offset, nbytes):
        start = slot * self.slot_bytes + offset
        return self.buf[start : start + nbytes]


class BytePool:
    """A byte budget for experts that live in the memory map (mmap mechanism)."""

    def __init__(self, capacity):
        self.capacity, self.used = int(capacity), 0
        self.n_slots = None

    def has_room(self, nbytes):
        return self.used + nbytes <= self.capacity

    def take(self, nbytes):
        self.used += int(nbytes)
        return 0

    def give(self, nbytes, slot):
        self.used -= int(nbytes)


def split_budget(budget, sizes):
    """Slots per size class: {slot_bytes: n_slots}, splitting `budget` in
    proportion to each class's share of the expert bytes (every class gets at
    least one slot; then leftover bytes go to the class with the smallest share
    of its experts cached)."""
    classes, counts = np.unique(sizes, return_counts=True)
    total = float((classes * counts).sum())
    n = np.minimum(counts, np.floor(budget * counts / total * 1.0)).astype(np.int64)
    n = np.maximum(n, 1)
    left = budget - int((n * classes).sum())
    while True:
        open_ = np.flatnonzero((n < counts) & (classes <= left))
        if open_.size == 0:
            break
        c = open_[np.argmin(n[open_] / counts[open_])]
        n[c] += 1
        left -= int(classes[c])
    return {int(s): int(k) for s, k in zip(classes, n)}, left


def minimum_budget(sizes, present, n_layer, k, slabs):
    """The smallest budget a store can run in: the k largest experts of the layer
    where they are largest (pruned experts have size 0 and every layer keeps at
    least k), and with slabs at least one slot of every size class."""
    per_layer = np.sort(sizes.reshape(n_layer, -1), axis=1)[:, ::-1]
    minimum = int(per_layer[:, :k].sum(axis=1).max())
    if slabs:
        minimum = max(minimum, int(np.unique(sizes[present]).sum()))
    return minimum


class SlotPools:
    """The pools of a store of `budget` bytes, and the pool of each expert.

    sizes (L*X,): bytes an expert takes in its pool (a slab slot, or the whole
    pages it maps). Raises BudgetError below `minimum_budget`."""

    def __init__(self, plan, budget, k, slabs):
        self.slabs = slabs
        self.sizes = sizes = plan.nbytes if slabs else plan.span  # (L*X,)
        self.budget = int(budget)
        self.minimum = minimum_budget(sizes, plan.present, plan.n_layer, k, slabs)
        if self.budget < self.minimum:
            err = BudgetError(
                f"mem_budget {format_bytes(self.budget)} is too small: this model needs at "
                f"least {format_bytes(self.minimum)} ({self.minimum} bytes: the {k} largest "
                f"experts of one layer); its experts total {format_bytes(plan.expert_bytes)}"
            )
            err.minimum = self.minimum  # for mem_limit's message (experts/limit.py)
            raise err
        if slabs:
            split, _ = split_budget(self.budget, sizes[plan.present])
            self.pools = [SlabPool(s, n) for s, n in sorted(split.items())]
            index = {p.slot_bytes: i for i, p in enumerate(self.pools)}
            index[0] = 0  # pruned experts: never loaded
            self.of = np.array([index[int(s)] for s in sizes], np.int64)  # (L*X,)
        else:
            self.pools = [BytePool(min(self.budget, int(sizes.sum())))]
            self.of = np.zeros(len(sizes), np.int64)  # (L*X,)
        self.capacity_bytes = sum(p.capacity for p in self.pools)
        self.capacity_experts = int(self.capacity_bytes // max(1, np.mean(sizes[plan.present])))

    def __iter__(self):
        return iter(self.pools)

    def has_room(self, g):
        return self.pools[self.of[g]].has_room(int(self.sizes[g]))

    def take(self, g):
        """A slot for expert g (call has_room first)."""
        return self.pools[self.of[g]].take(int(self.sizes[g]))

    def give(self, g, slot):
        self.pools[self.of[g]].give(int(self.sizes[g]), int(slot))

    def view(self, g, slot, offset, nbytes):
        """uint8 (nbytes,) of expert g's slab slot, from `offset` (slabs only)."""
        return self.pools[self.of[g]].view(int(slot), offset, nbytes)
