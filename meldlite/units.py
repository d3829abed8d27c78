"""Sizes and rates as users give them: byte sizes, memory budgets, I/O rates.

    parse_budget("64MB", expert_bytes)   -> 64_000_000
    parse_budget("1.5GiB", expert_bytes) -> 1_610_612_736
    parse_budget("25%", expert_bytes)    -> expert_bytes // 4
    parse_rate("200MB/s")                -> 200_000_000.0
    parse_limit("340MB")                 -> 340_000_000

Units: B, kB/KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB powers of 1024
(so "64MB" is what a storage vendor means, "64MiB" what `free -m` shows). A bare
number is bytes. A percentage is of the model's expert bytes and must be in (0, 100].
Anything else is an `OptionError` naming the option and the accepted forms.
"""

import math
import re

from meldlite.errors import OptionError

UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_SIZE_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")
_PCT_RE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*%\s*$")

BUDGET_FORMS = '"64MB", "1.5GB", "512MiB", "25%" (of the expert bytes) or a number of bytes'
LIMIT_FORMS = '"340MB", "1.5GB", "512MiB" or a number of bytes'
RATE_FORMS = '"200MB/s", "50MiB/s" or a number of bytes per second'


def parse_size(value, what="size", forms=BUDGET_FORMS):
    """Bytes (int) from an int, a float or a string with a unit; OptionError otherwise
    (naming `what` and the accepted `forms`)."""
    if isinstance(value, bool):
        raise OptionError(f"{what} must be a size, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in UNITS:
            raise OptionError(f"{what} {value!r} is not a size; use e.g. {forms}")
        number, unit = float(m.group(1)), m.group(2).lower()
    else:
        raise OptionError(f"{what} must be a number or a string, got {type(value).__name__}")
    if not math.isfinite(number) or number <= 0:
        raise OptionError(f"{what} must be positive, got {value!r}")
    return int(number * UNITS[unit])


def parse_budget(value, expert_bytes):
    """The memory budget in bytes; None stays None (everything resident).

    A percentage is of `expert_bytes`; it must lie in (0, 100]. With `expert_bytes`
    None (no model to take a share of) a percentage is an OptionError."""
    if value is None:
        return None
    if isinstance(value, str) and "%" in value:
        if expert_bytes is None:
            raise OptionError(
                f"mem_budget {value!r} is a share of a model's expert bytes, and there is "
                f'no model; give a size such as "512MB"'
            )
        m = _PCT_RE.match(value)
        if not m:
            raise OptionError(f"mem_budget {value!r} is not a percentage; use e.g. {BUDGET_FORMS}")
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise OptionError(f"mem_budget {value!r} must be a percentage in (0, 100]")
        return max(1, int(expert_bytes * pct / 100))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
        raise OptionError(f"mem_budget must be positive, got {value!r}")
    return parse_size(value, "mem_budget")


def parse_limit(value):
    """A total memory limit in bytes (`mem_limit`): a size, not a percentage; None stays
    None."""
    if value is None:
        return None
    if isinstance(value, str) and "%" in value:
        raise OptionError(
            f'mem_limit {value!r} must be a size (the process\'s memory), e.g. "340MB", '
            f'"1GiB"; a share of the experts is mem_budget\'s form'
        )
    return parse_size(value, "mem_limit", LIMIT_FORMS)


def parse_rate(value):
    """Bytes per second (float) from "200MB/s", "1.5GiB/s" or a number; None stays None."""
    if value is None:
        return None
    text = value
    if isinstance(value, str):
        text = value.strip()
        if text.lower().endswith("/s"):
            text = text[:-2]
        elif text and not text[-1].isdigit():
            raise OptionError(f"io_throttle {value!r} is not a rate; use e.g. {RATE_FORMS}")
    try:
        return float(parse_size(text, "io_throttle"))
    except OptionError:
        raise OptionError(
            f"io_throttle {value!r} is not a positive rate; use e.g. {RATE_FORMS}"
        ) from None


def format_bytes(n):
    """Human-readable size, e.g. 12.3 MB (powers of 1000, like the parser's MB)."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
