"""Options as data: every user-facing option declared once, with its default,
help text and validation.

An option group is a small frozen dataclass; each field carries an `Opt` (help,
command-line flags, kind, range, check). Building a group validates it, so a
group that exists holds good values. The Python API builds groups from its
keyword arguments (`meldlite.load`), the command line builds the same groups
from click options derived from these declarations (`meldlite.cli.options`).

Groups: `Runtime` (context, threads, numerics, adaptive top-k), `Store` (the
local expert store: memory budget, policy, prefetch, reads), `Peers` (experts
on `meldlite peer` processes), `Sampler`, `Generation` (prompt and length) and
`Serve` (the peer server). This module imports nothing heavy: the CLI reads it
to build its options without loading NumPy's kernels.
"""

import math
import numbers
from dataclasses import dataclass, field, fields

from meldlite.errors import OptionError
from meldlite.units import parse_budget, parse_limit, parse_rate

POLICIES = ("forecast", "lfu", "lru")  # expert cache policies (experts/policy.py)
DEFAULT_POLICY = "forecast"  # chosen by benchmarks/offload.py, see docs/benchmarks.md
MECHANISMS = ("direct", "pread", "mmap")  # how experts are read (experts/io.py)
DEFAULT_IO = "direct"  # idem
WIRES = ("f32", "f16", "q8")  # hidden-state encodings sent to peers
FRACTION = {"kind": float, "lo": 0, "hi": 1, "hi_open": True}  # a number in [0, 1)


@dataclass(frozen=True)
class Opt:
    """How one option is given and checked.

    flags: command-line declarations, e.g. ("-t", "--threads") (empty: Python only);
    kind: bool, int, float, str, "file" or "dir" (paths), or a tuple of choices;
    lo/hi (open or closed): the allowed range of a number; check: value -> value,
    raising OptionError (after kind and range); keyword: the name in
    `meldlite.load` when it differs from the field's (None: the field's; "": not
    a `load` keyword); flag_value: what a boolean flag stores when given;
    show_default: show the default in --help."""

    help: str
    flags: tuple = ()
    kind: object = str
    lo: float = None
    hi: float = None
    lo_open: bool = False
    hi_open: bool = False
    check: object = None
    metavar: str = None
    keyword: str = None
    flag_value: bool = True
    show_default: bool = None

    def interval(self):
        """The range as text, e.g. "[0, 1)", ">= 1"."""
        lo, hi = _number(self.lo), _number(self.hi)
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{lo}, {hi}{right}"

    def validate(self, name, value, default):
        """`value` checked against kind, range and check; OptionError naming `name`."""
        if value is None and default is None:
            return None
        kind = self.kind
        if kind is bool:
            if not isinstance(value, bool):
                raise OptionError(f"{name} must be True or False, got {value!r}")
        elif isinstance(kind, tuple):
            if value not in kind:
                raise OptionError(f"{name} {value!r} is not one of {', '.join(kind)}")
        elif kind in (int, float):
            number = numbers.Integral if kind is int else numbers.Real
            if not isinstance(value, number) or isinstance(value, bool):
                what = "an integer" if kind is int else "a number"
                raise OptionError(f"{name} must be {what}, got {value!r}")
            if self.lo is not None and not self._inside(value):
                raise OptionError(f"{name} must be {self.interval()}, got {value!r}")
        if self.check is not None:
            value = self.check(value)
        return value

    def _inside(self, v):
        if math.isnan(v):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below


def _number(x):
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x}"


def option(default, help, **spec):
    """A dataclass field holding `default` and its `Opt`."""
    return field(default=default, metadata={"opt": Opt(help, **spec)})


