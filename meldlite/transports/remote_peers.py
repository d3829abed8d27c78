"""The coordinator's links to its peers: one `PeerClient` per peer node, polled
from the calling thread; heartbeats judged, dead connections reopened after a
pause (the rejoin path), start-up waiting until every peer is ready.
"""

import itertools
import time

import zmq

from meldlite.errors import PeerError
from meldlite.transports import protocol as P
from meldlite.transports.client import READY, PeerClient

# PeerClient counters summed over the peers into RemoteStore.stats()
SUMMED = (
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


class PeerLinks:
    """Connections to the peers at `endpoints` (placement's peer nodes in order).

    setup: the handshake's content (`remote_setup.PeerSetup`); liveness: heartbeats
    a ready peer may miss; retry_s: pause before a closed connection is reopened
    (ten times longer after a refusal). Closed by `close` (also when construction fails).
    """

    def __init__(self, placement, endpoints, setup, *, keys, limits, liveness, retry_s):
        self.liveness, self.retry_s, self.limits = float(liveness), float(retry_s), limits
        self.ctx = zmq.Context()
        self.ids = itertools.count(1)  # request ids, shared by all clients
        self.clients = {}  # node -> PeerClient
        self._poller, self._poller_key = None, None
        self._last_service = time.monotonic()
        try:
            for node, addr in zip(placement.peer_nodes(), endpoints):
                self.clients[node] = PeerClient(
                    self.ctx, node, addr, setup, keys=keys, limits=limits, ids=self.ids
                )
        except BaseException:
            self.close()
            raise

    def __iter__(self):
        return iter(self.clients.values())

    def get(self, node):
        return self.clients.get(node)

    def n_ready(self):
        return sum(c.ready for c in self)

    # -- polling ------------------------------------------------------------------------

    def _sockets(self):
        return [s for c in self for s in c.sockets() if s is not None]

    def pump(self, timeout_s):
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
        for c in list(self):
            if c.monitor is not None and (c.monitor in ready or c.state != READY):
                c.on_event(now)
            if c.sock is not None and c.sock in ready:
                c.on_message(now)

    def reopen(self, now):
        for c in self:
            if c.sock is None and now - c.closed_at >= (
                10 * self.retry_s if c.fatal else self.retry_s
            ):
                c.open()  # try again: the peer may be back (or fixed)

    def service(self):
        """Handle what arrived, judge heartbeats, reopen closed connections."""
        now = time.monotonic()
        active = now - self._last_service
        self.pump(0)
        now = time.monotonic()
        self.reopen(now)
        for c in self:
            if (
                c.ready
                and active < c.heartbeat
                and now - c.last_heard > self.liveness * c.heartbeat
            ):
                c.die(f"no heartbeat for {now - c.last_heard:.1f} s")
        self._last_service = now

    def start(self, timeout, stall):
        """Wait until every peer is ready. PeerError if one refuses, if one makes no
        progress in its handshake (connection, each reply) for `stall` seconds (the
        request deadline), or if `timeout` seconds pass in all."""
        now = time.monotonic()
        end = now + timeout
        seen = {c.node: (c.progress(), now) for c in self}  # node -> (progress, since)
        while True:
            self.pump(0.05)
            cs = list(self)
            bad = [c for c in cs if c.refused or c.fatal]
            if bad:
                c = bad[0]
                raise PeerError(f"peer {c.address}: {c.error}")
            now = time.monotonic()
            self.reopen(now)
            if all(c.ready for c in cs):
                self._last_service = now
                for c in cs:
                    c.last_heard = now
                return
            for c in cs:
                if c.progress() != seen[c.node][0]:
                    seen[c.node] = (c.progress(), now)
            stalled = [c for c in cs if not c.ready and now - seen[c.node][1] > stall]
            if stalled:
                raise PeerError(
                    _not_ready(stalled, f": no progress in {stall:g} s, the peer timeout")
                )
            if now > end:
                raise PeerError(_not_ready([c for c in cs if not c.ready], f" after {timeout:g} s"))

    # -- stats ----------------------------------------------------------------------------

    def query_stats(self, timeout):
        """Each ready peer's own counters (STATS request), by address; the peers are
        asked at once and waited for `timeout` seconds in all."""
        asked = {}  # PeerClient -> request id
        for c in self:
            req = c.next_id() if c.ready else None
            if req is not None and c.send(P.message(P.Msg.STATS, {}, req)):
                asked[c] = req
        end = time.monotonic() + timeout
        while any(r not in c.done for c, r in asked.items()) and time.monotonic() < end:
            self.pump(min(0.05, max(0.0, end - time.monotonic())))
        out = {}
        for c, req in asked.items():
            got = c.done.pop(req, None)
            if isinstance(got, tuple):
                out[c.address] = P.parse_json(got[1][0], self.limits)
        return out

    def per_peer(self):
        """Each client's counters with its address, node and state."""
        return [dict(c.counters, address=c.address, node=c.node, state=c.state) for c in self]

    def close(self):
        for c in self.clients.values():
            c.close(bye=True)
        self.clients = {}
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None


def _not_ready(clients, why):
    """ "peer ADDR not readyWHY (STATE[: ERROR])", joined by "; "."""
    return "; ".join(
        f"peer {c.address} not ready{why} ({c.state}" + (f": {c.error}" if c.error else "") + ")"
        for c in clients
    )
