"""The memory-budgeted expert store: a cache of experts in bounded memory,
filled from the model file on demand and ahead of time by predictive prefetch.

Three mechanisms hold the cached experts (`mechanism=`):
- "direct" (default): preallocated slabs (one anonymous mapping per size class
  of expert, `budget` bytes in all); a miss reads the expert's byte range from
  the file into a free slot with os.preadv on an O_DIRECT descriptor (one read
  per expert in the per-expert layout, whole 4 kB blocks, no page cache
  involved). Falls back to "pread" where the file system refuses O_DIRECT.
- "pread": the same slabs, buffered reads; the range read is then dropped from
  the page cache (POSIX_FADV_DONTNEED).
- "mmap": the experts stay in the file's memory map; a load faults the pages in
  (MADV_POPULATE_READ), an eviction unmaps them (MADV_DONTNEED) and drops them
  from the page cache; the budget bounds the mapped pages.
In both, the memory map's expert ranges are set MADV_RANDOM (no read-around) and
never touched outside a load, so no expert page is resident unless it is cached.

The compute thread (the one calling `moe`) is the only one that runs kernels and
the only one that writes the kernels' `mats` list; the loader thread only reads
files into slots. State shared by the two (slot states, pins, the load queue,
the policy, counters) is guarded by one condition variable.

Results are bit-identical to `ResidentStore`: when all of a layer's experts are
cached at once the same `moe_ffn` call runs; otherwise the experts are computed
in groups, each (token, slot) pair with weight 1 (y = 0 + 1*y exactly), and the
pairs are added per token in slot order as `moe_ffn` adds them (see `combine`).
"""

import mmap
import time

import numpy as np

from meldlite import kernels
from meldlite.errors import BudgetError, FormatError, OptionError
from meldlite.experts import io as eio
from meldlite.experts.adaptive import skip_light_experts
from meldlite.experts.policy import make_policy
from meldlite.experts.prefetch import HINTED, PREDICTED, Loader, LoadQueue, RoutePredictor
from meldlite.experts.store import ExpertStore, expert_matrices
from meldlite.options import MECHANISMS
from meldlite.units import format_bytes

ABSENT, LOADING, READY = 0, 1, 2
KINDS = ("gate", "up", "down")
SLOT_ALIGN = 64  # slab slots start on cache-line boundaries
SPLIT_COST = 3e-4  # seconds an extra kernel call + combine cost (measured, docs/experts.md)
F32 = np.float32


