"""The loads of the expert cache: reading an expert's bytes into its slot, keeping
expert pages out of the page cache, and the order of loads between threads.

Three mechanisms (`MECHANISMS`) read an expert:
- "direct": os.preadv on an O_DIRECT descriptor into the slab slot (whole 4 kB
  blocks, no page cache involved); "pread" where the file system refuses O_DIRECT.
- "pread": buffered reads into the slot; the range read is then dropped from
  the page cache (POSIX_FADV_DONTNEED).
- "mmap": the expert stays in the file's memory map; a load faults its pages in
  (MADV_POPULATE_READ), an eviction unmaps them (MADV_DONTNEED) and drops them.

`Loads` is the loader thread's `LoadSource` (its guesses, one at a time) and
reads the compute thread's misses on the compute thread itself.
"""

import time

from meldlite.experts import io as eio
from meldlite.experts.prefetch import HINTED, LoadQueue
from meldlite.experts.residency import ABSENT, LOADING, READY


class ExpertReader:
    """The model file opened for expert loads with `mechanism`, and the page-cache
    hygiene that makes the budget real: no expert page stays resident or cached
    unless the cache holds it."""

    def __init__(self, gguf, mechanism, throttle, drop_cache):
        layer, e = gguf.expert_order()[0]  # a stored expert (not of a dense layer)
        tensor0 = gguf.expert_tensor(layer, "gate", e)
        self.map_base = tensor0.raw.ctypes.data - tensor0.offset  # byte 0 of the map
        self.file = eio.ExpertFile(
            gguf.path,
            eio.Throttle(throttle) if throttle else None,
            drop_cache=drop_cache,
            map_base=self.map_base,
            map_size=gguf.path.stat().st_size,
            direct=mechanism == "direct",
        )
        if mechanism == "direct" and not self.file.direct:
            mechanism = "pread"  # the file system refuses O_DIRECT
        self.mechanism = mechanism
        self.slabs = mechanism != "mmap"

    def quiet_map(self, plan, willneed=True):
        """No expert page resident or cached now, and no read-around into expert
        pages later. Opening the file already read its first read_ahead_kb (8 MB on
        the benchmark machine) into the page cache. The whole map is MADV_RANDOM:
        a fault on a non-expert page next to an expert would otherwise read the
        expert's pages back into the page cache; WILLNEED reads the non-expert
        tensors in large requests instead of a page per fault (`willneed` False: the
        non-expert tensors are copies in memory, `Weights.keep_resident`, and their
        pages of the file are not wanted)."""
        f = self.file
        if self.map_base % eio.PAGE == 0:
            f.advise(0, f.map_size, eio.MADV_RANDOM, outward=True)
            for off, nb in plan.other_ranges if willneed else ():
                f.advise(off, nb, eio.MADV_WILLNEED, outward=False)
        for ranges in plan.ranges:
            for off, nb in ranges:
                if self.map_base % eio.PAGE == 0:
                    f.advise(off, nb, eio.MADV_DONTNEED, outward=False)
                if f.drop_cache:
                    eio.drop_range(f.fd, off, nb)

    def read(self, plan, pools, g, slot):
        """Read expert g's bytes into `slot` (or fault in its pages)."""
        if self.slabs:
            for off, nb, at, need in plan.reads[g]:
                self.file.read_into(pools.view(g, slot, at, nb), off, need)
        else:
            for off, nb in plan.ranges[g]:
                self.file.populate(off, nb)

    def drop_pages(self, plan, g):
        """An evicted expert's pages leave the map and the page cache (mmap)."""
        if not self.slabs:
            for off, nb in plan.ranges[g]:
                self.file.release(off, nb)

    def close(self):
        self.file.close()


