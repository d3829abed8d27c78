"""`RemoteStore`: the coordinator's expert store, with experts spread over peers.

For each layer, `moe` routes every (token, slot) pair to a placement node
(`placement.Router`), builds one request per peer node with all the batch's
tokens that need that peer (rows with at least one of its slots; the other
slots masked to -1), sends them all at once, computes the pairs that belong
to the coordinator ("local" node) meanwhile, then gathers the replies. A layer
whose pairs are all local sends nothing.

Combining:
- compact (default): a peer returns one partial sum per row; the coordinator
  adds the partials of all groups (nodes) in node order. Only the float
  addition order differs from one node.
- exact: f32 on the wire; peers return each pair's own expert output and the
  coordinator adds w * y per token in slot order (`kernels.sum_slots`),
  bit-identical to one node.

Faults: every request has a deadline; a disconnect (socket monitor), a missed
deadline, a stale heartbeat or an error reply makes the coordinator compute
that group itself instead: on another ready peer that holds all of the group's
experts (a replica), else through the local expert store. The group is
computed exactly as the peer would have (same rows, same masked slots, and
the wire encoding applied to its input and output), so the result is the same
bits and the generation goes on with the same tokens. The dead peer's socket
is replaced by a fresh one that keeps trying to reconnect; when the peer is
back, the handshake runs again and it rejoins.

Threads: none. Sockets are polled from the calling thread and every kernel
call (local experts) is made from it, so Numba's threading layer never sees
two threads (its `workqueue` layer is not thread-safe: it aborts when two threads
launch parallel kernels at once).
"""

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import zmq

from meldlite import kernels
from meldlite.errors import PeerError
from meldlite.experts.store import ExpertStore, ResidentStore
from meldlite.formats import KINDS
from meldlite.transports import protocol as P
from meldlite.transports import security
from meldlite.transports.client import READY, PeerClient
from meldlite.transports.compute import fuse_rows, pair_outputs
from meldlite.transports.link import parse_link
from meldlite.transports.placement import Router, as_placement, round_robin

log = logging.getLogger("meldlite.peers")
F32 = np.float32


@dataclass
class Job:
    """One group (node) of one layer's pairs."""

    node: int
    rows: np.ndarray  # (m,) token rows this group touches
    ids: np.ndarray  # (m, k) int32, other nodes' slots -1
    weights: np.ndarray  # (m, k) float32, 0 where masked
    reps: np.ndarray  # (R,) rows actually computed (token fusion), indices into rows
    inverse: np.ndarray  # (m,) row of the computed block for each row
    remote: bool  # the node is a peer (so the wire applies)
    client: object = None
    generation: int = -1
    req_id: int = 0
    deadline: float = 0.0
    arrival: float = 0.0  # link model: when the request reaches the peer
    delivery: float = 0.0  # link model: when the reply reaches us
    result: np.ndarray = None  # compact: (m, E); exact: (pairs, E)


