"""GGUF files: reading (zero-copy), hostile-input checks, expert layouts, packing;
and the expert profile file of `meldlite profile` (profile.py).

Public entry points (see docs/format.md):
    read_gguf(path) -> GGUFFile          open a GGUF file (v2/v3), tensors as memmap views
    check_header(path) -> Header         bounded header walk (FormatError on bad input)
    pack(src, out, spec, sources) -> PackResult
                                         write the per-expert layout, experts from mixed sources
    parse_spec(text) -> ExpertSpec       the --expert-types SPEC of `meldlite pack`
"""

from meldlite.formats.gguf import GGUFFile, TensorView, read_gguf
from meldlite.formats.layout import KINDS, expert_name, stacked_name
from meldlite.formats.pack import PackResult, pack
from meldlite.formats.spec import ExpertSpec, parse_spec
from meldlite.formats.validate import Header, check_header

__all__ = [
    "KINDS",
    "ExpertSpec",
    "GGUFFile",
    "Header",
    "PackResult",
    "TensorView",
    "check_header",
    "expert_name",
    "pack",
    "parse_spec",
    "read_gguf",
    "stacked_name",
]
