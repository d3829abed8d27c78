"""One peer as the coordinator sees it: a DEALER socket, its monitor, the
handshake state machine, outstanding requests and byte counters.

States: connecting -> hello -> assigning -> loading -> ready; any -> dead (then
a fresh socket starts connecting again: that is how a peer rejoins).

    connecting  socket connected; waiting for the ZMTP (and CURVE) handshake
                to succeed (monitor event HANDSHAKE_SUCCEEDED)
    hello       HELLO sent {protocol, model_hash}; waiting for WELCOME
    assigning   ASSIGN sent (config, experts, types); waiting for ASSIGNED
    loading     sending LOAD messages (expert bytes) the peer asked for, a
                few at a time; waiting for each LOADED
    ready       serving COMPUTE requests
    dead        connection lost, timed out, or refused: the socket was closed

Nothing here blocks: `remote_peers.PeerLinks` polls all sockets and feeds what arrives
to `on_event` / `on_message`. Kernels are never called here.
"""

import logging
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from meldlite.transports import protocol as P
from meldlite.transports import security

log = logging.getLogger("meldlite.peers")

CONNECTING, HELLO, ASSIGNING, LOADING, READY, DEAD = (
    "connecting",
    "hello",
    "assigning",
    "loading",
    "ready",
    "dead",
)
LOAD_WINDOW = 4  # LOAD messages in flight during setup
MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class PeerClient:
    """Connection to the peer at `address`, serving placement node `node`.

    setup: object with `hello()` (dict), `assignment(node)` (dict for ASSIGN) and
    `expert_frames(layer, e)` (three uint8 arrays): a `remote_setup.PeerSetup`.
    """

    def __init__(self, ctx, node, address, setup, *, keys=None, limits=P.Limits(), ids=None):
        self.ctx, self.node, self.address, self.setup = ctx, node, address, setup
        self.keys, self.limits = keys, limits
        self.ids = ids  # shared request-id counter (itertools.count)
        self.sock = self.monitor = None
        self.state = DEAD
        self.generation = 0  # bumped for every new socket
        self.closed_at = 0.0
        self.error = None  # last reason it is not ready, for messages
        self.refused = False  # CURVE handshake refused our key
        self.fatal = False  # handshake said no (model or version): do not retry soon
        self.welcome = {}
        self.heartbeat = 1.0
        self.last_heard = 0.0
        self.setup_req = None
        self.to_load, self.loading = [], set()
        self.done = {}  # req_id -> (Header, payload) or WireError
        # messages_*/bytes_*: COMPUTE requests and their replies; control_*: everything else
        # (handshake, expert bytes at start-up, heartbeats, stats)
        self.counters = {
            "requests": 0,
            "messages_out": 0,
            "messages_in": 0,
            "bytes_out": 0,
            "bytes_in": 0,
            "control_messages": 0,
            "control_bytes": 0,
            "rows": 0,
            "deaths": 0,
            "joins": 0,
            "errors": 0,
            "heartbeats": 0,
            "service_s": 0.0,
            "load_bytes": 0,
        }
        self.open()

    # -- socket lifecycle ----------------------------------------------------------------

    def open(self):
        s = self.ctx.socket(zmq.DEALER)
        s.linger = 0
        s.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a peer that is not there
        s.setsockopt(zmq.RECONNECT_IVL, 100)
        s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # ZMTP pings: a dead link drops in ~3 s
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        s.setsockopt(zmq.MAXMSGSIZE, self.limits.frame)
        if self.keys is not None:
            security.secure_client(s, self.keys)
        self.monitor = s.get_monitor_socket(MONITOR_EVENTS)
        s.connect(self.address)
        self.sock = s
        self.generation += 1
        self.state = CONNECTING
        self.done.clear()

    def close(self, bye=False):
        if self.sock is None:
            return
        if bye and self.state == READY:
            try:
                self.sock.send_multipart(P.message(P.Msg.BYE, {}), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
        self.sock = self.monitor = None
        self.state = DEAD
        self.closed_at = time.monotonic()

    def die(self, reason):
        """Give up on the current connection and start a fresh one (the rejoin path)."""
        if self.state == READY:
            log.warning("peer %s (%s) lost: %s", self.node, self.address, reason)
            self.counters["deaths"] += 1
        self.error = reason
        self.close()
        self.open()

    def progress(self):
        """Where the handshake is: changes with each step it takes (a reconnection
        attempt is not a step)."""
        state = CONNECTING if self.state == DEAD else self.state
        return (state, len(self.to_load) + len(self.loading))

    @property
    def ready(self):
        return self.state == READY

    def sockets(self):
        return (self.sock, self.monitor)

    # -- sending -------------------------------------------------------------------------

    def send(self, frames, compute=False):
        """Send a message now; False if the connection cannot take it (then it is dead)."""
        try:
            P.send_frames(self.sock, frames, zmq.NOBLOCK)
        except zmq.Again:
            self.die("send would block: no connection")
            return False
        self.count(frames, "out" if compute else None)
        return True

    def count(self, frames, direction):
        n = P.wire_size(frames)
        if direction is None:
            self.counters["control_messages"] += 1
            self.counters["control_bytes"] += n
        else:
            self.counters[f"messages_{direction}"] += 1
            self.counters[f"bytes_{direction}"] += n

    def request(self, frames):
        """Send a COMPUTE request; returns success."""
        self.counters["requests"] += 1
        return self.send(frames, compute=True)

    def next_id(self):
        return next(self.ids)

    # -- receiving -----------------------------------------------------------------------

    def on_event(self, now):
        """Handle monitor events (handshake done, disconnect, auth refused)."""
        while self.monitor is not None:
            try:
                ev = recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = ev["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.state == CONNECTING:
                self.refused = False
                self.setup_req = self.next_id()
                if self.send(P.message(P.Msg.HELLO, self.setup.hello(), self.setup_req)):
                    self.state = HELLO
                    self.last_heard = now
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.refused = True
                self.error = f"peer refused our CURVE key (ZAP status {ev['value']})"
            elif event in (
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            ):
                self.error = "security handshake failed (check the peer's public key and --keys)"
            elif event == zmq.EVENT_DISCONNECTED and self.state != CONNECTING:
                self.die("disconnected")
                return

    def on_message(self, now):
        """Handle every message waiting on the socket."""
        while self.sock is not None:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.last_heard = now
            try:
                header, payload = P.parse(frames, self.limits)
                compute = header.type == P.Msg.RESULT or (
                    header.type == P.Msg.ERROR and self.state == READY
                )
                self.count(frames, "in" if compute else None)
            except P.WireError as e:
                self.count(frames, None)
                log.warning("peer %s sent a bad message: %s", self.address, e)
                self.counters["errors"] += 1
                continue
            if header.type == P.Msg.HEARTBEAT:
                self.counters["heartbeats"] += 1
            elif header.type == P.Msg.RESULT:
                self.done[header.req_id] = (header, payload)
            elif header.type == P.Msg.ERROR:
                self.on_error(header, payload)
            elif header.type == P.Msg.STATS_REPLY:
                self.done[header.req_id] = (header, payload)
            else:
                self.on_setup(header, payload)

    def on_error(self, header, payload):
        try:
            obj = P.parse_json(payload[0], self.limits) if payload else {}
        except P.WireError:
            obj = {}
        code = obj.get("code") if obj.get("code") in P.CODES else "MALFORMED"
        err = P.WireError(code, f"peer {self.address}: {obj.get('message', '')}", header.req_id)
        self.counters["errors"] += 1
        if header.req_id == self.setup_req or self.state in (HELLO, ASSIGNING, LOADING):
            self.error = str(err)
            self.fatal = code in ("MODEL_MISMATCH", "VERSION", "BUDGET")
            log.warning("peer %s refused the session: %s", self.address, err)
            self.close()
            return
        if code == "NO_SESSION":  # the peer restarted under the same address
            self.done[header.req_id] = err
            self.die("peer lost our session (restarted?)")
            return
        self.done[header.req_id] = err

    def on_setup(self, header, payload):
        try:
            obj = P.parse_json(payload[0], self.limits) if len(payload) == 1 else None
        except P.WireError:
            obj = None
        if obj is None:
            self.die(f"bad {P.Msg(header.type).name} reply")
            return
        if header.type == P.Msg.WELCOME and self.state == HELLO:
            self.welcome = obj
            hb = obj.get("heartbeat")
            self.heartbeat = float(hb) if isinstance(hb, (int, float)) and 0 < hb < 3600 else 1.0
            self.setup_req = self.next_id()
            if self.send(P.message(P.Msg.ASSIGN, self.setup.assignment(self.node), self.setup_req)):
                self.state = ASSIGNING
        elif header.type == P.Msg.ASSIGNED and self.state == ASSIGNING:
            need = obj.get("need")
            if not isinstance(need, list):
                self.die("ASSIGNED without a need list")
                return
            self.to_load = [tuple(p) for p in need]
            self.loading = set()
            self.state = LOADING
            self._load_more()
        elif header.type == P.Msg.LOADED and self.state == LOADING:
            self.loading.discard(header.req_id)
            self._load_more()
        else:
            log.info(
                "peer %s: unexpected %s in state %s",
                self.address,
                P.Msg(header.type).name,
                self.state,
            )

    def _load_more(self):
        while self.to_load and len(self.loading) < LOAD_WINDOW:
            layer, e = self.to_load.pop(0)
            req = self.next_id()
            mats = self.setup.expert_frames(layer, e)
            frames = [
                P.Header(P.Msg.LOAD, req).pack(),
                P.pack_json({"layer": layer, "expert": e}),
                *mats,
            ]
            if not self.send(frames):
                return
            self.counters["load_bytes"] += sum(m.nbytes for m in mats)
            self.loading.add(req)
        if not self.to_load and not self.loading and self.state == LOADING:
            self.state = READY
            self.error = None
            self.counters["joins"] += 1
            log.info(
                "peer %s ready as node %s (%s)",
                self.address,
                self.node,
                self.welcome.get("name", "?"),
            )