class RemoteStore(ExpertStore):
    """Experts on peers (and optionally here), see the module docstring.

    gguf, cfg: the coordinator's model; options: a `meldlite.options.Peers` (the
    endpoints in placement node order, placement, wire, exact, fuse, link, keys,
    insecure, timeouts, liveness, retry); local: the store used for local experts
    and failover, closed by `close` (but left open when construction fails;
    default: a ResidentStore on the same file). Adaptive top-k is applied before `moe` is
    called (`meldlite.model.adapt_route`).
    """

    def __init__(self, gguf, cfg, options, *, local=None, llama_numerics=True, limits=P.Limits()):
        self.gguf, self.cfg = gguf, cfg
        self.peers = options.endpoints
        self.keys = security.as_client_keys(options.keys)
        for p in self.peers:
            security.check_exposure(p, self.keys, options.insecure, "peer")
        self.enc = P.parse_encoding(options.wire)
        P.check_encoding(self.enc, cfg.n_embd)
        self.exact = options.exact
        self.fuse = float(options.fuse)
        self.timeout, self.liveness = float(options.timeout), float(options.liveness)
        self.retry_s = float(options.retry_s)
        link, placement = options.link, options.placement
        self.link = parse_link(link)
        self.limits = limits
        self.llama_numerics = llama_numerics
        present = np.array(
            [[gguf.expert_present(L, e) for e in range(cfg.n_expert)] for L in range(cfg.n_layer)]
        )  # (L, X) False: pruned
        given = as_placement(placement)
        self.placement = (
            given.only(present)
            if given is not None
            else round_robin(cfg.n_layer, cfg.n_expert, len(self.peers), present)
        )
        self.placement.check(cfg.n_layer, cfg.n_expert, len(self.peers), present)
        self.router = Router(self.placement)
        self.local_node = self.placement.local_node()
        self.holds = {n: self.placement.holds(n) for n in range(len(self.placement.nodes))}
        self.model_hash = P.model_hash(gguf)
        self._types = np.array(
            [
                [
                    [
                        int(gguf.expert_tensor(L, kind, e).ggml_type) if present[L, e] else 0
                        for kind in KINDS
                    ]
                    for e in range(cfg.n_expert)
                ]
                for L in range(cfg.n_layer)
            ]
        )
        self._own_local = local is None  # closed here on failure only if made here
        self.local = local if local is not None else ResidentStore(gguf, cfg, llama_numerics)
        if hasattr(self.local, "serve_only"):  # a budgeted store prefetches local experts only
            self.local.serve_only(
                self.holds[self.local_node]
                if self.local_node is not None
                else np.zeros((cfg.n_layer, cfg.n_expert), bool)
            )
        self.counters = {
            "layers": 0,
            "remote_layers": 0,
            "requests": 0,
            "rows_sent": 0,
            "rows_fused": 0,
            "failovers": 0,
            "failover_local": 0,
            "failover_replica": 0,
            "stall_s": 0.0,
            "local_s": 0.0,
            "encode_s": 0.0,
            "link_wait_s": 0.0,
        }
        self.ctx = zmq.Context()
        self._ids = itertools.count(1)
        self.clients = {}
        self._poller, self._poller_key = None, None
        self._last_service = time.monotonic()
        try:
            for node, addr in zip(self.placement.peer_nodes(), self.peers):
                self.clients[node] = PeerClient(
                    self.ctx, node, addr, self, keys=self.keys, limits=limits, ids=self._ids
                )
            self._start(float(options.connect_timeout))
        except BaseException:
            if not self._own_local:
                self.local = None  # the caller's store stays open
            self.close()
            raise

    # -- setup callbacks for PeerClient -----------------------------------------------------

    def hello(self):
        return {
            "protocol": P.PROTOCOL_VERSION,
            "model_hash": self.model_hash,
            "client": f"meldlite coordinator {self.gguf.path.name}",
        }

    def assignment(self, node):
        experts = self.placement.experts_of(node)
        return {
            "n_embd": self.cfg.n_embd,
            "n_ff": self.cfg.n_ff_exp,
            "n_layer": self.cfg.n_layer,
            "n_expert": self.cfg.n_expert,
            "llama_numerics": bool(self.llama_numerics),
            "experts": [[L, e] for L, e in experts],
            "types": [self._types[L, e].tolist() for L, e in experts],
        }

    def expert_frames(self, layer, e):
        return [np.ascontiguousarray(self.gguf.expert_tensor(layer, kind, e).raw) for kind in KINDS]

    # -- polling --------------------------------------------------------------------------------

    def _sockets(self):
        return [s for c in self.clients.values() for s in c.sockets() if s is not None]

    def _pump(self, timeout_s):
        """Wait up to timeout_s for traffic, then handle everything that arrived."""
        socks = self._sockets()
        key = tuple(id(s) for s in socks)
        if key != self._poller_key:
            self._poller = zmq.Poller()
            for s in socks:
                self._poller.register(s, zmq.POLLIN)
            self._poller_key = key
        ready = dict(self._poller.poll(max(0, int(timeout_s * 1000)))) if socks else {}
        now = time.monotonic()
        for c in list(self.clients.values()):
            if c.monitor is not None and (c.monitor in ready or c.state != READY):
                c.on_event(now)
            if c.sock is not None and c.sock in ready:
                c.on_message(now)

    def _reopen(self, now):
        for c in self.clients.values():
            if c.sock is None and now - c.closed_at >= (
                10 * self.retry_s if c.fatal else self.retry_s
            ):
                c.open()  # try again: the peer may be back (or fixed)

    def _service(self):
        """Handle what arrived, judge heartbeats, reopen closed connections."""
        now = time.monotonic()
        active = now - self._last_service
        self._pump(0)
        now = time.monotonic()
        self._reopen(now)
        for c in self.clients.values():
            if (
                c.ready
                and active < c.heartbeat
                and now - c.last_heard > self.liveness * c.heartbeat
            ):
                c.die(f"no heartbeat for {now - c.last_heard:.1f} s")
        self._last_service = now

    def _start(self, timeout):
        end = time.monotonic() + timeout
        while True:
            self._pump(0.05)
            cs = list(self.clients.values())
            bad = [c for c in cs if c.refused or c.fatal]
            if bad:
                c = bad[0]
                raise PeerError(f"peer {c.address}: {c.error}")
            self._reopen(time.monotonic())
            if all(c.ready for c in cs):
                self._last_service = time.monotonic()
                for c in cs:
                    c.last_heard = self._last_service
                return
            if time.monotonic() > end:
                late = [c for c in cs if not c.ready]
                raise PeerError(
                    "; ".join(
                        f"peer {c.address} not ready after {timeout:g} s ({c.state}"
                        + (f": {c.error}" if c.error else "")
                        + ")"
                        for c in late
                    )
                )

    # -- the layer step -------------------------------------------------------------------------

    def moe(self, layer, x, ids, weights):
        self._service()
        x = np.ascontiguousarray(x, dtype=F32)
        ids = np.ascontiguousarray(ids, dtype=np.int32)
        weights = np.ascontiguousarray(weights, dtype=F32)
        node = self.router.route(layer, ids)  # (T, k)
        jobs = [self._job(layer, int(g), x, ids, weights, node) for g in np.unique(node[node >= 0])]
        self.counters["layers"] += 1
        sent = 0
        for job in jobs:
            if job.remote:
                sent += self._dispatch(layer, job, x)
        self.counters["remote_layers"] += sent > 0
        t0 = time.perf_counter()
        for job in jobs:
            if job.client is None:
                job.result = self._compute_here(layer, job, x)
        t1 = time.perf_counter()
        self.counters["local_s"] += t1 - t0
        self._gather(layer, jobs, x)
        self.counters["stall_s"] += time.perf_counter() - t1
        return self._combine(jobs, ids, weights, x.shape)

    def _job(self, layer, g, x, ids, weights, node):
        mask = node == g  # (T, k)
        rows = np.flatnonzero(mask.any(axis=1))  # (m,)
        ids_g = np.where(mask[rows], ids[rows], -1).astype(np.int32)  # (m, k)
        w_g = np.where(mask[rows], weights[rows], F32(0)).astype(F32)  # (m, k)
        remote = g != self.local_node
        if remote and self.fuse and len(rows) > 1:
            reps, inverse = fuse_rows(x[rows], ids_g, self.fuse)
            self.counters["rows_fused"] += len(rows) - len(reps)
        else:
            reps = inverse = np.arange(len(rows))
        return Job(g, rows, ids_g, w_g, reps, inverse, remote)

    def _dispatch(self, layer, job, x):
        """Send the job to its peer, or a ready replica holding all its experts; 0 if neither."""
        used = np.unique(job.ids[job.ids >= 0])
        primary = self.clients.get(job.node)
        options = [primary] if primary is not None and primary.ready else []
        if not options:
            options = [
                c
                for c in self.clients.values()
                if c.ready and self.holds[c.node][layer, used].all()
            ]
            self.counters["failovers"] += 1
            if options:
                self.counters["failover_replica"] += 1
            else:
                self.counters["failover_local"] += 1
                return 0
        client = options[0]
        t = time.perf_counter()
        idr = np.ascontiguousarray(job.ids[job.reps])
        xr = x[job.rows[job.reps]]
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
            self.counters["failovers"] += 1
            self.counters["failover_local"] += 1
            return 0
        job.client, job.generation = client, client.generation
        job.deadline = now + self.timeout
        if self.link is not None:
            job.arrival = self.link.send(now, P.wire_size(frames))
        self.counters["requests"] += 1
        self.counters["rows_sent"] += len(job.reps)
        return 1

    def _compute_here(self, layer, job, x):
        """The job's result computed by the local store, exactly as its peer would."""
        xr = x[job.rows[job.reps]]
        idr = np.ascontiguousarray(job.ids[job.reps])
        wire = job.remote and self.enc != P.Enc.F32
        if wire:
            xr = P.decode(P.encode(xr, self.enc), self.enc, len(xr), x.shape[1])

        def moe(a, b, c):
            return self.local.moe(layer, a, b, c)

        if self.exact:
            return pair_outputs(moe, xr, idr)
        y = moe(xr, idr, np.ascontiguousarray(job.weights[job.reps]))
        if wire:
            y = P.decode(P.encode(y, self.enc), self.enc, len(y), x.shape[1])
        return y[job.inverse]

    def _gather(self, layer, jobs, x):
        pending = [j for j in jobs if j.client is not None]
        n_embd = x.shape[1]
        while pending:
            now = time.monotonic()
            for job in list(pending):
                c = job.client
                got = c.done.pop(job.req_id, None)
                reason = None
                if got is not None:
                    try:
                        if isinstance(got, P.WireError):
                            raise got
                        header, payload = got
                        rows = int((job.ids[job.reps] >= 0).sum()) if self.exact else len(job.reps)
                        y = P.parse_result(header, payload, rows, n_embd, self.limits)
                        job.result = y if self.exact else y[job.inverse]
                        c.counters["service_s"] += header.aux / 1e6
                        if self.link is not None:
                            job.delivery = self.link.reply(
                                job.arrival + header.aux / 1e6,
                                P.wire_size(payload) + P.HEADER.size + 2,
                            )
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
                    self.counters["failovers"] += 1
                    self.counters["failover_local"] += 1
                    job.result = self._compute_here(layer, job, x)
            if pending:
                wait = min(j.deadline for j in pending) - time.monotonic()
                self._pump(min(max(wait, 0.0), 0.25))
        if self.link is not None:
            last = max((j.delivery for j in jobs if j.client is not None), default=0.0)
            wait = last - time.monotonic()
            if wait > 0:
                self.counters["link_wait_s"] += wait
                time.sleep(wait)

    def _combine(self, jobs, ids, weights, shape):
        if self.exact:
            y_of_pair = np.zeros(ids.shape, np.int64)  # (T, k)
            offset = 0
            for job in jobs:
                r, s = np.nonzero(job.ids >= 0)
                y_of_pair[job.rows[r], s] = offset + np.arange(len(r))
                offset += len(r)
            Y = np.concatenate([j.result for j in jobs]) if jobs else np.zeros((0, shape[1]), F32)
            return kernels.sum_slots(ids, weights, Y, y_of_pair)
        out = np.zeros(shape, F32)  # (T, E)
        for job in sorted(jobs, key=lambda j: j.node):
            out[job.rows] += job.result
        return out

    # -- the rest of the store interface --------------------------------------------------------

    def hint(self, layer, ids):
        """Passed on to the local store for the experts held here only."""
        if self.local_node is None:
            return
        ids = np.asarray(ids)
        here = (ids >= 0) & self.holds[self.local_node][layer][np.where(ids >= 0, ids, 0)]
        if here.any():
            self.local.hint(layer, np.where(here, ids, -1))

    def peer_stats(self, timeout=2.0):
        """Each ready peer's own counters (STATS request), by address."""
        out = {}
        for c in self.clients.values():
            if not c.ready:
                continue
            req = c.next_id()
            if not c.send(P.message(P.Msg.STATS, {}, req)):
                continue
            end = time.monotonic() + timeout
            while req not in c.done and time.monotonic() < end:
                self._pump(0.05)
            got = c.done.pop(req, None)
            if isinstance(got, tuple):
                out[c.address] = P.parse_json(got[1][0], self.limits)
        return out

    def stats(self):
        out = {f"peers_{k}": v for k, v in self.counters.items()}
        per = []
        for c in self.clients.values():
            per.append(dict(c.counters, address=c.address, node=c.node, state=c.state))
        total = {
            k: sum(p[k] for p in per)
            for k in (
                "messages_out",
                "messages_in",
                "bytes_out",
                "bytes_in",
                "control_messages",
                "control_bytes",
                "load_bytes",
                "deaths",
                "joins",
            )
        }
        out.update({f"peers_{k}": v for k, v in total.items()})
        out["peers_rejoins"] = max(0, total["joins"] - len(per))
        out["peers"] = per
        out["peers_ready"] = sum(c.ready for c in self.clients.values())
        out["wire"] = P.Enc(self.enc).name.lower()
        out["exact"] = self.exact
        out["link"] = str(self.link) if self.link else None
        out["placement"] = self.placement.strategy
        for k, v in self.local.stats().items():
            out.setdefault(k, v)
        return out

    def close(self):
        for c in getattr(self, "clients", {}).values():
            c.close(bye=True)
        self.clients = {}
        if getattr(self, "ctx", None) is not None:
            self.ctx.term()
            self.ctx = None
        if getattr(self, "local", None) is not None:
            self.local.close()
            self.local = None
