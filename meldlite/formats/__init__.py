"""GGUF files: reading (zero-copy), hostile-input checks, expert layouts, packing.

Public entry points:
    read_gguf(path) -> GGUFFile      open a GGUF file (v2/v3), tensors as memmap views
    check_header(path) -> Header     bounded header walk (FormatError on bad input)
    pack(src, out, spec, sources)    write a per-expert-layout file with mixed expert types
    parse_spec(text) -> ExpertSpec   the --expert-types SPEC of `meldlite pack`
"""

from meldlite.formats.gguf import GGUFFile, TensorView, read_gguf
from meldlite.formats.layout import KINDS, expert_name, stacked_name
from meldlite.formats.validate import Header, check_header

__all__ = ["GGUFFile", "Header", "KINDS", "TensorView", "check_header", "expert_name",
           "read_gguf", "stacked_name"]
