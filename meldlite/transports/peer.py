"""The expert peer: a ZeroMQ ROUTER that computes routed experts for coordinators.

A peer holds some experts of one model (read from its own copy of the GGUF
file, or received from the coordinator when it has none) and answers COMPUTE
requests with their outputs. Everything runs on the main thread: the request
loop calls the Numba kernels itself, so no other thread ever enters them (the
only other thread is the ZAP authenticator when keys are used, which runs no
kernels).

Per client (one coordinator connection, a ROUTER identity) the peer keeps a
session: the model hash agreed in the handshake, the config, the experts
assigned. Expert bytes are shared between sessions of the same model and
counted once against the memory budget. A malformed request gets an ERROR
reply naming what is wrong and a log line; the loop goes on serving.
"""

import logging
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from meldlite import kernels
from meldlite.config import ModelConfig
from meldlite.errors import MeldliteError, OptionError
from meldlite.experts.factory import expert_bytes
from meldlite.formats import KINDS, read_gguf
from meldlite.kernels.qtypes import check_type, row_bytes
from meldlite.options import Serve
from meldlite.transports import protocol as P
from meldlite.transports import security
from meldlite.transports.compute import pair_outputs
from meldlite.units import parse_budget

log = logging.getLogger("meldlite.peer")

HEARTBEAT_S = 1.0


@dataclass
class Expert:
    """One expert's matrices (gate, up, down as uint8 (rows, row_bytes)) and types."""

    mats: tuple
    types: tuple
    nbytes: int
    refs: int = 0


@dataclass
class Session:
    model_hash: str
    client: str
    n_embd: int = 0
    n_ff: int = 0
    n_layer: int = 0
    n_expert: int = 0
    llama_numerics: bool = True
    assigned: dict = field(default_factory=dict)  # (layer, e) -> (g, u, d) types
    missing: set = field(default_factory=set)  # (layer, e) still to LOAD
    layers: list = None  # per layer: (typed mats, types (X, 3), held bool (X,))
    last_seen: float = 0.0

    @property
    def ready(self):
        return self.layers is not None and not self.missing


def expert_nbytes(types, n_embd, n_ff):
    """Bytes of one expert's gate, up and down matrices of these types."""
    g, u, d = (check_type(t) for t in types)
    return n_ff * row_bytes(g, n_embd) + n_ff * row_bytes(u, n_embd) + n_embd * row_bytes(d, n_ff)


def matrix_shapes(types, n_embd, n_ff):
    """(rows, row_bytes) of the gate, up and down matrices."""
    g, u, d = (check_type(t) for t in types)
    return (
        (n_ff, row_bytes(g, n_embd)),
        (n_ff, row_bytes(u, n_embd)),
        (n_embd, row_bytes(d, n_ff)),
    )


def model_expert_bytes(gguf):
    """Bytes of the experts of a model file (None without a file)."""
    if gguf is None:
        return None
    return expert_bytes(gguf, ModelConfig.from_metadata(gguf.metadata))


def warm_up():
    """One tiny MoE call, so the first real request does not wait for Numba's cache."""
    e = 32
    mat = np.zeros((e, e * 4), np.uint8)  # F32 rows of 32 values
    mats = kernels.expert_list([mat, mat, mat])
    for llama_numerics in (False, True):
        kernels.moe_ffn(
            np.zeros((1, e), np.float32),
            np.zeros((1, 1), np.int32),
            np.ones((1, 1), np.float32),
            mats,
            np.zeros((1, 3), np.int32),
            llama_numerics=llama_numerics,
        )


