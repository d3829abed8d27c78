"""`make_store`: the local expert store that the `Store` options ask for."""

from meldlite.errors import BudgetError
from meldlite.experts.cache import CachedStore
from meldlite.experts.seed import metadata_seed
from meldlite.experts.store import ResidentStore
from meldlite.formats.profile import load_prior
from meldlite.options import DEFAULT_IO, DEFAULT_POLICY, Store
from meldlite.units import parse_budget, parse_rate


def expert_bytes(gguf, cfg):
    """Bytes of the expert tensors in the file (pruned experts left out count 0)."""
    return sum(
        n
        for layer in range(cfg.n_layer)
        for e in range(cfg.n_expert)
        if gguf.expert_present(layer, e)
        for _, n in gguf.expert_ranges(layer, e)
    )


def make_store(gguf, cfg, weights, options=Store(), llama_numerics=True, sizing=None):
    """The local expert store that a `meldlite.options.Store` asks for: a
    ResidentStore without a memory budget, else a CachedStore of `mem_budget`, or of
    the budget `sizing` (an `experts.limit.LimitSizing`) derives from `mem_limit`,
    at most the experts' bytes."""
    if not options.budgeted:
        return ResidentStore(gguf, cfg, llama_numerics)
    total = expert_bytes(gguf, cfg)
    if sizing is None:
        budget = parse_budget(options.mem_budget, total)
        return _cached_store(gguf, cfg, weights, options, llama_numerics, budget)
    budget = min(max(sizing.budget, 1), total)
    try:
        return _cached_store(gguf, cfg, weights, options, llama_numerics, budget)
    except BudgetError as e:
        raise sizing.too_small(e.minimum) from None


def _cached_store(gguf, cfg, weights, options, llama_numerics, budget):
    profile = options.profile
    seed = None if profile is not None else metadata_seed(gguf.metadata, cfg.n_layer, cfg.n_expert)
    prior = load_prior(profile, cfg) if profile is not None else (seed.prior() if seed else None)
    store = CachedStore(
        gguf,
        cfg,
        weights,
        budget,
        policy=options.cache_policy or DEFAULT_POLICY,
        prefetch=options.prefetch,
        mechanism=options.expert_io or DEFAULT_IO,
        llama_numerics=llama_numerics,
        io_throttle=parse_rate(options.io_throttle),
        prior=prior,
    )
    if seed is not None:  # a compressed file's popularity: most popular resident first
        try:
            store.preload(seed.order())
        except BaseException:
            store.close()
            raise
    return store
