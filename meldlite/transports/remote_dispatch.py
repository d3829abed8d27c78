"""Running a layer's jobs: each peer's job sent to its peer (or a ready replica
holding all its experts), the rest computed by the local store meanwhile, the
replies gathered by their deadlines.

Failover: a job whose peer is not ready, cannot take the request, misses the
deadline, is lost or replies with an error is computed by the local store
exactly as the peer would have (same rows, same masked slots, and the wire
encoding applied to its input and output), so the result is the same bits.
"""

import logging
import time

import numpy as np

from meldlite.transports import protocol as P
from meldlite.transports.client import READY
from meldlite.transports.compute import pair_outputs

log = logging.getLogger("meldlite.peers")


class Dispatcher:
    """Jobs of layers run over `links` (a `PeerLinks`) and the `local` store.

    holds: node -> (L, X) bool experts it holds; enc, exact: the wire encoding and
    combine; timeout: seconds a request may take; link: a link model (None: off);
    counters: RemoteStore's counters, added to."""

    def __init__(self, links, holds, local, *, enc, exact, timeout, link, limits, counters):
        self.links, self.holds, self.local = links, holds, local
        self.enc, self.exact, self.timeout, self.link = enc, exact, timeout, link
        self.limits, self.counters = limits, counters

    def run(self, layer, jobs, x):
        """Results of every job of `layer` (x (T, E)) into job.result."""
        sent = 0
        for job in jobs:
            if job.remote:
                sent += self.send(layer, job, x)
        self.counters["remote_layers"] += sent > 0
        t0 = time.perf_counter()
        for job in jobs:
            if job.client is None:
                job.result = self.compute_here(layer, job, x)
        t1 = time.perf_counter()
        self.counters["local_s"] += t1 - t0
        self.gather(layer, jobs, x)
        self.counters["stall_s"] += time.perf_counter() - t1

    def _failover(self):
        self.counters["failovers"] += 1
        self.counters["failover_local"] += 1

    def send(self, layer, job, x):
        """Send the job to its peer, or a ready replica holding all its experts; 0 if neither."""
        used = np.unique(job.ids[job.ids >= 0])
        primary = self.links.get(job.node)
        options = [primary] if primary is not None and primary.ready else []
        if not options:
            options = [c for c in self.links if c.ready and self.holds[c.node][layer, used].all()]
            if options:
                self.counters["failovers"] += 1
                self.counters["failover_replica"] += 1
            else:
                self._failover()
                return 0
        client = options[0]
        t = time.perf_counter()
        idr = np.ascontiguousarray(job.ids[job.reps])  # (R, k)
        xr = x[job.rows[job.reps]]  # (R, E)
        x_wire = P.encode(xr, self.enc)
        job.req_id = client.next_id()
        frames = P.compute_message(
            job.req_id,
            layer,
            x_wire,
            idr,
            None if self.exact else job.weights[job.reps],
            self.enc,
            self.exact,
        )
        self.counters["encode_s"] += time.perf_counter() - t
        now = time.monotonic()
        if not client.request(frames):
            self._failover()
            return 0
        job.client, job.generation = client, client.generation
        job.deadline = now + self.timeout
        if self.link is not None:
            job.arrival = self.link.send(now, P.wire_size(frames))
        self.counters["requests"] += 1
        self.counters["rows_sent"] += len(job.reps)
        return 1

    def compute_here(self, layer, job, x):
        """The job's result computed by the local store, exactly as its peer would."""
        xr = x[job.rows[job.reps]]  # (R, E)
        idr = np.ascontiguousarray(job.ids[job.reps])  # (R, k)
        wire = job.remote and self.enc != P.Enc.F32
        if wire:
            xr = P.decode(P.encode(xr, self.enc), self.enc, len(xr), x.shape[1])

        def moe(a, b, c):
            return self.local.moe(layer, a, b, c)

        if self.exact:
            return pair_outputs(moe, xr, idr)  # (pairs, E)
        y = moe(xr, idr, np.ascontiguousarray(job.weights[job.reps]))  # (R, E)
        if wire:
            y = P.decode(P.encode(y, self.enc), self.enc, len(y), x.shape[1])
        return y[job.inverse]  # (m, E)

    def _receive(self, job, got, n_embd):
        """A reply's result into job.result (WireError for an error reply or a bad one)."""
        if isinstance(got, P.WireError):
            raise got
        header, payload = got
        rows = int((job.ids[job.reps] >= 0).sum()) if self.exact else len(job.reps)
        y = P.parse_result(header, payload, rows, n_embd, self.limits)
        job.result = y if self.exact else y[job.inverse]
        job.client.counters["service_s"] += header.aux / 1e6
        if self.link is not None:
            job.delivery = self.link.reply(
                job.arrival + header.aux / 1e6,
                P.wire_size(payload) + P.HEADER.size + 2,
            )

    def gather(self, layer, jobs, x):
        """Wait for the sent jobs' replies; compute here those that fail."""
        pending = [j for j in jobs if j.client is not None]
        while pending:
            now = time.monotonic()
            for job in list(pending):
                c = job.client
                got = c.done.pop(job.req_id, None)
                reason = None
                if got is not None:
                    try:
                        self._receive(job, got, x.shape[1])
                    except P.WireError as e:
                        reason = f"error reply: {e}"
                elif c.generation != job.generation or c.state != READY:
                    reason = f"peer {c.address} lost"
                elif now > job.deadline:
                    c.die(f"request timed out after {self.timeout:g} s")
                    reason = "timeout"
                else:
                    continue
                pending.remove(job)
                if reason is not None:
                    log.warning(
                        "layer %d: node %d's work computed here instead (%s)",
                        layer,
                        job.node,
                        reason,
                    )
                    self._failover()
                    job.result = self.compute_here(layer, job, x)
            if pending:
                wait = min(j.deadline for j in pending) - time.monotonic()
                self.links.pump(min(max(wait, 0.0), 0.25))
        if self.link is not None:
            last = max((j.delivery for j in jobs if j.client is not None), default=0.0)
            wait = last - time.monotonic()
            if wait > 0:
                self.counters["link_wait_s"] += wait
                time.sleep(wait)
