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
reply naming what is wrong and a log line (at most a few per client and
minute, then one summary line: `log_limit`); the loop goes on serving.

This module is the socket and its loop; the parts:
- `peer_session`: the sessions, and an ASSIGN message read into one;
- `peer_bank`: the experts held, lent to sessions, within the budget;
- `peer_handlers`: the reply to each message type;
- `peer_compute`: the kernels run (warm-up, per-layer expert lists, COMPUTE).
"""

import logging
import os
import signal
import time

import zmq

from meldlite import kernels
from meldlite.config import ModelConfig
from meldlite.errors import OptionError
from meldlite.experts.factory import expert_bytes
from meldlite.formats import read_gguf
from meldlite.options import Serve
from meldlite.transports import protocol as P
from meldlite.transports import security
from meldlite.transports.peer_bank import ExpertBank
from meldlite.transports.peer_compute import warm_up
from meldlite.transports.peer_handlers import PeerHandlers
from meldlite.transports.peer_session import Sessions
from meldlite.units import parse_budget

log = logging.getLogger("meldlite.peer")

HEARTBEAT_S = 1.0


def model_expert_bytes(gguf):
    """Bytes of the experts of a model file (None without a file)."""
    if gguf is None:
        return None
    return expert_bytes(gguf, ModelConfig.from_metadata(gguf.metadata))


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
        self.bank = ExpertBank(self.gguf, self.budget)
        self.sessions = Sessions(self.bank)
        info = {
            "model_hash": self.model_hash,
            "has_model": self.gguf is not None,
            "name": self.name,
            "heartbeat": self.heartbeat,
        }
        self.handlers = PeerHandlers(info, self.bank, self.sessions, limits)
        self.counters = self.handlers.counters  # what STATS reports
        self.error_codes = self.handlers.error_codes
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
                self.handlers.limiter.tick()
                next_beat = time.monotonic() + self.heartbeat

    def stop(self, *_):
        self._stop = True

    def install_signal_handlers(self):
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def beat(self):
        """A HEARTBEAT to every client with a session; forget clients that are gone."""
        frame = P.Header(P.Msg.HEARTBEAT).pack()
        for ident in self.sessions.idents():
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
        reply = self.handlers.reply(ident, body)
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

    def held_bytes(self):
        return self.bank.held_bytes()

    def drop_session(self, ident):
        self.sessions.drop(ident)

    def close(self):
        if getattr(self, "handlers", None) is not None:
            self.handlers.limiter.flush()  # pending "suppressed" summaries
        if getattr(self, "sessions", None) is not None:
            self.sessions.drop_all()
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
