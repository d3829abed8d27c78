"""ZeroMQ peers: expert-parallel inference across several CPU-only nodes.

- `protocol`: the wire protocol (the one module that defines it).
- `peer.PeerServer`: serves experts (`meldlite peer`): its socket and loop; its parts
  `peer_session` (sessions per client), `peer_bank` (experts held, the budget),
  `peer_handlers` (a reply per message type), `peer_compute` (the kernels it runs).
- `local_peer.LocalPeer`: a peer process on this machine (tests, benchmarks, examples).
- `remote.RemoteStore`: the coordinator's expert store (`Model` builds it over its
  local store when given peers); its parts `remote_peers` (links to the peers:
  polling, heartbeats, reconnects), `client.PeerClient` (one peer's connection and
  handshake), `remote_setup` (what a joining peer is told), `remote_jobs` (a
  layer's pairs split by node, and combined), `remote_dispatch` (jobs sent,
  computed here, gathered, failed over); `compute`: expert arithmetic both sides share.
- `placement`: placement files, round-robin, profile-guided `place`, routing.
- `security`: CurveZMQ keys (`meldlite keygen`); `link`: link emulation.
See docs/peers.md.
"""

from meldlite.transports.placement import Placement, load_placement, place, round_robin
from meldlite.transports.protocol import PROTOCOL_VERSION, model_hash

__all__ = [
    "PROTOCOL_VERSION",
    "PeerServer",
    "Placement",
    "RemoteStore",
    "load_placement",
    "model_hash",
    "place",
    "round_robin",
]


def __getattr__(name):
    # zmq-using classes load on first use, so `import meldlite` stays light
    if name == "PeerServer":
        from meldlite.transports.peer import PeerServer

        return PeerServer
    if name == "RemoteStore":
        from meldlite.transports.remote import RemoteStore

        return RemoteStore
    raise AttributeError(name)
