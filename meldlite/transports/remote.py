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

The parts: `remote_peers` (the links to the peers: polling, heartbeats,
reconnects), `remote_setup` (what a joining peer is told), `remote_jobs` (a
layer's pairs split by node, and combined), `remote_dispatch` (jobs sent,
computed here, gathered, failed over).
"""

import numpy as np

from meldlite.experts.store import ExpertStore, ResidentStore
from meldlite.transports import protocol as P
from meldlite.transports import security
from meldlite.transports.link import parse_link
from meldlite.transports.placement import Router, as_placement, round_robin
from meldlite.transports.remote_dispatch import Dispatcher
from meldlite.transports.remote_jobs import combine, split_jobs
from meldlite.transports.remote_peers import SUMMED, PeerLinks
from meldlite.transports.remote_setup import PeerSetup

F32 = np.float32


def new_counters():
    """The coordinator's counters, reported by `stats()` as peers_<name>."""
    return {
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
        self.timeout = float(options.timeout)
        self.link = parse_link(options.link)
        self.limits = limits
        self.llama_numerics = llama_numerics
        present = np.array(
            [[gguf.expert_present(L, e) for e in range(cfg.n_expert)] for L in range(cfg.n_layer)]
        )  # (L, X) False: pruned
        given = as_placement(options.placement)
        self.placement = (
            given.only(present)
            if given is not None
            else round_robin(cfg.n_layer, cfg.n_expert, len(self.peers), present)
        )
        self.placement.check(cfg.n_layer, cfg.n_expert, len(self.peers), present)
        self.router = Router(self.placement)
        self.local_node = self.placement.local_node()
        self.holds = {n: self.placement.holds(n) for n in range(len(self.placement.nodes))}
        self.setup = PeerSetup(gguf, cfg, self.placement, present, llama_numerics)
        self.model_hash = self.setup.model_hash
        self._own_local = local is None  # closed here on failure only if made here
        self.local = local if local is not None else ResidentStore(gguf, cfg, llama_numerics)
        if hasattr(self.local, "serve_only"):  # a budgeted store prefetches local experts only
            self.local.serve_only(
                self.holds[self.local_node]
                if self.local_node is not None
                else np.zeros((cfg.n_layer, cfg.n_expert), bool)
            )
        self.counters = new_counters()
        self.links = None
        try:
            self.links = PeerLinks(
                self.placement,
                self.peers,
                self.setup,
                keys=self.keys,
                limits=limits,
                liveness=options.liveness,
                retry_s=options.retry_s,
            )
            self.links.start(float(options.connect_timeout), self.timeout)
        except BaseException:
            if not self._own_local:
                self.local = None  # the caller's store stays open
            self.close()
            raise
        self.dispatcher = Dispatcher(
            self.links,
            self.holds,
            self.local,
            enc=self.enc,
            exact=self.exact,
            timeout=self.timeout,
            link=self.link,
            limits=limits,
            counters=self.counters,
        )

    def moe(self, layer, x, ids, weights):
        self.links.service()
        x = np.ascontiguousarray(x, dtype=F32)  # (T, E)
        ids = np.ascontiguousarray(ids, dtype=np.int32)  # (T, k)
        weights = np.ascontiguousarray(weights, dtype=F32)  # (T, k)
        node = self.router.route(layer, ids)  # (T, k)
        jobs = split_jobs(x, ids, weights, node, self.local_node, self.fuse, self.counters)
        self.counters["layers"] += 1
        self.dispatcher.run(layer, jobs, x)
        return combine(jobs, ids, weights, x.shape, self.exact)  # (T, E)

    def hint(self, layer, ids):
        """Passed on to the local store for the experts held here only."""
        here = self._held_here(layer, ids)
        if here is not None:
            self.local.hint(layer, here)

    def _held_here(self, layer, ids):
        """ids with the experts not held here set to -1; None when none is."""
        if self.local_node is None:
            return None
        ids = np.asarray(ids)
        here = (ids >= 0) & self.holds[self.local_node][layer][np.where(ids >= 0, ids, 0)]
        return np.where(here, ids, -1) if here.any() else None

    def announce(self, layer, ids):
        """Passed on to the local store for the experts held here only."""
        here = self._held_here(layer, ids)
        if here is not None:
            self.local.announce(layer, here)

    def peer_stats(self, timeout=None):
        """Each ready peer's own counters (STATS request), by address, waited for
        `timeout` seconds (default: the request deadline, `--peer-timeout`)."""
        return self.links.query_stats(self.timeout if timeout is None else timeout)

    def stats(self):
        out = {f"peers_{k}": v for k, v in self.counters.items()}
        per = self.links.per_peer()
        total = {k: sum(p[k] for p in per) for k in SUMMED}
        out.update({f"peers_{k}": v for k, v in total.items()})
        out["peers_rejoins"] = max(0, total["joins"] - len(per))
        out["peers"] = per
        out["peers_ready"] = self.links.n_ready()
        out["wire"] = P.Enc(self.enc).name.lower()
        out["exact"] = self.exact
        out["link"] = str(self.link) if self.link else None
        out["placement"] = self.placement.strategy
        for k, v in self.local.stats().items():
            out.setdefault(k, v)
        return out

    def close(self):
        if getattr(self, "links", None) is not None:
            self.links.close()
        if getattr(self, "local", None) is not None:
            self.local.close()
            self.local = None