class PeerServer:
    """Serve experts on `listen` ("tcp://HOST:PORT", port 0 or * for any free port).

    model: path of the GGUF file (None: experts arrive from the coordinator);
    mem_budget: expert weights this peer may hold, as `meldlite.load` takes it
    (bytes, "512MB", or "25%" of the model's expert bytes, with a model; None: no limit);
    keys: a `security.ServerKeys` or a key directory (None: no CURVE);
    threads: Numba threads for the kernels (None: leave Numba's default).
    """

    def __init__(
        self,
        model=None,
        listen="tcp://127.0.0.1:5555",
        *,
        mem_budget=None,
        keys=None,
        heartbeat=HEARTBEAT_S,
        limits=P.Limits(),
        threads=None,
        name=None,
    ):
        opts = Serve(listen=listen, mem_budget=mem_budget, keys=keys, heartbeat=heartbeat)
        self.gguf = read_gguf(model) if model is not None else None
        self.model_hash = P.model_hash(self.gguf) if self.gguf is not None else None
        share = isinstance(mem_budget, str) and "%" in mem_budget  # of the model's experts
        self.budget = parse_budget(mem_budget, model_expert_bytes(self.gguf) if share else None)
        self.heartbeat = float(opts.heartbeat)
        self.limits = limits
        self.name = name or f"peer-{os.getpid()}"
        if threads is not None:
            kernels.set_threads(threads)
        self.keys = security.as_server_keys(keys)
        self.ctx = zmq.Context()
        self.auth = security.start_authenticator(self.ctx, self.keys) if self.keys else None
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, limits.frame)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
        if self.keys:
            security.secure_server(self.sock, self.keys)
        _host, port = security.split_endpoint(listen)
        try:
            self.sock.bind(listen.rsplit(":", 1)[0] + ":" + ("*" if port in ("0", "*") else port))
        except zmq.ZMQError as e:
            self.close()
            raise OptionError(f"cannot listen on {listen}: {e}") from None
        self.endpoint = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.sessions = {}  # identity -> Session
        self.bank = {}  # (model_hash, layer, e) -> Expert
        self.counters = {
            "requests": 0,
            "errors": 0,
            "compute_s": 0.0,
            "rows": 0,
            "pairs": 0,
            "bytes_in": 0,
            "bytes_out": 0,
            "sessions": 0,
            "heartbeats": 0,
        }
        self.error_codes = {}
        self._stop = False
        warm_up()

    # -- loop ---------------------------------------------------------------------------

    def serve(self, max_seconds=None):
        """Answer requests until `stop()` (or SIGTERM/SIGINT via `install_signal_handlers`)."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        next_beat = time.monotonic() + self.heartbeat
        end = None if max_seconds is None else time.monotonic() + max_seconds
        while not self._stop and (end is None or time.monotonic() < end):
            wait = max(0.0, next_beat - time.monotonic())
            if poller.poll(int(wait * 1000) + 1):
                for _ in range(64):  # drain a burst, then heartbeat
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self.handle(frames)
            if time.monotonic() >= next_beat:
                self.beat()
                next_beat = time.monotonic() + self.heartbeat

    def stop(self, *_):
        self._stop = True

    def install_signal_handlers(self):
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def beat(self):
        """A HEARTBEAT to every client with a session; forget clients that are gone."""
        frame = P.Header(P.Msg.HEARTBEAT).pack()
        for ident in list(self.sessions):
            try:
                self.sock.send_multipart([ident, frame], zmq.NOBLOCK)
                self.counters["heartbeats"] += 1
            except zmq.Again:
                pass  # its queue is full: it is alive but slow
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    log.info("client %s is gone; dropping its session", ident.hex())
                    self.drop_session(ident)
                else:
                    raise

    def handle(self, frames):
        """Handle one received multipart message [identity, header, ...]."""
        ident = frames[0].bytes
        body = frames[1:]
        self.counters["bytes_in"] += P.wire_size(body)
        req_id = 0
        try:
            header, payload = P.parse(body, self.limits)
            req_id = header.req_id
            reply = self.dispatch(ident, header, payload)
        except P.WireError as e:
            reply = self.fail(ident, e.code, e.detail, e.req_id or req_id)
        except MeldliteError as e:
            reply = self.fail(ident, "BAD_REQUEST", str(e), req_id)
        except Exception as e:
            log.exception("client %s: request %d failed", ident.hex(), req_id)
            reply = self.fail(ident, "INTERNAL", f"{type(e).__name__}: {e}", req_id)
        if reply is not None:
            self.send(ident, reply)

    def send(self, ident, frames):
        self.counters["bytes_out"] += P.wire_size(frames)
        try:
            P.send_frames(self.sock, [ident, *frames])
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            log.info("client %s left before its reply", ident.hex())
            self.drop_session(ident)

    def fail(self, ident, code, text, req_id):
        self.counters["errors"] += 1
        self.error_codes[code] = self.error_codes.get(code, 0) + 1
        log.warning("client %s: request %d: %s: %s", ident.hex(), req_id, code, text)
        return P.error_message(code, text, req_id)

    def dispatch(self, ident, h, payload):
        handler = {
            P.Msg.HELLO: self.on_hello,
            P.Msg.ASSIGN: self.on_assign,
            P.Msg.LOAD: self.on_load,
            P.Msg.COMPUTE: self.on_compute,
            P.Msg.STATS: self.on_stats,
            P.Msg.BYE: self.on_bye,
        }.get(h.type)
        if handler is None:
            raise P.WireError(
                "UNKNOWN_TYPE", f"a peer does not accept {P.Msg(h.type).name}", h.req_id
            )
        if h.type in P.JSON_TYPES:
            P.expect_frames(h, payload, 1)
            return handler(ident, h, P.parse_json(payload[0], self.limits, h.req_id))
        return handler(ident, h, payload)

    # -- handshake and experts --------------------------------------------------------------

    def on_hello(self, ident, h, obj):
        theirs = P.field(obj, "model_hash", str, h.req_id)
        client = str(obj.get("client", ""))[:200]
        if self.model_hash is not None and theirs != self.model_hash:
            raise P.WireError(
                "MODEL_MISMATCH",
                f"coordinator serves model {theirs[:16]}..., "
                f"this peer's file is {self.model_hash[:16]}...",
                h.req_id,
            )
        if ident in self.sessions:
            self.drop_session(ident)
        self.sessions[ident] = Session(theirs, client, last_seen=time.monotonic())
        self.counters["sessions"] += 1
        log.info("client %s (%s) joined for model %s", ident.hex(), client, theirs[:16])
        return P.message(
            P.Msg.WELCOME,
            {
                "protocol": P.PROTOCOL_VERSION,
                "model_hash": self.model_hash,
                "has_model": self.gguf is not None,
                "budget": self.budget,
                "name": self.name,
                "pid": os.getpid(),
                "heartbeat": self.heartbeat,
                "held_bytes": self.held_bytes(),
            },
            h.req_id,
        )

    def session(self, ident, h):
        s = self.sessions.get(ident)
        if s is None:
            raise P.WireError("NO_SESSION", "send HELLO first (or this peer restarted)", h.req_id)
        s.last_seen = time.monotonic()
        return s

    def on_assign(self, ident, h, obj):
        s = self.session(ident, h)
        lim, r = self.limits, h.req_id
        s.n_embd = P.field(obj, "n_embd", int, r, 1, lim.n_embd)
        s.n_ff = P.field(obj, "n_ff", int, r, 1, lim.n_ff)
        s.n_layer = P.field(obj, "n_layer", int, r, 1, lim.layers)
        s.n_expert = P.field(obj, "n_expert", int, r, 1, lim.experts)
        s.llama_numerics = bool(P.field(obj, "llama_numerics", bool, r))
        experts = P.field(obj, "experts", list, r)
        types = P.field(obj, "types", list, r)
        if len(experts) != len(types) or len(experts) > s.n_layer * s.n_expert:
            raise P.WireError(
                "BAD_REQUEST",
                "experts and types must be lists of equal length, at most n_layer * n_expert",
                r,
            )
        assigned = {}
        for pair, ty in zip(experts, types):
            if not (
                isinstance(pair, list)
                and len(pair) == 2
                and all(type(v) is int for v in pair)
                and 0 <= pair[0] < s.n_layer
                and 0 <= pair[1] < s.n_expert
            ):
                raise P.WireError("BAD_REQUEST", f"expert {pair!r} is not [layer, e] in range", r)
            if not (isinstance(ty, list) and len(ty) == 3 and all(type(v) is int for v in ty)):
                raise P.WireError("BAD_REQUEST", f"types {ty!r} are not three ggml type ids", r)
            assigned[tuple(pair)] = tuple(int(check_type(v)) for v in ty)
        self._release(s)
        new_bytes = sum(
            expert_nbytes(t, s.n_embd, s.n_ff)
            for (L, e), t in assigned.items()
            if (s.model_hash, L, e) not in self.bank
        )
        self._make_room(new_bytes, r, s.model_hash)
        s.assigned = assigned
        s.missing = set()
        for (L, e), ty in assigned.items():
            key = (s.model_hash, L, e)
            if key not in self.bank and self.gguf is not None:
                self.bank[key] = self._read_expert(s, L, e, ty, r)
            if key in self.bank:
                if self.bank[key].types != ty:
                    raise P.WireError(
                        "MODEL_MISMATCH",
                        f"layer {L} expert {e} has types "
                        f"{self.bank[key].types}, coordinator says {ty}",
                        r,
                    )
                self.bank[key].refs += 1
            else:
                s.missing.add((L, e))
        s.layers = None
        if not s.missing:
            self._build(s)
        log.info(
            "client %s: assigned %d experts (%d to receive), %.1f MiB held",
            ident.hex(),
            len(assigned),
            len(s.missing),
            self.held_bytes() / 2**20,
        )
        return P.message(
            P.Msg.ASSIGNED,
            {"need": sorted([list(p) for p in s.missing]), "bytes": self.held_bytes()},
            r,
        )

    def _read_expert(self, s, layer, e, types, req_id):
        """One expert from the peer's own file, by pread into owned memory."""
        mats, nbytes = [], 0
        shapes = matrix_shapes(types, s.n_embd, s.n_ff)
        with open(self.gguf.path, "rb") as f:
            for kind, ty, shape in zip(KINDS, types, shapes):
                t = self.gguf.expert_tensor(layer, kind, e)
                if int(t.ggml_type) != ty or tuple(t.raw.shape) != shape:
                    raise P.WireError(
                        "MODEL_MISMATCH",
                        f"layer {layer} expert {e} {kind}: file has "
                        f"{t.qtype} {t.raw.shape}, coordinator expects type {ty} "
                        f"{shape}",
                        req_id,
                    )
                buf = np.empty(shape, np.uint8)
                if os.preadv(f.fileno(), [memoryview(buf).cast("B")], t.offset) != buf.nbytes:
                    raise OSError(f"{self.gguf.path}: short read of layer {layer} expert {e}")
                mats.append(buf)
                nbytes += buf.nbytes
        return Expert(tuple(mats), tuple(types), nbytes)

    def on_load(self, ident, h, payload):
        s = self.session(ident, h)
        r = h.req_id
        P.expect_frames(h, payload, 4)
        obj = P.parse_json(payload[0], self.limits, r)
        L = P.field(obj, "layer", int, r, 0, max(0, s.n_layer - 1))
        e = P.field(obj, "expert", int, r, 0, max(0, s.n_expert - 1))
        if (L, e) not in s.missing:
            raise P.WireError("BAD_REQUEST", f"layer {L} expert {e} was not asked for", r)
        ty = s.assigned[(L, e)]
        mats = []
        for kind, buf, shape in zip(KINDS, payload[1:], matrix_shapes(ty, s.n_embd, s.n_ff)):
            arr = P.array_frame(buf, np.uint8, shape, f"layer {L} expert {e} {kind}", r)
            mats.append(arr)
        key = (s.model_hash, L, e)
        self.bank[key] = Expert(tuple(mats), ty, sum(m.nbytes for m in mats), refs=1)
        s.missing.discard((L, e))
        if not s.missing:
            self._build(s)
            log.info("client %s: all %d experts received", ident.hex(), len(s.assigned))
        return P.message(P.Msg.LOADED, {"layer": L, "expert": e, "remaining": len(s.missing)}, r)

    def _build(self, s):
        """Per layer: typed matrix list (placeholders for experts not held), types, held mask."""
        layers = []
        for L in range(s.n_layer):
            arrays = [None] * (3 * s.n_expert)
            types = np.zeros((s.n_expert, 3), np.int32)
            held = np.zeros(s.n_expert, bool)
            for e in range(s.n_expert):
                ex = self.bank.get((s.model_hash, L, e)) if (L, e) in s.assigned else None
                if ex is not None:
                    arrays[3 * e : 3 * e + 3] = ex.mats
                    types[e] = ex.types
                    held[e] = True
            layers.append((kernels.expert_list(arrays), types, held))
        s.layers = layers
        self._warm_session(s)

    def _warm_session(self, s):
        """One row through one expert of each distinct type triple, before the session is
        ready: kernels a first request would need are loaded (or compiled) now."""
        seen = set()
        x = np.zeros((1, s.n_embd), np.float32)
        for mats, types, held in s.layers:
            for e in np.flatnonzero(held):
                key = tuple(types[e])
                if key not in seen:
                    seen.add(key)
                    kernels.moe_ffn(
                        x,
                        np.array([[e]], np.int32),
                        np.ones((1, 1), np.float32),
                        mats,
                        types,
                        llama_numerics=s.llama_numerics,
                    )

    def _release(self, s):
        for L, e in s.assigned:
            ex = self.bank.get((s.model_hash, L, e))
            if ex is not None and (L, e) not in s.missing:
                ex.refs -= 1
        s.assigned, s.missing, s.layers = {}, set(), None

    def _make_room(self, nbytes, req_id, model_hash=None):
        if self.budget is None:  # keep unused experts of this model only (a rejoin needs them)
            for key in [k for k, ex in self.bank.items() if ex.refs <= 0 and k[0] != model_hash]:
                del self.bank[key]
            return
        for key in [k for k, ex in self.bank.items() if ex.refs <= 0]:
            if self.held_bytes() + nbytes <= self.budget:
                break
            del self.bank[key]
        if self.held_bytes() + nbytes > self.budget:
            raise P.WireError(
                "BUDGET",
                f"{nbytes / 2**20:.1f} MiB more of experts do not fit the "
                f"budget of {self.budget / 2**20:.1f} MiB "
                f"({self.held_bytes() / 2**20:.1f} MiB held)",
                req_id,
            )

    def held_bytes(self):
        return sum(ex.nbytes for ex in self.bank.values())

    def drop_session(self, ident):
        s = self.sessions.pop(ident, None)
        if s is not None:
            self._release(s)

    def on_bye(self, ident, h, obj):
        self.drop_session(ident)
        return

    def on_stats(self, ident, h, obj):
        self.session(ident, h)
        return P.message(
            P.Msg.STATS_REPLY,
            dict(
                self.counters,
                error_codes=self.error_codes,
                held_bytes=self.held_bytes(),
                n_sessions=len(self.sessions),
            ),
            h.req_id,
        )

    # -- compute ----------------------------------------------------------------------------

    def on_compute(self, ident, h, payload):
        t0 = time.perf_counter()
        s = self.session(ident, h)
        r = h.req_id
        if not s.ready:
            raise P.WireError("NO_SESSION", "no experts assigned yet, or some still to load", r)
        if h.layer >= s.n_layer:
            raise P.WireError("BAD_REQUEST", f"layer {h.layer} of a {s.n_layer}-layer model", r)
        x, ids, weights = P.parse_compute(h, payload, s.n_embd, self.limits)
        mats, types, held = s.layers[h.layer]
        if ids.size and (ids.min() < -1 or ids.max() >= s.n_expert):
            raise P.WireError(
                "BAD_REQUEST",
                f"expert ids {ids.min()}..{ids.max()} outside -1..{s.n_expert - 1}",
                r,
            )
        used = np.unique(ids[ids >= 0])
        if not held[used].all():
            missing = used[~held[used]]
            raise P.WireError(
                "NOT_HERE", f"layer {h.layer} experts {missing.tolist()} are not on this peer", r
            )

        def moe(xx, ii, ww):
            return kernels.moe_ffn(xx, ii, ww, mats, types, llama_numerics=s.llama_numerics)

        y = pair_outputs(moe, x, ids) if h.exact else moe(x, ids, weights)
        self.counters["requests"] += 1
        self.counters["rows"] += len(x)
        self.counters["pairs"] += int((ids >= 0).sum())
        dt = time.perf_counter() - t0
        self.counters["compute_s"] += dt
        return P.result_message(r, h.layer, y, h.encoding, h.exact, int(dt * 1e6))

    def close(self):
        for s in list(self.sessions):
            self.drop_session(s)
        if getattr(self, "sock", None) is not None:
            self.sock.close(linger=0)
            self.sock = None
        if getattr(self, "auth", None) is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
