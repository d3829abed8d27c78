"""Link emulation (a measurement aid, not a network feature).

`--link 100Mbit/5ms` makes the coordinator behave as if its peers sat behind
a link of that bandwidth and one-way latency, on one machine's loopback.

Model: the coordinator's link is full duplex; each direction carries one
message at a time at `bandwidth` (messages queue behind each other, as on the
head node's single NIC), and every message then takes `latency` to arrive.
A request sent at time s reaches its peer at
    a = max(s, up_free) + bytes/bandwidth + latency
the peer replies after its measured service time c (it reports it in the
RESULT header), and the reply arrives at
    r = max(a + c, down_free) + bytes/bandwidth + latency.
The coordinator really sends at once, and holds each reply back until its
modelled arrival r (compute done meanwhile overlaps, as it would). Time spent
in the peer's queue behind an earlier request is not modelled (each peer gets
one request per layer). Expert-weight transfers at start-up (LOAD) and
heartbeats are not throttled.
"""

import re
from dataclasses import dataclass, field

from meldlite.errors import OptionError

_RATE_UNITS = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "bps": 1,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_NUM = r"([0-9]*\.?[0-9]+)"
_LINK_RE = re.compile(rf"^\s*{_NUM}\s*([a-zA-Z]+)\s*/\s*{_NUM}\s*([a-zA-Z]+)\s*$")


@dataclass
class Link:
    """One emulated link: bandwidth in bytes/s, one-way latency in seconds."""

    bandwidth: float
    latency: float
    up_free: float = field(default=0.0, repr=False)
    down_free: float = field(default=0.0, repr=False)

    def send(self, t, nbytes):
        """Modelled arrival at the peer of `nbytes` sent at time t."""
        start = max(t, self.up_free)
        self.up_free = start + nbytes / self.bandwidth
        return self.up_free + self.latency

    def reply(self, ready, nbytes):
        """Modelled arrival back at the coordinator of a reply ready at the peer at `ready`."""
        start = max(ready, self.down_free)
        self.down_free = start + nbytes / self.bandwidth
        return self.down_free + self.latency

    def bound(self, round_trips, nbytes):
        """Time that `round_trips` latencies plus `nbytes` at this bandwidth take."""
        return 2 * self.latency * round_trips + nbytes / self.bandwidth

    def __str__(self):
        return f"{self.bandwidth * 8 / 1e6:g}Mbit/{self.latency * 1e3:g}ms"


def parse_link(text):
    """Link from "100Mbit/5ms" (rates: bit, kbit, Mbit, Gbit or *bps; times: us, ms, s)."""
    if isinstance(text, Link) or text is None:
        return text
    m = _LINK_RE.match(str(text))
    if not m or m.group(2).lower() not in _RATE_UNITS or m.group(4).lower() not in _TIME_UNITS:
        raise OptionError(f"link {text!r} is not RATE/LATENCY such as 100Mbit/5ms or 20Mbit/20ms")
    rate = float(m.group(1)) * _RATE_UNITS[m.group(2).lower()] / 8
    latency = float(m.group(3)) * _TIME_UNITS[m.group(4).lower()]
    if rate <= 0:
        raise OptionError(f"link {text!r}: bandwidth must be > 0")
    return Link(rate, latency)