class Group:
    """Base of the option groups: validates every field on construction."""

    def __post_init__(self):
        for f in fields(self):
            value = f.metadata["opt"].validate(f.name, getattr(self, f.name), f.default)
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self):
        """Rules across fields (override)."""

    @classmethod
    def opts(cls):
        """{field name: (Opt, default)} in declaration order."""
        return {f.name: (f.metadata["opt"], f.default) for f in fields(cls)}

    @classmethod
    def take(cls, values):
        """The group from the entries of dict `values` named like its fields (removed)."""
        return cls(**{name: values.pop(name) for name in cls.opts() if name in values})


# -- checks used by several options ---------------------------------------------------------


def off_if_zero(value):
    """0 means off: None."""
    return float(value) or None


def check_budget(value):
    """A budget's form ("64MB", "25%", bytes); the bytes are worked out where the
    model's expert bytes are known (`units.parse_budget`)."""
    parse_budget(value, 1)
    return value


def check_limit(value):
    """A total memory limit's form ("340MB", "1GiB", bytes; not a percentage)."""
    parse_limit(value)
    return value


def check_rate(value):
    parse_rate(value)
    return value


def check_endpoints(value):
    """A list of endpoints from a list or a comma-separated string."""
    peers = [p for p in value.split(",") if p.strip()] if isinstance(value, str) else value
    peers = [str(p).strip() for p in (peers or [])]
    if not peers:
        raise OptionError("peers: give at least one tcp://HOST:PORT")
    if len(set(peers)) != len(peers):
        raise OptionError(f"peers repeat: {peers}")
    return peers


def mem_budget_option():
    """`--mem-budget`, the same for `run` and `peer`."""
    return option(
        None,
        'Memory for expert weights: "64MB", "1.5GB", "512MiB", or "25%" of the '
        "model's expert bytes (default: no limit, every expert stays available).",
        flags=("--mem-budget",),
        kind=object,
        metavar="SIZE",
        check=check_budget,
    )


# -- the groups -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime(Group):
    """How a model runs: context, threads, numerics, adaptive top-k."""

    n_ctx: int = option(
        None,
        "Context length (default: the model's, at most 4096).",
        flags=("-c", "--ctx-size"),
        kind=int,
        lo=1,
        hi=1 << 20,
    )
    n_threads: int = option(
        None, "Compute threads (default: all cores).", flags=("-t", "--threads"), kind=int, lo=1
    )
    n_batch: int = option(
        512,
        "Prompt tokens per forward call during prefill (fewer: less memory for activations).",
        flags=("-b", "--batch-size"),
        kind=int,
        lo=1,
    )
    n_parallel: int = option(
        1,
        "Sequences kept and decoded together (server slots); each has its own KV cache "
        "of n_ctx positions.",
        flags=("-np", "--parallel"),
        kind=int,
        lo=1,
    )
    llama_numerics: bool = option(
        True,
        "Round activations before each quantized matmul as llama.cpp does (logits agree "
        "with llama.cpp's); False multiplies float activations.",
        kind=bool,
    )
    min_expert_weight: float = option(
        None,
        "Adaptive top-k: skip routed experts whose renormalised weight is below this.",
        flags=("--min-expert-weight",),
        check=off_if_zero,
        **FRACTION,
    )
    cold: bool = option(
        False,
        "Measurement aid: drop the model file from the page cache first.",
        flags=("--cold",),
        kind=bool,
    )


