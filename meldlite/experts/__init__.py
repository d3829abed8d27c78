"""Expert stores: where the forward pass gets a layer's routed experts from."""

from meldlite.experts.store import ExpertStore, ResidentStore

__all__ = ["ExpertStore", "ResidentStore"]
