"""`meldlite quantize`: a float GGUF to a uniform file (one type, llama.cpp's
stacked layout) or to a per-expert mixed file under a size budget.

    quantize_model("f16.gguf", "q4.gguf", qtype="Q4_0")
    quantize_model("f16.gguf", "mix.gguf", size="12MB", profile="prof.json")
    quantize_model("f16.gguf", "mix.gguf", bpw=3.5, profile="prof.json")
"""

import math
from pathlib import Path

from meldlite.compress import ladder, write
from meldlite.compress.mixed import quantize_mixed
from meldlite.compress.result import QuantizeResult
from meldlite.errors import OptionError
from meldlite.formats.gguf import read_gguf
from meldlite.units import parse_size


def quantize_model(
    src, out, *, qtype=None, size=None, bpw=None, profile=None, progress=None, ladder_types=None
):
    """Write `out` from the F32/F16/BF16 model `src`.

    qtype:    a type name ("Q4_K") -> uniform file, stacked layout, as llama.cpp's
              pure quantization lays it out.
    size:     bytes or "300MB" -> per-expert mixed file no larger than that;
    bpw:      bits per weight (of all parameters) -> the same with size = bpw * params / 8.
    profile:  `meldlite profile` output (path or dict) with calibration data; needed
              for size/bpw.
    progress: optional callback progress(done, total, what).
    """
    if Path(src).resolve() == Path(out).resolve():
        raise OptionError("OUT must differ from SRC")
    given = [n for n, v in (("type", qtype), ("size", size), ("bpw", bpw)) if v is not None]
    if len(given) != 1:
        raise OptionError(
            "give exactly one of --type, --size or --bpw"
            + (f" (got {', '.join(given)})" if given else "")
        )
    f = read_gguf(src)
    write.check_float_source(f)
    if qtype is not None:
        if profile is not None:
            raise OptionError(
                "--profile is for mixed files (--size/--bpw) and --prune-experts; "
                "--type files are quantized as llama.cpp's pure ones, without calibration"
            )
        return quantize_uniform(f, out, ladder.parse_type(qtype), progress)
    budget = parse_size(size, "size") if size is not None else bpw_budget(f, bpw)
    if profile is None:
        raise OptionError(
            "a mixed file (--size or --bpw) needs --profile PROFILE, "
            "from `meldlite profile MODEL TEXT -o PROFILE`"
        )

    return quantize_mixed(f, out, budget, profile, progress=progress, ladder_types=ladder_types)


def quantize_uniform(f, out, qtype, progress=None):
    """Every quantizable weight of the GGUFFile `f` at `qtype` (or llama.cpp's fallback)."""
    types = write.uniform_plan(f, qtype)
    cb = (lambda i, n: progress(i, n, "writing")) if progress else None
    w = write.write_stacked(f, out, types, ladder.file_type(qtype), progress=cb)
    return QuantizeResult(w.path, w.nbytes, w.tensor_types)


def bpw_budget(f, bpw):
    """File size in bytes for `bpw` bits per parameter."""
    try:
        bpw = float(bpw)
    except (TypeError, ValueError):
        raise OptionError(f"bpw must be a number, got {bpw!r}") from None
    if not 0 < bpw <= 32:
        raise OptionError(f"bpw must be in (0, 32], got {bpw}")
    n = sum(math.prod(f.tensor(name).shape) for name in f.tensor_names())
    return int(n * bpw / 8)