@dataclass(frozen=True)
class Store(Group):
    """The local expert store: all resident, or a memory-budgeted cache."""

    mem_budget: object = mem_budget_option()
    mem_limit: object = option(
        None,
        'Memory for the whole process, e.g. "340MB": the expert budget is what is left '
        "after the runtime, the non-expert weights, the KV cache and a margin "
        "(docs/experts.md). Not with --mem-budget.",
        flags=("--mem-limit",),
        kind=object,
        metavar="SIZE",
        check=check_limit,
    )
    cache_policy: str = option(
        None,
        f"Expert cache policy with --mem-budget (default: {DEFAULT_POLICY}).",
        flags=("--policy",),
        kind=POLICIES,
    )
    prefetch: bool = option(
        True,
        "Load experts only when routed to.",
        flags=("--no-prefetch",),
        kind=bool,
        flag_value=False,
    )
    profile: str = option(
        None,
        "A `meldlite profile` file whose popularity seeds the cache policy.",
        flags=("--profile",),
        kind="file",
    )
    expert_io: str = option(
        None,
        "How experts are read: O_DIRECT or buffered pread into slabs, or the madvise'd map "
        f"(default: {DEFAULT_IO}).",
        flags=("--expert-io",),
        kind=MECHANISMS,
    )
    io_throttle: object = option(
        None,
        'Measurement aid: emulate storage of this bandwidth for expert reads, e.g. "200MB/s".',
        flags=("--io-throttle",),
        kind=object,
        metavar="RATE",
        check=check_rate,
    )

    def check(self):
        if self.mem_budget is not None and self.mem_limit is not None:
            raise OptionError(
                "give mem_budget (the experts' memory) or mem_limit (the whole "
                "process's, the budget derived from it), not both"
            )
        if self.budgeted:
            return
        for name in ("cache_policy", "io_throttle", "profile", "expert_io"):
            if getattr(self, name) is not None:
                raise OptionError(
                    f"{name} applies to a memory-budgeted store: give mem_budget "
                    f"or mem_limit too (e.g. mem_budget='100%')"
                )

    @property
    def budgeted(self):
        """Whether experts go to a memory-budgeted cache (mem_budget or mem_limit)."""
        return self.mem_budget is not None or self.mem_limit is not None


@dataclass(frozen=True)
class Peers(Group):
    """Routed experts computed on `meldlite peer` processes."""

    endpoints: object = option(
        None,
        "Compute routed experts on `meldlite peer`s: tcp://HOST:PORT,... (docs/peers.md).",
        flags=("--peers",),
        kind=object,
        metavar="ENDPOINTS",
        keyword="peers",
        check=check_endpoints,
    )
    placement: object = option(
        None,
        "Expert placement file from `meldlite place` (default: round-robin).",
        flags=("--placement",),
        kind="file",
    )
    wire: str = option(
        "f32", "Encoding of hidden states sent to peers.", flags=("--wire",), kind=WIRES
    )
    exact: bool = option(
        False, "Peers' results bit-identical to one node (f32 only).", flags=("--exact",), kind=bool
    )
    fuse: float = option(
        0.0,
        "Token fusion for prefill: merge near-identical states (relative distance).",
        flags=("--fuse",),
        show_default=False,
        **FRACTION,
    )
    link: str = option(
        None,
        'Measurement aid: emulate a link to the peers, e.g. "100Mbit/5ms".',
        flags=("--link",),
        metavar="RATE/LATENCY",
    )
    keys: object = option(
        None, "CurveZMQ key directory from `meldlite keygen`.", flags=("--keys",), kind="dir"
    )
    insecure: bool = option(
        False, "Allow unencrypted peers beyond loopback.", flags=("--insecure",), kind=bool
    )
    timeout: float = option(
        10.0,
        "Seconds a peer has to answer a request before its work is done here, and to "
        "take each start-up step (connect, welcome, assignment, each expert loaded).",
        flags=("--peer-timeout",),
        kind=float,
        lo=0.01,
        keyword="peer_timeout",
    )
    connect_timeout: float = option(
        60.0, "Seconds at most for all peers to be ready at start.", kind=float, lo=0.01, keyword=""
    )
    liveness: float = option(
        3, "Missed heartbeats before a peer counts as dead.", kind=float, lo=1, keyword=""
    )
    retry_s: float = option(
        2.0, "Seconds between attempts to reconnect a lost peer.", kind=float, lo=0, keyword=""
    )

    def check(self):
        if self.exact and self.wire != "f32":
            raise OptionError("exact mode sends f32 hidden states; wire must be f32")
        if self.exact and self.fuse:
            raise OptionError("token fusion changes results; it cannot be used in exact mode")


