"""Expert stores: where the forward pass gets a layer's routed experts from.

- `ResidentStore`: every expert stays in the memory map (no budget).
- `CachedStore`: experts in a memory budget, loaded from the file on demand and
  ahead of time by predictive prefetch (cache.py; its parts plan.py, pools.py,
  residency.py, loads.py, counters.py; prefetch.py, policy.py, io.py).
- `make_store`: the local store that the `meldlite.options.Store` group asks for.
- `build_profile`: routing profiles (profile.py; the file format is formats/profile.py).
"""

from meldlite.experts.cache import CachedStore
from meldlite.experts.factory import make_store
from meldlite.experts.profile import build_profile
from meldlite.experts.store import ExpertStore, ResidentStore

__all__ = [
    "CachedStore",
    "ExpertStore",
    "ResidentStore",
    "build_profile",
    "make_store",
]