class ExpertPlan:
    """Where each expert's bytes are in the file and where they go in a slab.

    Experts are numbered g = layer * n_expert + e. With `align` > 1 (O_DIRECT)
    every read covers whole align-sized blocks and lands on an aligned slab
    offset; the matrices then start a little way into their slot. A pruned
    expert left out of the file (never routed) has no ranges, 0 bytes and
    `present[g]` False; its types are a stored expert's of the same layer."""

    def __init__(self, gguf, cfg, align=1):
        L, X = cfg.n_layer, cfg.n_expert
        n = L * X
        self.n_layer, self.n_expert, self.align = L, X, align
        self.ranges = []  # per g: [(file offset, nbytes)] of its tensors
        self.reads = []  # per g: [(file offset, nbytes, slab offset, need)]
        self.mats = []  # per g: 3 x (slab offset, rows, row_bytes)
        self.nbytes = np.zeros(n, np.int64)  # (L*X,) bytes of a slab slot
        self.read_bytes = np.zeros(n, np.int64)  # (L*X,) bytes one load reads
        self.span = np.zeros(n, np.int64)  # (L*X,) whole pages the ranges cover
        self.offset = np.zeros(n, np.int64)  # (L*X,) file offset of the first byte
        self.types = np.zeros((L, X, 3), np.int32)  # (L, X, 3) ggml type ids
        self.present = np.array(
            [gguf.expert_present(layer, e) for layer in range(L) for e in range(X)], bool
        )  # (L*X,) stored in the file
        want = {
            "gate": (cfg.n_ff_exp, cfg.n_embd),
            "up": (cfg.n_ff_exp, cfg.n_embd),
            "down": (cfg.n_embd, cfg.n_ff_exp),
        }
        for layer in range(L):
            for e in range(X):
                g = layer * X + e
                if not self.present[g]:
                    self.ranges.append([])
                    self.reads.append([])
                    self.mats.append(None)
                    continue
                ranges = gguf.expert_ranges(layer, e)
                reads, pos = [], 0
                for off, nb in ranges:
                    start = off // align * align
                    length = -(-(off + nb) // align) * align - start
                    reads.append((start, length, pos, off + nb - start))
                    pos += length
                mats = []
                for j, kind in enumerate(KINDS):
                    t = gguf.expert_tensor(layer, kind, e)
                    if tuple(t.shape) != want[kind]:
                        raise FormatError(
                            f"layer {layer} expert {e} {kind} has shape {t.shape}, "
                            f"expected {want[kind]}"
                        )
                    start, _, at, _need = next(r for r in reads if r[0] <= t.offset < r[0] + r[3])
                    mats.append((at + t.offset - start, t.raw.shape[0], t.raw.shape[1]))
                    self.types[layer, e, j] = int(t.ggml_type)
                self.ranges.append(ranges)
                self.reads.append(reads)
                self.mats.append(mats)
                self.nbytes[g] = -(-pos // max(align, SLOT_ALIGN)) * max(align, SLOT_ALIGN)
                self.read_bytes[g] = pos
                self.span[g] = sum(eio.page_span(off, nb)[1] for off, nb in ranges)
                self.offset[g] = ranges[0][0]
        for layer in range(L):
            stored = self.present[layer * X : (layer + 1) * X]  # (X,)
            self.types[layer, ~stored] = self.types[layer, np.argmax(stored)]
            kernels.check_types(self.types[layer])

    @property
    def expert_bytes(self):
        """Bytes of all expert tensors in the file."""
        return int(sum(nb for ranges in self.ranges for _, nb in ranges))

    def min_budget(self, k, sizes):
        """Bytes of the k largest experts of the layer where they are largest
        (pruned experts have size 0 and every layer keeps at least k)."""
        per_layer = np.sort(sizes.reshape(self.n_layer, self.n_expert), axis=1)[:, ::-1]
        return int(per_layer[:, :k].sum(axis=1).max())


class SlabPool:
    """n_slots slots of slot_bytes each, in one anonymous mapping (pread mechanism).

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


def combine(ids, weights, Y):
    """out[t] = sum over slots j in order, ids[t, j] >= 0, of weights[t, j] * Y[t, j],
    in float32 from 0.0 -- the same operations, in the same order, as moe_ffn's
    combine step."""
    T, k = ids.shape
    out = np.zeros((T, Y.shape[2]), F32)  # (T, E)
    for j in range(k):
        m = ids[:, j] >= 0  # (T,)
        if m.all():
            out += weights[:, j, None] * Y[:, j]
        elif m.any():
            out[m] += weights[m, j, None] * Y[m, j]
    return out


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
        min_expert_weight=None,
        io_throttle=None,
        prior=None,
        drop_cache=True,
        prefetch_depth=1,
    ):
        if mechanism not in MECHANISMS:
            raise OptionError(f"expert_io {mechanism!r} is not one of {', '.join(MECHANISMS)}")
        self.cfg = cfg
        self.n_layer, self.n_expert, self.k = cfg.n_layer, cfg.n_expert, cfg.n_expert_used
        self.mechanism = mechanism
        self._round = llama_numerics
        self.min_weight = min_expert_weight
        tensor0 = gguf.expert_tensor(0, "gate", 0)
        map_base = tensor0.raw.ctypes.data - tensor0.offset
        self.file = eio.ExpertFile(
            gguf.path,
            eio.Throttle(io_throttle) if io_throttle else None,
            drop_cache=drop_cache,
            map_base=map_base,
            map_size=gguf.path.stat().st_size,
            direct=mechanism == "direct",
        )
        if mechanism == "direct" and not self.file.direct:
            mechanism = self.mechanism = "pread"  # the file system refuses O_DIRECT
        self.slabs = mechanism != "mmap"
        self.plan = plan = ExpertPlan(gguf, cfg, eio.DIO_ALIGN if self.file.direct else 1)
        n = self.n_layer * self.n_expert
        self.sizes = plan.nbytes if self.slabs else plan.span
        self.budget = int(budget)
        self._init_pools()
        self._quiet_map(map_base)

        self.types = [np.ascontiguousarray(plan.types[i]) for i in range(self.n_layer)]
        if not self.slabs:
            self.mats = [
                expert_matrices(gguf, i, self.n_expert, cfg.n_embd, cfg.n_ff_exp)[0]
                for i in range(self.n_layer)
            ]
        else:
            self.mats = [
                kernels.expert_list([None] * (3 * self.n_expert)) for _ in range(self.n_layer)
            ]
        self._bound = np.full(n, -1, np.int64)  # (L*X,) slot each mats entry points to

        self.state = np.zeros(n, np.int8)  # (L*X,) ABSENT / LOADING / READY
        self.slot = np.full(n, -1, np.int64)  # (L*X,) slot of a cached expert
        self.pins = np.zeros(n, np.int32)  # (L*X,) compute thread is using / waiting for it
        self.protected = np.zeros(n, bool)  # (L*X,) kept for decode after a prefill
        self.reserved = np.zeros(n, bool)  # (L*X,) predicted for the next layer
        self.by_prefetch = np.zeros(n, bool)  # (L*X,) loaded by prefetch, not used yet
        self.errors = {}  # g -> exception of a failed background read
        self.served = plan.present.copy()  # (L*X,) experts this store is asked for
        self.load_count = np.zeros(n, np.int64)  # (L*X,) loads of each expert
        self.policy = make_policy(policy, self.n_layer, self.n_expert, self.k, prior)
        self.pool_of = self._pool_index()

        import threading

        self._cond = threading.Condition()
        self._queue = LoadQueue()
        self._tick = 0
        self._layer_now = self.n_layer - 1
        self._visits = np.zeros(self.n_layer, np.int64)
        self._in_prefill = False
        self._pred = [None] * self.n_layer
        self._rank_hits = np.full(self.k, 1.0)  # per predicted rank: hits (+1 prior)
        self._rank_tries = np.full(self.k, 2.0)  # per predicted rank: tries (+2 prior)
        self.prefetch_depth = prefetch_depth  # layers guessed ahead
        self.prefetch_top = self.k  # guesses per layer (router's top ones)
        self._t_pair = None  # running mean: kernel seconds per (token, expert)
        self._t_byte = None  # running mean: load seconds per byte
        self._demand = 0  # compute-thread reads under way: the loader waits
        self.c = dict.fromkeys(
            (
                "expert_hits",
                "expert_misses",
                "bytes_read",
                "bytes_read_prefetch",
                "loads",
                "loads_prefetch",
                "evictions",
                "prefetch_issued",
                "prefetch_useful",
                "prefetch_wasted",
                "prefetch_late",
                "prefetch_refused",
                "predicted",
                "predicted_right",
                "actual_routed",
                "experts_skipped",
                "routed_slots",
                "expert_uses",
                "moe_calls",
                "groups_split",
                "loads_preload",
            ),
            0,
        )
        self.t = dict.fromkeys(("stall_seconds", "io_seconds"), 0.0)
        self.predictor = RoutePredictor(weights, cfg) if prefetch else None
        self.loader = None
        if prefetch:
            self.loader = Loader(self)
            self.loader.start()

    # -- setup ---------------------------------------------------------------

    def _init_pools(self):
        plan, sizes = self.plan, self.sizes
        minimum = plan.min_budget(self.k, sizes)
        if self.slabs:
            classes = np.unique(sizes[plan.present])
            minimum = max(minimum, int(classes.sum()))
        self.min_budget = minimum
        if self.budget < minimum:
            raise BudgetError(
                f"mem_budget {format_bytes(self.budget)} is too small: this model needs at least "
                f"{format_bytes(minimum)} ({minimum} bytes: the {self.k} largest experts of one "
                f"layer); its experts total {format_bytes(plan.expert_bytes)}"
            )
        if self.slabs:
            split, _ = split_budget(self.budget, sizes[plan.present])
            self.pools = [SlabPool(s, k) for s, k in sorted(split.items())]
            self.capacity_bytes = sum(p.capacity for p in self.pools)
        else:
            self.pools = [BytePool(min(self.budget, int(sizes.sum())))]
            self.capacity_bytes = self.pools[0].capacity
        self.capacity_experts = int(self.capacity_bytes // max(1, np.mean(sizes[plan.present])))

    def _pool_index(self):
        if not self.slabs:
            return np.zeros(len(self.sizes), np.int64)
        index = {p.slot_bytes: i for i, p in enumerate(self.pools)}
        index[0] = 0  # pruned experts: never loaded
        return np.array([index[int(s)] for s in self.sizes], np.int64)

    def _quiet_map(self, map_base):
        """No expert page resident or cached now, and no read-around into expert
        pages later (see module doc). Opening the file already read its first
        read_ahead_kb (8 MB on the benchmark machine) into the page cache."""
        for ranges in self.plan.ranges:
            for off, nb in ranges:
                if map_base % eio.PAGE == 0:
                    self.file.advise(off, nb, eio.MADV_RANDOM, outward=True)
                    self.file.advise(off, nb, eio.MADV_DONTNEED, outward=False)
                if self.file.drop_cache:
                    eio.drop_range(self.file.fd, off, nb)

    # -- the ExpertStore interface -----------------------------------------------

    def moe(self, layer, x, ids, weights):
        ids = np.asarray(ids)
        weights = np.asarray(weights, dtype=F32)
        n_routed = int((ids >= 0).sum())
        self.c["routed_slots"] += n_routed
        if self.min_weight:
            ids, weights = skip_light_experts(ids, weights, self.min_weight)
            self.c["experts_skipped"] += n_routed - int((ids >= 0).sum())
        n_tok, X = x.shape[0], self.n_expert
        self._phase(layer, n_tok)
        valid = ids[ids >= 0]
        counts = np.bincount(valid, minlength=X)  # (X,)
        used = np.flatnonzero(counts)
        gs = layer * X + used  # (U,)
        recent = np.zeros(X, bool)  # (X,)
        if n_tok:
            recent[ids[-1][ids[-1] >= 0]] = True
        self._score_prediction(layer, used, n_tok)
        with self._cond:
            self._tick += 1
            self._layer_now = layer
            self._visits[layer] += 1
            state = self.state[gs]
            hit = state == READY
            self.pins[gs] += 1
            self.c["moe_calls"] += 1
            self.c["expert_uses"] += len(gs)
            self.c["expert_hits"] += int(hit.sum())
            self.c["expert_misses"] += int((~hit).sum())
            self.c["prefetch_late"] += int((state == LOADING).sum())
            self.c["prefetch_useful"] += int(self.by_prefetch[gs[hit]].sum())
            self.by_prefetch[gs] = False
            self.policy.on_use(layer, counts, n_tok, self._tick, recent)
            for g in gs[state == ABSENT]:
                self._queue.discard(int(g))  # read below, on this thread
        held = {int(g) for g in gs}  # pinned by this call until computed
        try:
            if self.predictor is not None:
                self._prefetch(layer, x)
            if hit.all():
                out = self._compute_all(layer, x, ids, weights, gs)
            else:
                out = self._compute_missing(layer, x, ids, weights, gs, hit, state, held)
        finally:
            self._unpin(list(held), held)
        if n_tok > 1:
            self._protect(layer)
        return out

    def hint(self, layer, ids):
        """Queue background loads of experts `ids` of `layer` (ignored without prefetch)."""
        if self.loader is None:
            return
        with self._cond:
            for e in np.unique(np.asarray(ids).reshape(-1)):
                g = layer * self.n_expert + int(e)
                if 0 <= e < self.n_expert and self.state[g] == ABSENT and self.served[g]:
                    self._queue.push(g, HINTED, (layer, int(self._visits[layer])))
            self._cond.notify_all()

    def preload(self, order):
        """Read the experts `order` (global ids, most wanted first) into the cache
        until it is full, on this thread; returns how many were read. An expert
        that does not fit (its size class is full) is skipped, not made room for."""
        n = 0
        for g in np.asarray(order, np.int64):
            g = int(g)
            with self._cond:
                pool = self.pools[self.pool_of[g]]
                if (
                    self.state[g] != ABSENT
                    or not self.plan.present[g]
                    or not pool.has_room(int(self.sizes[g]))
                ):
                    continue
                self.slot[g] = pool.take(int(self.sizes[g]))
                self.state[g] = LOADING
            self._read_claimed(g)
            with self._cond:
                self.c["loads_preload"] += 1
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
        with self._cond:
            self.served = mask.reshape(-1) & self.plan.present
            for g in np.flatnonzero(~self.served):
                self._queue.discard(int(g))

    def stats(self):
        with self._cond:
            c = dict(self.c)
            t = dict(self.t)
            cached = int((self.state == READY).sum())
            loads_pruned = int(self.load_count[~self.plan.present].sum())
        uses = max(1, c["expert_uses"])
        out = {
            k: c[k]
            for k in (
                "expert_hits",
                "expert_misses",
                "bytes_read",
                "prefetch_issued",
                "prefetch_useful",
            )
        }
        out["stall_seconds"] = t["stall_seconds"]
        out.update(
            hit_rate=c["expert_hits"] / uses,
            prefetch_precision=c["prefetch_useful"] / max(1, c["prefetch_issued"]),
            prefetch_recall=c["prefetch_useful"]
            / max(1, c["prefetch_useful"] + c["expert_misses"]),
            predictor_precision=c["predicted_right"] / max(1, c["predicted"]),
            predictor_recall=c["predicted_right"] / max(1, c["actual_routed"]),
            prefetch_late=c["prefetch_late"],
            prefetch_wasted=c["prefetch_wasted"],
            prefetch_refused=c["prefetch_refused"],
            predicted=c["predicted"],
            predicted_right=c["predicted_right"],
            actual_routed=c["actual_routed"],
            bytes_read_prefetch=c["bytes_read_prefetch"],
            loads=c["loads"],
            loads_preload=c["loads_preload"],
            evictions=c["evictions"],
            io_seconds=t["io_seconds"],
            experts_skipped=c["experts_skipped"],
            routed_slots=c["routed_slots"],
            expert_uses=c["expert_uses"],
            moe_calls=c["moe_calls"],
            groups_split=c["groups_split"],
            experts_cached=cached,
            budget_bytes=self.budget,
            cache_bytes=self.capacity_bytes,
            min_budget_bytes=self.min_budget,
            expert_bytes=self.plan.expert_bytes,
            experts_present=int(self.plan.present.sum()),
            loads_pruned=loads_pruned,
            cache_policy=self.policy.name,
            expert_io=self.mechanism,
            prefetch=self.loader is not None,
            io_throttle_bytes_per_s=self.file.throttle.bytes_per_s if self.file.throttle else None,
        )
        return out

    def close(self):
        if self.loader is not None:
            self.loader.stop()
            self.loader = None
        self.file.close()

    # -- compute -------------------------------------------------------------

    def _unpin(self, gs, held):
        """Drop this call's pins on gs and forget them in `held`."""
        gs = [int(g) for g in gs if int(g) in held]
        if not gs:
            return
        with self._cond:
            self.pins[gs] -= 1
        held.difference_update(gs)

    def _bind(self, layer, gs):
        """Point the kernel's mats entries of experts gs at their slots (pread)."""
        if not self.slabs:
            return
        mats = self.mats[layer]
        for g in gs:
            s = int(self.slot[g])
            if self._bound[g] == s:
                continue
            pool = self.pools[self.pool_of[g]]
            arrays = [
                pool.view(s, off, rows * rb).reshape(rows, rb)
                for off, rows, rb in self.plan.mats[g]
            ]
            kernels.set_expert(mats, int(g - layer * self.n_expert), *arrays)
            self._bound[g] = s

    def _compute_all(self, layer, x, ids, weights, gs, n_pairs=None):
        self._bind(layer, gs)
        t0 = time.perf_counter()
        out = kernels.moe_ffn(
            x, ids, weights, self.mats[layer], self.types[layer], round_acts=self._round
        )
        self._note_compute(time.perf_counter() - t0, n_pairs or int((ids >= 0).sum()))
        return out

    def _note_compute(self, seconds, n_pairs):
        if n_pairs:
            t = seconds / n_pairs
            self._t_pair = t if self._t_pair is None else 0.9 * self._t_pair + 0.1 * t

    def _compute_group(self, layer, x, ids, gs, Y):
        """Y[t, j] = expert ids[t, j]'s output for token t, for the experts in gs."""
        self._bind(layer, gs)
        mask = np.isin(ids, gs - layer * self.n_expert)  # (T, k)
        t_idx, j_idx = np.nonzero(mask)
        xp = np.ascontiguousarray(x[t_idx], dtype=F32)  # (P, E)
        ip = np.ascontiguousarray(ids[t_idx, j_idx][:, None], dtype=np.int32)  # (P, 1)
        wp = np.ones((len(t_idx), 1), F32)  # (P, 1)
        t0 = time.perf_counter()
        Y[t_idx, j_idx] = kernels.moe_ffn(
            xp, ip, wp, self.mats[layer], self.types[layer], round_acts=self._round
        )
        self._note_compute(time.perf_counter() - t0, len(t_idx))
        self.c["groups_split"] += 1

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
            self._unpin(ready, held)
            ready.clear()

        hit_pairs = int(np.isin(ids, gs[hit] - layer * self.n_expert).sum())
        if (
            ready
            and inflight
            and self._worth_splitting(hit_pairs, int(self.plan.read_bytes[inflight + absent].sum()))
        ):
            flush()
        while absent or inflight:
            if absent:
                self._read_demand(absent, ready, inflight, flush)
            else:
                done, lost = self._wait_any(inflight)
                inflight = [g for g in inflight if g not in done and g not in lost]
                ready += done
                absent += lost  # its background read failed: read it here
        if Y is None:
            return self._compute_all(layer, x, ids, weights, gs)
        if ready:
            flush()
        return combine(ids, weights, Y)

    def _read_demand(self, absent, ready, inflight, flush):
        """Read the experts in `absent` on this thread (emptying it; each one read
        joins `ready`). Meanwhile the loader starts no guess: demand first."""
        with self._cond:
            self._demand += 1
        try:
            while absent:
                g = absent.pop(0)
                if not self._claim_for_demand(g, ready, inflight, flush):
                    continue  # it turned out loaded / in flight
                t0 = time.perf_counter()
                self._read_claimed(g)
                self.t["stall_seconds"] += time.perf_counter() - t0
                ready.append(g)
        finally:
            with self._cond:
                self._demand -= 1
                self._cond.notify_all()

    def _claim_for_demand(self, g, ready, inflight, flush):
        """Reserve a slot for a demand read of g; False if g is loaded or in flight
        meanwhile (then it is added to `ready` / `inflight`)."""
        while True:
            with self._cond:
                if self.state[g] == READY:
                    ready.append(g)
                    return False
                if self.state[g] == LOADING:
                    inflight.append(g)
                    return False
                if self._make_room(g, speculative=False):
                    return True
                busy = bool(((self.state == LOADING) & (self.pool_of == self.pool_of[g])).any())
                if not ready and not busy and self._make_room(g, False, allow_protected=True):
                    return True
            if ready:  # the budget is full of this layer's experts: compute them
                flush()
            elif busy:  # slots are being filled in the background: wait for one
                t0 = time.perf_counter()
                with self._cond:
                    self._cond.wait(timeout=0.05)
                self.t["stall_seconds"] += time.perf_counter() - t0
            else:
                raise RuntimeError(
                    "expert cache: no slot can be freed"
                )  # budget >= one expert per class

    def _wait_any(self, inflight):
        """Block until some of the in-flight loads end: (ready ones, failed ones)."""
        t0 = time.perf_counter()
        try:
            with self._cond:
                while True:
                    done = [g for g in inflight if self.state[g] == READY]
                    lost = [g for g in inflight if self.state[g] == ABSENT]
                    for g in lost:
                        self.errors.pop(g, None)
                    if done or lost:
                        return done, lost
                    self._cond.wait(timeout=1.0)
        finally:
            self.t["stall_seconds"] += time.perf_counter() - t0

    def _worth_splitting(self, hit_pairs, missing_bytes):
        """Computing the cached experts while the rest loads saves
        min(their compute time, the load time); a split costs a kernel call and
        the combine. Estimates are running means of measured times."""
        if self._t_pair is None or self._t_byte is None:
            return True
        return min(hit_pairs * self._t_pair, missing_bytes * self._t_byte) > SPLIT_COST

    # -- cache bookkeeping (call with self._cond held) --------------------------

    def _make_room(self, g, speculative, allow_protected=False, predicted=False):
        """Reserve space for expert g (evicting as the policy says); mark it LOADING.
        False if nothing may be evicted. Demand loads leave the experts protected
        for decode alone unless `allow_protected`; speculative loads also may not
        displace predicted experts, nor one the policy values more."""
        pool = self.pools[self.pool_of[g]]
        size = int(self.sizes[g])
        while not pool.has_room(size):
            cand = (self.state == READY) & (self.pins == 0) & (self.pool_of == self.pool_of[g])
            if speculative:
                cand &= ~self.protected & ~self.reserved
            elif not allow_protected:
                cand &= ~self.protected
            idx = np.flatnonzero(cand)
            if idx.size == 0:
                return False
            victim = int(idx[np.argmin(self.policy.value(idx, self._layer_now))])
            if speculative and not self.policy.admit(g, victim, self._layer_now, predicted):
                return False
            self._evict(victim)
        self.slot[g] = pool.take(size)
        self.state[g] = LOADING
        return True

    def _evict(self, g):
        if not self.slabs:
            for off, nb in self.plan.ranges[g]:
                self.file.release(off, nb)
        self.pools[self.pool_of[g]].give(int(self.sizes[g]), int(self.slot[g]))
        self.state[g] = ABSENT
        self.slot[g] = -1
        self.c["evictions"] += 1
        if self.by_prefetch[g]:
            self.c["prefetch_wasted"] += 1
            self.by_prefetch[g] = False

    def _release(self, g):
        """Undo _make_room after a failed read."""
        self.pools[self.pool_of[g]].give(int(self.sizes[g]), int(self.slot[g]))
        self.state[g] = ABSENT
        self.slot[g] = -1

    def _claim_next(self):
        """Loader: the next speculative load it may start, as (g, True), or None.
        Loads the compute thread waits for are read by the compute thread itself,
        and while it reads them the loader starts nothing (demand first)."""
        if self._demand:
            return None
        while True:
            entry = self._queue.peek()
            if entry is None:
                return None
            prio, _, g, target = entry
            self._queue.pop()
            if self.state[g] != ABSENT:
                continue
            if target is not None and self._visits[target[0]] > target[1]:
                continue  # its layer has run: too late to help
            if not self._make_room(g, True, predicted=prio < HINTED):
                self.c["prefetch_refused"] += 1
                continue
            return g, True

    def _finish(self, job, err):
        g, speculative = job if isinstance(job, tuple) else (job, False)
        if err is not None:
            self._release(g)
            if self.pins[g] > 0 or not speculative:
                self.errors[g] = err
            return
        self.state[g] = READY
        self.policy.on_load(g, self._tick)
        self.load_count[g] += 1
        self.c["loads"] += 1
        self.c["bytes_read"] += int(self.plan.read_bytes[g])
        if speculative:
            self.c["loads_prefetch"] += 1
            self.c["bytes_read_prefetch"] += int(self.plan.read_bytes[g])
            self.c["prefetch_issued"] += 1
            if self.pins[g] == 0:
                self.by_prefetch[g] = True  # useful if used before it is evicted
            else:
                self.c["prefetch_useful"] += 1  # late: the compute thread was waiting for it

    # -- I/O (no lock held) -------------------------------------------------------

    def _read_claimed(self, g):
        """Read expert g into the slot reserved for it, on this thread; READY after."""
        try:
            self._read((g, False))
        except BaseException:
            with self._cond:
                self._release(g)
            raise
        with self._cond:
            self._finish((g, False), None)

    def _read(self, job):
        g = job[0] if isinstance(job, tuple) else job
        t0 = time.perf_counter()
        if self.slabs:
            pool = self.pools[self.pool_of[g]]
            for off, nb, at, need in self.plan.reads[g]:
                self.file.read_into(pool.view(int(self.slot[g]), at, nb), off, need)
        else:
            for off, nb in self.plan.ranges[g]:
                self.file.populate(off, nb)
        dt = time.perf_counter() - t0
        self.t["io_seconds"] += dt
        t = dt / max(1, int(self.plan.read_bytes[g]))
        self._t_byte = t if self._t_byte is None else 0.9 * self._t_byte + 0.1 * t

    # -- prefetch, prefill -----------------------------------------------------

    def _prefetch(self, layer, x):
        """Queue the predicted experts of the next `prefetch_depth` layers (the
        next token's first layer from popularity)."""
        jobs = []  # (target layer, experts, confidence, priority)
        for d in range(1, self.prefetch_depth + 1):
            tgt = layer + d
            if tgt > self.n_layer or (tgt == self.n_layer and d > 1):
                break
            tgt %= self.n_layer
            base = tgt * self.n_expert
            served = self.served[base : base + self.n_expert]  # (X,)
            if (self.state[base : base + self.n_expert][served] == READY).all():
                continue  # nothing to fetch for that layer
            if tgt > layer:
                experts = self.predictor.predict(layer, x, self.prefetch_top, tgt)
                conf = self._rank_hits / self._rank_tries * (0.8 ** (d - 1))  # (k,)
                prio = PREDICTED + 0.1 * (d - 1)
            else:  # next token's first layer: popularity
                experts, conf, prio = self.policy.likely(tgt, self.k), np.full(self.k, 0.5), HINTED
            keep = served[experts]  # experts served elsewhere are not guessed
            experts, conf = np.asarray(experts)[keep], conf[: len(keep)][keep]
            if d == 1 and tgt > layer:
                self._pred[tgt] = (experts, np.flatnonzero(keep))  # guesses and their ranks
            jobs.append((tgt, experts, conf, prio))
        if not jobs:
            return
        with self._cond:
            self.reserved[:] = False
            pushed = False
            for tgt, experts, conf, prio in jobs:
                gs = tgt * self.n_expert + np.asarray(experts, np.int64)
                self.reserved[gs] = True
                self.policy.expect(gs, conf)
                for r, g in enumerate(gs):
                    if self.state[g] == ABSENT:
                        pushed |= self._queue.push(
                            int(g), prio + r / 1000, (tgt, int(self._visits[tgt]))
                        )
            if pushed:
                self._cond.notify_all()

    def _score_prediction(self, layer, used, n_tok):
        pred = self._pred[layer]
        self._pred[layer] = None
        if pred is None or n_tok != 1:
            return
        pred, ranks = pred
        right = np.isin(pred, used)
        self.c["predicted"] += len(pred)
        self.c["predicted_right"] += int(right.sum())
        self.c["actual_routed"] += int(self.served[layer * self.n_expert + used].sum())
        self._rank_tries[ranks] += 1
        self._rank_hits[ranks] += right

    def _phase(self, layer, n_tok):
        """Track prefill (batches) vs decode (one token) for the prefill protection."""
        if n_tok > 1 and layer == 0:
            self._in_prefill = True
            with self._cond:
                self.protected[:] = False
        elif n_tok == 1 and self._in_prefill:
            self._in_prefill = False
            with self._cond:
                self.protected[:] = False

    def _protect(self, layer):
        """After a prefill batch ran `layer`: keep the experts its last tokens make most
        likely (the policy's ranking) through the rest of the prefill, up to a share
        of the cache per layer, so that decoding starts with them cached."""
        quota = max(0, (self.capacity_experts - self.k) // self.n_layer)
        if quota == 0:
            return
        with self._cond:
            best = layer * self.n_expert + np.asarray(self.policy.likely(layer, quota), np.int64)
            self.protected[best[self.state[best] == READY]] = True
