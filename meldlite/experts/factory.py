"""`make_store`: the expert store that `meldlite.load`'s options ask for."""

from meldlite.errors import OptionError
from meldlite.experts.adaptive import check_min_weight
from meldlite.experts.budget import parse_budget, parse_rate
from meldlite.experts.cache import MECHANISMS, CachedStore
from meldlite.experts.policy import POLICIES
from meldlite.experts.seed import metadata_seed
from meldlite.experts.store import ResidentStore
from meldlite.formats.profile import load_prior

DEFAULT_POLICY = "forecast"  # chosen by benchmarks/offload.py, see docs/benchmarks.md
DEFAULT_IO = "direct"  # idem


def expert_bytes(gguf, cfg):
    """Bytes of the expert tensors in the file (pruned experts left out count 0)."""
    return sum(
        n
        for layer in range(cfg.n_layer)
        for e in range(cfg.n_expert)
        if gguf.expert_present(layer, e)
        for _, n in gguf.expert_ranges(layer, e)
    )


def make_store(
    gguf,
    cfg,
    weights,
    *,
    llama_numerics=True,
    mem_budget=None,
    cache_policy=None,
    prefetch=True,
    min_expert_weight=None,
    io_throttle=None,
    profile=None,
    expert_io=None,
):
    """A ResidentStore without mem_budget, else a CachedStore (see meldlite.load)."""
    min_weight = check_min_weight(min_expert_weight)
    if not isinstance(prefetch, bool):
        raise OptionError(f"prefetch must be True or False, got {prefetch!r}")
    if cache_policy is not None and cache_policy not in POLICIES:
        raise OptionError(f"cache_policy {cache_policy!r} is not one of {', '.join(POLICIES)}")
    if expert_io is not None and expert_io not in MECHANISMS:
        raise OptionError(f"expert_io {expert_io!r} is not one of {', '.join(MECHANISMS)}")
    rate = parse_rate(io_throttle)
    if mem_budget is None:
        for name, value in (
            ("cache_policy", cache_policy),
            ("io_throttle", io_throttle),
            ("profile", profile),
            ("expert_io", expert_io),
        ):
            if value is not None:
                raise OptionError(
                    f"{name} applies to a memory-budgeted store: give mem_budget "
                    f"too (e.g. mem_budget='100%')"
                )
        return ResidentStore(gguf, cfg, llama_numerics, min_expert_weight=min_weight)
    budget = parse_budget(mem_budget, expert_bytes(gguf, cfg))
    seed = None if profile is not None else metadata_seed(gguf.metadata, cfg.n_layer, cfg.n_expert)
    prior = load_prior(profile, cfg) if profile is not None else (seed.prior() if seed else None)
    store = CachedStore(
        gguf,
        cfg,
        weights,
        budget,
        policy=cache_policy or DEFAULT_POLICY,
        prefetch=prefetch,
        mechanism=expert_io or DEFAULT_IO,
        llama_numerics=llama_numerics,
        min_expert_weight=min_weight,
        io_throttle=rate,
        prior=prior,
    )
    if seed is not None:  # a compressed file's popularity: most popular resident first
        try:
            store.preload(seed.order())
        except BaseException:
            store.close()
            raise
    return store
