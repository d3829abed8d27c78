"""Per-client rate limit of a peer's log lines about refused requests.

A peer logs a WARNING line, with the client's identity, for every request it
refuses (malformed, truncated, oversized, ...). A client that sends a stream of
junk would turn it into a stream of log lines; `LogLimiter` lets through the
first `burst` lines of each client per `interval` seconds (and `max_lines` of all
clients together), counts the rest by error code, and logs one summary line per
client and interval:

    client 0a1b...: 195 more refused requests suppressed in the last 60 s (MALFORMED 195)

Memory and lines are bounded: at most `max_clients` clients are tracked; the
least recently seen one is evicted, its suppressed counts merged into one line
for all evicted clients ("40 evicted clients: 800 more refused requests
..."), logged when the interval is over. A client is forgotten once its interval is over. So an
interval has at most max_lines + max_clients + 1 lines, however many
connections send junk. `flush` logs every pending summary (the peer calls it
when it stops). The clock is injectable, for tests.
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

    burst: lines per client per interval; interval: seconds; max_lines: lines of all
    clients per interval; max_clients: clients tracked at once; clock: a monotonic
    clock in seconds.
    """

    def __init__(
        self,
        log,
        *,
        burst=5,
        interval=60.0,
        max_lines=100,
        max_clients=256,
        clock=time.monotonic,
    ):
        self.log, self.burst, self.interval = log, int(burst), float(interval)
        self.max_lines, self.max_clients, self.clock = int(max_lines), int(max_clients), clock
        self.windows = OrderedDict()  # key -> _Window, least recently seen first
        self.all = _Window(clock())  # all clients: lines let through; evicted clients' counts
        self.n_evicted = 0  # clients evicted with suppressed counts, this interval

    def allow(self, key, code):
        """True: log this refusal of client `key` now; False: it was counted for a summary."""
        now = self.clock()
        if now - self.all.start >= self.interval:
            self._evicted_summary(now)
        w = self.windows.get(key)
        if w is not None and now - w.start >= self.interval:
            self._summary(f"client {key.hex()}", w, now)
            w = None
        if w is None:
            w = self.windows[key] = _Window(now)
            self._evict()
        self.windows.move_to_end(key)
        if w.lines < self.burst and self.all.lines < self.max_lines:
            w.lines += 1
            self.all.lines += 1
            return True
        w.suppressed[code] = w.suppressed.get(code, 0) + 1
        return False

    def tick(self):
        """Log the summaries of intervals that are over and forget their clients
        (call it now and then: the peer does at each heartbeat)."""
        now = self.clock()
        for key in [k for k, w in self.windows.items() if now - w.start >= self.interval]:
            self._summary(f"client {key.hex()}", self.windows.pop(key), now)
        if now - self.all.start >= self.interval:
            self._evicted_summary(now)

    def flush(self):
        """Log every pending summary and forget all clients (at shutdown)."""
        now = self.clock()
        while self.windows:
            key, w = self.windows.popitem(last=False)
            self._summary(f"client {key.hex()}", w, now)
        self._evicted_summary(now)

    def _evict(self):
        while len(self.windows) > self.max_clients:
            _key, w = self.windows.popitem(last=False)
            if w.suppressed:
                self.n_evicted += 1
                for code, n in w.suppressed.items():
                    self.all.suppressed[code] = self.all.suppressed.get(code, 0) + n

    def _evicted_summary(self, now):
        """The evicted clients' line; a new interval for all clients."""
        self._summary(f"{self.n_evicted} evicted clients", self.all, now)
        self.all, self.n_evicted = _Window(now), 0

    def _summary(self, who, w, now):
        n = sum(w.suppressed.values())
        if not n:
            return
        codes = ", ".join(f"{c} {k}" for c, k in sorted(w.suppressed.items()))
        self.log.warning(
            "%s: %d more refused requests suppressed in the last %.0f s (%s)",
            who,
            n,
            now - w.start,
            codes,
        )