class Loads:
    """Who reads which expert when (a `prefetch.LoadSource` for the loader thread).

    Loads the compute thread waits for are read by the compute thread itself,
    and while it reads them the loader starts nothing (demand first)."""

    def __init__(self, reader, table, timers, estimates):
        self.reader, self.table = reader, table
        self.timers, self.estimates = timers, estimates
        self.cond = table.cond
        self.queue = LoadQueue()  # the loader's guesses (guarded by cond)
        self._demand = 0  # compute-thread reads under way: the loader waits

    # -- the loader's side (LoadSource) ----------------------------------------

    def claim_next(self):
        """The next guess the loader may read now (a slot reserved for it), or None."""
        tab = self.table
        if self._demand:
            return None
        while True:
            entry = self.queue.peek()
            if entry is None:
                return None
            prio, _, g, target = entry
            self.queue.pop()
            if tab.state[g] != ABSENT:
                continue
            if target is not None and tab.visits[target[0]] > target[1]:
                continue  # its layer has run: too late to help
            if not tab.make_room(g, True, predicted=prio < HINTED):
                tab.counters.prefetch_refused += 1
                continue
            return g

    def read(self, g):
        """Read expert g into the slot reserved for it (no lock held)."""
        tab = self.table
        t0 = time.perf_counter()
        self.reader.read(tab.plan, tab.pools, g, int(tab.slot[g]))
        dt = time.perf_counter() - t0
        self.timers.io_seconds += dt
        self.estimates.note_read(dt, int(tab.plan.read_bytes[g]))

    def finish(self, g, err):
        """The loader's read of g ended (err: its exception or None)."""
        if err is not None:
            self.table.failed(g, err, speculative=True)
        else:
            self.table.loaded(g, speculative=True)

    # -- the compute thread's side ---------------------------------------------

    def read_claimed(self, g):
        """Read expert g into the slot reserved for it, on this thread; READY after."""
        try:
            self.read(g)
        except BaseException:
            with self.cond:
                self.table.release(g)
            raise
        with self.cond:
            self.table.loaded(g, speculative=False)

    def read_demand(self, absent, ready, inflight, flush):
        """Read the experts in `absent` on this thread (emptying it; each one read
        joins `ready`, as do those of `inflight` that land while a slot is sought).
        Meanwhile the loader starts no guess: demand first."""
        with self.cond:
            self._demand += 1
        try:
            while absent:
                g = absent.pop(0)
                if not self._claim_for_demand(g, ready, inflight, flush):
                    continue  # it turned out loaded / in flight
                t0 = time.perf_counter()
                self.read_claimed(g)
                self.timers.stall_seconds += time.perf_counter() - t0
                ready.append(g)
        finally:
            with self.cond:
                self._demand -= 1
                self.cond.notify_all()

    def _claim_for_demand(self, g, ready, inflight, flush):
        """Reserve a slot for a demand read of g; False if g is loaded or in flight
        meanwhile (then it is added to `ready` / `inflight`)."""
        tab = self.table
        while True:
            with self.cond:
                if tab.state[g] == READY:
                    ready.append(g)
                    return False
                if tab.state[g] == LOADING:
                    inflight.append(g)
                    return False
                if tab.make_room(g, speculative=False):
                    return True
                busy = tab.filling(g)
                if not ready and not busy and tab.make_room(g, False, allow_protected=True):
                    return True
                landed = [h for h in inflight if tab.state[h] == READY]
                if landed:  # background loads of this layer that ended hold the slots
                    inflight[:] = [h for h in inflight if tab.state[h] != READY]
                    ready.extend(landed)
            if ready:  # the budget is full of this layer's experts: compute them
                flush()
            elif busy:  # slots are being filled in the background: wait for one
                t0 = time.perf_counter()
                with self.cond:
                    self.cond.wait(timeout=0.05)
                self.timers.stall_seconds += time.perf_counter() - t0
            else:  # cannot happen: the budget holds one expert per class
                raise RuntimeError("expert cache: no slot can be freed")

    def wait_any(self, inflight):
        """Block until some of the in-flight loads end: (ready ones, failed ones)."""
        tab = self.table
        t0 = time.perf_counter()
        try:
            with self.cond:
                while True:
                    done = [g for g in inflight if tab.state[g] == READY]
                    lost = [g for g in inflight if tab.state[g] == ABSENT]
                    for g in lost:
                        tab.errors.pop(g, None)
                    if done or lost:
                        return done, lost
                    self.cond.wait(timeout=1.0)
        finally:
            self.timers.stall_seconds += time.perf_counter() - t0
