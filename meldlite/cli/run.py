"""`meldlite run`: generate text, streaming it to stdout."""

import click

from meldlite.cli import command
from meldlite.cli.options import declared
from meldlite.options import Generation, Peers, Runtime, Sampler, Store


@command("run")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@declared(Generation, "prompt", "max_tokens")
@declared(Sampler)
@declared(Runtime, "n_threads", "n_ctx")
@declared(Store)
@declared(Runtime, "min_expert_weight", "cold")
@click.option("--stats", "show_stats", is_flag=True, help="Print the expert store's counters.")
@declared(Peers)
def run(model, show_stats, **options):
    """Generate a continuation of PROMPT with MODEL (default: the built-in model)."""
    from meldlite.api import Model

    gen, sampler = Generation.take(options), Sampler.take(options)
    runtime, store = Runtime.take(options), Store.take(options)
    peers = Peers.take(options) if options.get("endpoints") else None
    m = Model(model, runtime=runtime, store=store, peers=peers)
    click.echo(gen.prompt, nl=False)
    for piece in m.generate(gen.prompt, max_tokens=gen.max_tokens, sampler=sampler):
        click.echo(piece, nl=False)
    click.echo()
    stats = m.stats()
    m.close()
    click.echo(timing_line(m.timings, stats["peak_rss_bytes"]), err=True)
    if show_stats:
        click.echo(stats_text(stats), err=True)


def stats_text(stats):
    """`key: value` lines of Model.stats(), the required counters first."""
    first = (
        "expert_hits",
        "expert_misses",
        "hit_rate",
        "bytes_read",
        "prefetch_issued",
        "prefetch_useful",
        "stall_seconds",
        "peak_rss_bytes",
    )
    keys = [k for k in first if k in stats] + sorted(k for k in stats if k not in first)

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [f"{k}: {fmt(stats[k])}" for k in keys if not isinstance(stats[k], list)]
    for p in stats.get("peers") or []:  # one line per peer (RemoteStore)
        lines.append(
            f"peer {p['address']}: {p['state']}, {p['requests']} requests, "
            f"{p['bytes_out']} B out, {p['bytes_in']} B in, {p['deaths']} losses"
        )
    return "\n".join(lines)


def timing_line(t, peak_rss):
    def rate(n, s):
        return n / s if s > 0 else 0.0

    return (
        f"prefill: {rate(t['prefill_tokens'], t['prefill_s']):.1f} tok/s "
        f"({t['prefill_tokens']} tokens), decode: {rate(t['decode_tokens'], t['decode_s']):.1f} "
        f"tok/s ({t['decode_tokens']} tokens), peak RSS: {peak_rss / 2**20:.1f} MiB"
    )
