"""`meldlite place`: assign experts to peers from a routing profile."""

import click

from meldlite.cli import command


@command("place")
@click.argument("profile", type=click.Path(dir_okay=False))
@click.option(
    "--peers", "n_peers", required=True, type=click.IntRange(1, 256), help="Number of peers."
)
@click.option(
    "--budget",
    default=None,
    metavar="SIZE[,SIZE...]",
    help='Expert memory per peer, one for all or one per peer, e.g. "64MB" '
    "(needs --model for the expert sizes).",
)
@click.option(
    "--model",
    default=None,
    type=click.Path(dir_okay=False),
    help="The model the profile was made with (expert sizes for --budget).",
)
@click.option(
    "--replicate",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Also copy this many of each layer's most popular experts to a second peer.",
)
@click.option(
    "--local-budget",
    default=None,
    metavar="SIZE",
    help='Let the coordinator hold experts too, up to SIZE (node "local").',
)
@click.option(
    "--slack",
    default=0.1,
    show_default=True,
    type=click.FloatRange(0, 10),
    help="Allowed excess of a node's expert work over the even share.",
)
@click.option("--round-robin", is_flag=True, help="Write the round-robin baseline instead.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Placement file to write (JSON) for `meldlite run --placement`.",
)
def place_cmd(profile, n_peers, budget, model, replicate, local_budget, slack, round_robin, output):
    """Place experts on peers from PROFILE (`meldlite profile`): co-firing experts
    together, even expert work per token, within each peer's memory budget."""
    import numpy as np

    from meldlite.errors import OptionError
    from meldlite.transports import placement as pl
    from meldlite.units import parse_size

    prof = pl.routing_stats_from_profile(profile)
    sizes = np.ones((prof.n_layer, prof.n_expert), np.int64)
    if model is not None:
        from meldlite.formats import read_gguf

        sizes = pl.expert_sizes(read_gguf(model), prof.n_layer, prof.n_expert)
    elif budget or local_budget:
        raise OptionError(
            "--budget and --local-budget need --model (the expert sizes come from it)"
        )
    budgets = None
    if budget:
        parts = [parse_size(b, "--budget") for b in budget.split(",")]
        if len(parts) not in (1, n_peers):
            raise OptionError(f"--budget: give one size or {n_peers}, got {len(parts)}")
        budgets = parts * n_peers if len(parts) == 1 else parts
    local = parse_size(local_budget, "--local-budget") if local_budget else 0
    rr = pl.round_robin(prof.n_layer, prof.n_expert, n_peers)
    rr.summary = pl.placement_summary(rr, prof, sizes)
    if round_robin:
        result = rr
    else:
        result = pl.place(
            prof, n_peers, budgets, sizes, replicate=replicate, local_budget=local, slack=slack
        )
    result.save(output)
    click.echo(
        f"wrote {output}: {result.strategy} placement of {prof.n_layer} x {prof.n_expert} "
        f"experts on {n_peers} peers" + (" + local" if local and not round_robin else "")
    )
    for name, p in (("placement", result), ("round-robin", rr)):
        s = p.summary
        kept = "-" if s["coactivation_kept"] is None else f"{100 * s['coactivation_kept']:.1f}%"
        mib = ", ".join(f"{b / 2**20:.1f}" for b in s["bytes"]) if model else "-"
        click.echo(
            f"  {name:12s} co-activation kept on one node {kept}, load max/mean "
            f"{s['load_imbalance']:.3f}, replicas {s['replicas']}, MiB per node [{mib}]"
        )