@dataclass(frozen=True)
class Sampler(Group):
    """How the next token is drawn from the logits (`meldlite.sampling`)."""

    temperature: float = option(
        0.8, "Temperature; 0 is greedy.", flags=("--temp",), kind=float, lo=0
    )
    top_k: int = option(
        40, "Keep the k most likely tokens (0: off).", flags=("--top-k",), kind=int, lo=0
    )
    top_p: float = option(
        0.95, "Nucleus mass.", flags=("--top-p",), kind=float, lo=0, lo_open=True, hi=1
    )
    min_p: float = option(
        0.05,
        "Minimum probability relative to the top token.",
        flags=("--min-p",),
        kind=float,
        lo=0,
        hi=1,
    )
    repeat_penalty: float = option(
        1.0,
        "Penalty on recent tokens.",
        flags=("--repeat-penalty",),
        kind=float,
        lo=0,
        lo_open=True,
    )
    repeat_last_n: int = option(
        64, "How many recent tokens the repeat penalty looks at.", kind=int, lo=0
    )
    seed: int = option(None, "Random seed (default: random).", flags=("--seed",), kind=int)


@dataclass(frozen=True)
class Generation(Group):
    """What `meldlite run` generates from."""

    prompt: str = option("Once upon a time", "Prompt text.", flags=("-p", "--prompt"))
    prompt_file: str = option(
        None,
        "Read the prompt from FILE (UTF-8; one trailing newline dropped, as llama.cpp "
        "does); '-' reads standard input. Not with -p.",
        flags=("-f", "--file"),
        metavar="FILE",
    )
    max_tokens: int = option(
        128, "Tokens to generate at most.", flags=("-n", "--n-predict"), kind=int, lo=0
    )


@dataclass(frozen=True)
class Serve(Group):
    """A peer server (`meldlite peer`, `transports.peer.PeerServer`)."""

    listen: str = option(
        "tcp://127.0.0.1:5555",
        "tcp://HOST:PORT to bind (port 0: any free port, printed at start).",
        flags=("--listen",),
        metavar="ENDPOINT",
    )
    mem_budget: object = mem_budget_option()
    keys: object = option(
        None,
        "Key directory from `meldlite keygen`: serve with CURVE, accept only its "
        "authorized/ client keys.",
        flags=("--keys",),
        kind="dir",
    )
    insecure: bool = option(
        False,
        "Allow listening beyond loopback without keys (anyone can connect).",
        flags=("--insecure",),
        kind=bool,
    )
    heartbeat: float = option(
        1.0,
        "Seconds between heartbeats to each coordinator.",
        flags=("--heartbeat",),
        kind=float,
        lo=0.01,
        hi=3600,
    )


LOAD_GROUPS = (Runtime, Store, Peers)  # what `meldlite.load`'s keywords fill


def load_keywords():
    """{keyword of `meldlite.load`: (group, field name, default)} in declaration order."""
    out = {}
    for group in LOAD_GROUPS:
        for name, (opt, default) in group.opts().items():
            if opt.keyword != "":
                out[opt.keyword or name] = (group, name, default)
    return out


def from_keywords(options):
    """`meldlite.load`'s keywords -> {"runtime": Runtime, "store": Store, "peers": Peers or None}.

    Peer options are read only when `peers` is given. TypeError for an unknown keyword."""
    table = load_keywords()
    values = {group: {} for group in LOAD_GROUPS}
    for key, value in options.items():
        if key not in table:
            raise TypeError(f"load() got an unexpected keyword argument {key!r}")
        group, name, _ = table[key]
        values[group][name] = value
    return {
        "runtime": Runtime(**values[Runtime]),
        "store": Store(**values[Store]),
        "peers": Peers(**values[Peers]) if values[Peers].get("endpoints") else None,
    }
