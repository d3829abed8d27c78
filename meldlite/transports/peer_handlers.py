"""A peer's answers: one handler per message type a coordinator may send (HELLO,
ASSIGN, LOAD, COMPUTE, STATS, BYE), and the ERROR reply for a request that fails.

A malformed request gets an ERROR reply naming what is wrong and a log line
(rate-limited per client by `log_limit.LogLimiter`); nothing raised here stops
the peer's loop.
"""

import logging
import os
import time

import numpy as np

from meldlite.errors import MeldliteError
from meldlite.formats import KINDS
from meldlite.transports import protocol as P
from meldlite.transports.log_limit import LogLimiter
from meldlite.transports.peer_bank import matrix_shapes
from meldlite.transports.peer_compute import build_layers, compute
from meldlite.transports.peer_session import read_assignment

log = logging.getLogger("meldlite.peer")


def new_counters():
    """A peer's counters, as its STATS reply names them."""
    return {
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


class PeerHandlers:
    """Replies of the peer `info` (a dict: model_hash, has_model, name, heartbeat)
    holding experts in `bank` for `sessions`, requests checked against `limits`;
    refusals logged through `limiter` (default: a `LogLimiter` with its defaults)."""

    def __init__(self, info, bank, sessions, limits, limiter=None):
        self.info, self.bank, self.sessions, self.limits = info, bank, sessions, limits
        self.counters = new_counters()
        self.error_codes = {}  # code -> ERROR replies sent
        self.limiter = limiter if limiter is not None else LogLimiter(log)

    def reply(self, ident, body):
        """The reply frames to one received message body [header, ...] (None: no reply)."""
        req_id = 0
        try:
            header, payload = P.parse(body, self.limits)
            req_id = header.req_id
            return self.dispatch(ident, header, payload)
        except P.WireError as e:
            return self.fail(ident, e.code, e.detail, e.req_id or req_id)
        except MeldliteError as e:
            return self.fail(ident, "BAD_REQUEST", str(e), req_id)
        except Exception as e:
            if self.limiter.allow(ident, "INTERNAL"):
                log.exception("client %s: request %d failed", ident.hex(), req_id)
            return self.fail(ident, "INTERNAL", f"{type(e).__name__}: {e}", req_id, logged=True)

    def fail(self, ident, code, text, req_id, logged=False):
        """The ERROR reply; a log line unless `logged` or the client's lines are used up."""
        self.counters["errors"] += 1
        self.error_codes[code] = self.error_codes.get(code, 0) + 1
        if not logged and self.limiter.allow(ident, code):
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
        ours = self.info["model_hash"]
        if ours is not None and theirs != ours:
            raise P.WireError(
                "MODEL_MISMATCH",
                f"coordinator serves model {theirs[:16]}..., this peer's file is {ours[:16]}...",
                h.req_id,
            )
        self.sessions.open(ident, theirs, client)
        self.counters["sessions"] += 1
        log.info("client %s (%s) joined for model %s", ident.hex(), client, theirs[:16])
        return P.message(
            P.Msg.WELCOME,
            {
                "protocol": P.PROTOCOL_VERSION,
                "model_hash": ours,
                "has_model": self.info["has_model"],
                "budget": self.bank.budget,
                "name": self.info["name"],
                "pid": os.getpid(),
                "heartbeat": self.info["heartbeat"],
                "held_bytes": self.bank.held_bytes(),
            },
            h.req_id,
        )

    def on_assign(self, ident, h, obj):
        s = self.sessions.of(ident, h.req_id)
        r = h.req_id
        assigned = read_assignment(s, obj, self.limits, r)
        self.bank.lend(s, assigned, r)
        s.layers = None
        if not s.missing:
            build_layers(s, self.bank)
        log.info(
            "client %s: assigned %d experts (%d to receive), %.1f MiB held",
            ident.hex(),
            len(assigned),
            len(s.missing),
            self.bank.held_bytes() / 2**20,
        )
        return P.message(
            P.Msg.ASSIGNED,
            {"need": sorted([list(p) for p in s.missing]), "bytes": self.bank.held_bytes()},
            r,
        )

    def on_load(self, ident, h, payload):
        s = self.sessions.of(ident, h.req_id)
        r = h.req_id
        P.expect_frames(h, payload, 5 if s.bias else 4)
        obj = P.parse_json(payload[0], self.limits, r)
        L = P.field(obj, "layer", int, r, 0, max(0, s.n_layer - 1))
        e = P.field(obj, "expert", int, r, 0, max(0, s.n_expert - 1))
        if (L, e) not in s.missing:
            raise P.WireError("BAD_REQUEST", f"layer {L} expert {e} was not asked for", r)
        shapes = matrix_shapes(s.assigned[(L, e)], s.n_embd, s.n_ff)
        mats = [
            P.array_frame(buf, np.uint8, shape, f"layer {L} expert {e} {kind}", r)
            for kind, buf, shape in zip(KINDS, payload[1:4], shapes)
        ]  # 3 x uint8 (rows, row_bytes)
        bias = None
        if s.bias:
            n_bias = 2 * s.n_ff + s.n_embd
            bias = P.array_frame(payload[4], np.float32, (n_bias,), f"layer {L} expert {e} bias", r)
        self.bank.receive(s, L, e, mats, bias)
        if not s.missing:
            build_layers(s, self.bank)
            log.info("client %s: all %d experts received", ident.hex(), len(s.assigned))
        return P.message(P.Msg.LOADED, {"layer": L, "expert": e, "remaining": len(s.missing)}, r)

    def on_bye(self, ident, h, obj):
        self.sessions.drop(ident)
        return

    def on_stats(self, ident, h, obj):
        self.sessions.of(ident, h.req_id)
        return P.message(
            P.Msg.STATS_REPLY,
            dict(
                self.counters,
                error_codes=self.error_codes,
                held_bytes=self.bank.held_bytes(),
                n_sessions=len(self.sessions),
            ),
            h.req_id,
        )

    # -- compute ----------------------------------------------------------------------------

    def on_compute(self, ident, h, payload):
        t0 = time.perf_counter()
        s = self.sessions.of(ident, h.req_id)
        y, x, ids = compute(s, h, payload, self.limits)
        self.counters["requests"] += 1
        self.counters["rows"] += len(x)
        self.counters["pairs"] += int((ids >= 0).sum())
        dt = time.perf_counter() - t0
        self.counters["compute_s"] += dt
        return P.result_message(h.req_id, h.layer, y, h.encoding, h.exact, int(dt * 1e6))
