"""Two expert peers and a coordinator on one machine.

    python examples/peers.py [MODEL.gguf]

Starts two `meldlite peer` processes on free loopback ports (one with the model
file, one empty: it is sent its experts), generates the same story on one node
and over the peers in exact mode (identical text) and compact f16 mode, prints
the traffic, then ends exactly the two processes it started.
"""

import sys

import meldlite
from meldlite.data import default_model_path
from meldlite.transports.local_peer import LocalPeer

model = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
prompt = "Once upon a time"

single = meldlite.load(model)
print("one node:     ", prompt + "".join(single.generate(prompt, max_tokens=24, temperature=0)))
single.close()

peers = [LocalPeer(model, wait=False), LocalPeer(wait=False)]
try:
    endpoints = [p.wait_ready() for p in peers]
    for options in (dict(exact=True), dict(wire="f16")):
        m = meldlite.load(model, peers=endpoints, **options)
        text = "".join(m.generate(prompt, max_tokens=24, temperature=0))
        s = m.stats()
        n = max(1, m.timings["decode_tokens"] + m.timings["prefill_tokens"])
        print(f"peers {options}: {prompt + text}")
        print(
            f"    {s['peers_requests']} requests, "
            f"{(s['peers_bytes_out'] + s['peers_bytes_in']) / n:.0f} bytes/token, "
            f"{s['peers_load_bytes'] / 2**20:.1f} MiB of experts sent at start, "
            f"{s['peers_failovers']} failovers"
        )
        m.close()
finally:
    for p in peers:
        p.stop()
