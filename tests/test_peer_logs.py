"""A peer's log lines about refused requests are rate-limited per client
(`meldlite.transports.log_limit`): the limiter on a fake clock, then a real peer
process flooded with junk on loopback."""

import logging

import pytest
import zmq

from meldlite.transports import protocol as P
from meldlite.transports.local_peer import LocalPeer
from meldlite.transports.log_limit import LogLimiter

A, B = b"\x00\xaa", b"\x00\xbb"


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


@pytest.fixture
def limiter(caplog):
    caplog.set_level(logging.WARNING, logger="test.limit")
    clock = Clock()
    lim = LogLimiter(
        logging.getLogger("test.limit"), burst=3, interval=60.0, max_clients=4, clock=clock
    )
    return lim, clock, caplog


def summaries(caplog):
    return [r.getMessage() for r in caplog.records if "suppressed" in r.getMessage()]


def test_burst_then_one_summary_per_interval(limiter):
    lim, clock, caplog = limiter
    allowed = [lim.allow(A, "MALFORMED") for _ in range(50)]
    assert allowed == [True] * 3 + [False] * 47
    lim.tick()
    assert summaries(caplog) == []  # the interval is not over
    clock.t += 59.0
    lim.allow(A, "TRUNCATED")
    lim.tick()
    assert summaries(caplog) == []
    clock.t += 1.0
    lim.tick()
    assert summaries(caplog) == [
        "client 00aa: 48 more refused requests suppressed in the last 60 s "
        "(MALFORMED 47, TRUNCATED 1)"
    ]
    assert not lim.windows  # forgotten once summarised
    assert [lim.allow(A, "MALFORMED") for _ in range(4)] == [True] * 3 + [False]


def test_clients_are_limited_separately(limiter):
    lim, clock, caplog = limiter
    assert sum(lim.allow(A, "MALFORMED") for _ in range(10)) == 3
    assert sum(lim.allow(B, "MALFORMED") for _ in range(2)) == 2
    clock.t += 60.0
    lim.tick()
    assert summaries(caplog) == [
        "client 00aa: 7 more refused requests suppressed in the last 60 s (MALFORMED 7)"
    ]
    assert not lim.windows  # B had nothing suppressed: forgotten without a line


def test_a_message_after_the_interval_opens_a_new_one(limiter):
    lim, clock, caplog = limiter
    for _ in range(5):
        lim.allow(A, "OVERSIZED")
    clock.t += 90.0  # no tick in between: the next message summarises the old interval
    assert lim.allow(A, "OVERSIZED")
    assert summaries(caplog) == [
        "client 00aa: 2 more refused requests suppressed in the last 90 s (OVERSIZED 2)"
    ]


def test_table_is_bounded_and_evicted_counts_are_reported_together(limiter):
    lim, clock, caplog = limiter
    lim.max_lines = 1000
    for _ in range(5):
        lim.allow(A, "MALFORMED")  # 2 suppressed
    for i in range(100):
        clock.t += 0.1
        key = bytes([i, 1])
        for _ in range(4):
            lim.allow(key, "TRUNCATED")  # 1 suppressed each
        assert len(lim.windows) <= 4
    assert summaries(caplog) == []  # evicted counts wait for the interval's end
    clock.t += 60.0
    lim.tick()
    assert summaries(caplog) == [
        f"client {i:02x}01: 1 more refused requests suppressed in the last 60 s (TRUNCATED 1)"
        for i in range(96, 100)
    ] + [
        "97 evicted clients: 98 more refused requests suppressed in the last 70 s "
        "(MALFORMED 2, TRUNCATED 96)"
    ]
    assert not lim.windows


def test_lines_of_all_clients_are_capped_per_interval(limiter):
    lim, clock, _ = limiter
    lim.max_lines = 10
    allowed = [lim.allow(bytes([i]), "MALFORMED") for i in range(4) for _ in range(3)]
    assert sum(allowed) == 10 and allowed[-2:] == [False, False]
    clock.t += 60.0
    assert lim.allow(b"\x09", "MALFORMED")  # a new interval for all clients


def test_flush_reports_pending_summaries_at_shutdown(limiter):
    lim, clock, caplog = limiter
    for _ in range(4):
        lim.allow(A, "NO_SESSION")
    for _ in range(6):
        lim.allow(B, "VERSION")
    clock.t += 12.0
    lim.flush()
    assert sorted(summaries(caplog)) == [
        "client 00aa: 1 more refused requests suppressed in the last 12 s (NO_SESSION 1)",
        "client 00bb: 3 more refused requests suppressed in the last 12 s (VERSION 3)",
    ]
    assert not lim.windows
    lim.flush()
    assert len(summaries(caplog)) == 2


def test_flooded_peer_logs_a_bounded_number_of_lines_and_keeps_serving(tmp_path):
    """200 junk messages from one client to a real peer process (random free port on
    127.0.0.1): each gets its ERROR reply, the log gets the default burst of lines plus
    one summary (at shutdown, as the peer stops within its interval), and the peer still
    answers a HELLO afterwards."""
    n, burst = 200, LogLimiter(None).burst
    log = tmp_path / "peer.log"
    with LocalPeer(log=log) as peer:
        ctx = zmq.Context()
        s = ctx.socket(zmq.DEALER)
        s.linger, s.rcvtimeo = 0, 10000
        try:
            s.connect(peer.endpoint)
            for i in range(n):
                s.send_multipart([b"junk %d" % i])
                h, _ = P.parse(s.recv_multipart())
                assert h.type == P.Msg.ERROR
            s.send_multipart(P.message(P.Msg.HELLO, {"model_hash": "ab" * 32}, 7))
            h, _ = P.parse(s.recv_multipart())
            assert h.type == P.Msg.WELCOME and h.req_id == 7
        finally:
            s.close()
            ctx.term()
    lines = [ln for ln in log.read_text().splitlines() if "client " in ln]
    assert len(lines) == burst + 1, lines
    assert all("MALFORMED" in ln for ln in lines)
    assert f"{n - burst} more refused requests suppressed" in lines[-1]
