"""Per-client rate limit of a peer's log lines about refused requests.

A peer logs a WARNING line, with the client's identity, for every request it
refuses (malformed, truncated, oversized, ...). A client that sends a stream of
junk would turn it into a stream of log lines; `LogLimiter` lets through the
first `burst` lines of each client per `interval` seconds, counts the rest by
error code, and logs one summary line per client and interval:

    client 0a1b...: 195 more refused requests suppressed in the last 60 s (MALFORMED 195)

Memory is bounded: at most `max_clients` clients are tracked (the least recently
seen one is evicted, its pending summary logged first), and a client is
forgotten once its interval is over. `flush` logs every pending summary (the
peer calls it when it stops). The clock is injectable, for tests.
"""

import time
from collections import OrderedDict


class _Window:
    """One client's current interval: its start, lines let through, suppressed counts."""

    __slots__ = ("lines", "start", "suppressed")

    def __init__(self, start):
        self.start, self.lines, self.suppressed = start, 0, {}  # code -> count


class LogLimiter:
    """Decides which refusal lines `log` (a `logging.Logger`) gets, per client key (bytes).

    burst: lines per client per interval; interval: seconds; max_clients: clients
    tracked at once; clock: a monotonic clock in seconds.
    """

    def __init__(self, log, *, burst=5, interval=60.0, max_clients=256, clock=time.monotonic):
        self.log, self.burst, self.interval = log, int(burst), float(interval)
        self.max_clients, self.clock = int(max_clients), clock
        self.windows = OrderedDict()  # key -> _Window, least recently seen first

    def allow(self, key, code):
        """True: log this refusal of client `key` now; False: it was counted for a summary."""
        now = self.clock()
        w = self.windows.get(key)
        if w is not None and now - w.start >= self.interval:
            self._summary(key, w, now)
            w = None
        if w is None:
            w = self.windows[key] = _Window(now)
            self._evict(now)
        self.windows.move_to_end(key)
        if w.lines < self.burst:
            w.lines += 1
            return True
        w.suppressed[code] = w.suppressed.get(code, 0) + 1
        return False

    def tick(self):
        """Log the summaries of intervals that are over and forget their clients
        (call it now and then: the peer does at each heartbeat)."""
        now = self.clock()
        for key in [k for k, w in self.windows.items() if now - w.start >= self.interval]:
            self._summary(key, self.windows.pop(key), now)

    def flush(self):
        """Log every pending summary and forget all clients (at shutdown)."""
        now = self.clock()
        while self.windows:
            key, w = self.windows.popitem(last=False)
            self._summary(key, w, now)

    def _evict(self, now):
        while len(self.windows) > self.max_clients:
            key, w = self.windows.popitem(last=False)
            self._summary(key, w, now)

    def _summary(self, key, w, now):
        n = sum(w.suppressed.values())
        if not n:
            return
        codes = ", ".join(f"{c} {k}" for c, k in sorted(w.suppressed.items()))
        self.log.warning(
            "client %s: %d more refused requests suppressed in the last %.0f s (%s)",
            key.hex(),
            n,
            now - w.start,
            codes,
        )
