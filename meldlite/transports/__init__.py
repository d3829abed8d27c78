"""ZeroMQ peers: expert-parallel inference across several CPU-only nodes.

- `protocol`: the wire protocol (the one module that defines it).
- `peer.PeerServer`: serves experts (`meldlite peer`).
- `local_peer.LocalPeer`: a peer process on this machine (tests, benchmarks, examples).
- `remote.RemoteStore`: the coordinator's expert store (`Model` builds it over its
  local store when given peers).
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
