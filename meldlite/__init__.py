"""meldlite: Mixture-of-Experts GGUF inference on CPU-only edge devices.

import meldlite
model = meldlite.load()                # the built-in default model
for piece in model.generate("Once upon a time", max_tokens=64, seed=1):
    print(piece, end="")
"""

from meldlite.errors import (
    BudgetError,
    FormatError,
    MeldliteError,
    OptionError,
    PeerError,
    ProtocolError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "BudgetError",
    "FormatError",
    "MeldliteError",
    "Model",
    "OptionError",
    "PeerError",
    "ProtocolError",
    "UnsupportedError",
    "__version__",
    "load",
]


def __getattr__(name):
    # The runtime (and Numba) load on first use, so `import meldlite.errors`
    # or `meldlite.formats` stays light.
    if name in ("load", "Model"):
        from meldlite import api

        return getattr(api, name)
    raise AttributeError(f"module 'meldlite' has no attribute {name!r}")
