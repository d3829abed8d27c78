"""`meldlite run`: generate text, streaming it to stdout."""

import click

from meldlite.cli import command


@command("run")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", default="Once upon a time", show_default=True, help="Prompt text.")
@click.option(
    "-n",
    "--n-predict",
    "max_tokens",
    default=128,
    show_default=True,
    type=click.IntRange(min=0),
    help="Tokens to generate at most.",
)
@click.option(
    "--temp",
    default=0.8,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Temperature; 0 is greedy.",
)
@click.option(
    "--top-k",
    default=40,
    show_default=True,
    type=click.IntRange(min=0),
    help="Keep the k most likely tokens (0: off).",
)
@click.option(
    "--top-p",
    default=0.95,
    show_default=True,
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="Nucleus mass.",
)
@click.option(
    "--min-p",
    default=0.05,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Minimum probability relative to the top token.",
)
@click.option(
    "--repeat-penalty",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Penalty on recent tokens.",
)
@click.option("--seed", default=None, type=int, help="Random seed (default: random).")
@click.option(
    "-t",
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="Compute threads (default: all cores).",
)
@click.option(
    "-c",
    "--ctx-size",
    default=None,
    type=click.IntRange(min=1),
    help="Context length (default: the model's, at most 4096).",
)
@click.option(
    "--mem-budget",
    default=None,
    metavar="SIZE",
    help='Memory for expert weights: "64MB", "1.5GB", "25%" of the expert bytes '
    "(default: all experts stay mapped).",
)
@click.option(
    "--policy",
    "cache_policy",
    default=None,
    type=click.Choice(["forecast", "lfu", "lru"]),
    help="Expert cache policy with --mem-budget (default: forecast).",
)
@click.option("--no-prefetch", is_flag=True, help="Load experts only when routed to.")
@click.option(
    "--profile",
    "profile",
    default=None,
    type=click.Path(dir_okay=False),
    help="A `meldlite profile` file whose popularity seeds the cache policy.",
)
@click.option(
    "--expert-io",
    default=None,
    type=click.Choice(["direct", "pread", "mmap"]),
    help="How experts are read: O_DIRECT or buffered pread into slabs, or the madvise'd map.",
)
@click.option(
    "--min-expert-weight",
    default=None,
    type=click.FloatRange(0, 1, max_open=True),
    help="Adaptive top-k: skip routed experts whose renormalised weight is below this.",
)
@click.option(
    "--io-throttle",
    default=None,
    metavar="RATE",
    help='Measurement aid: emulate storage of this bandwidth for expert reads, e.g. "200MB/s".',
)
@click.option(
    "--cold", is_flag=True, help="Measurement aid: drop the model file from the page cache first."
)
@click.option("--stats", "show_stats", is_flag=True, help="Print the expert store's counters.")
@click.option(
    "--peers",
    default=None,
    metavar="ENDPOINTS",
    help="Compute routed experts on `meldlite peer`s: tcp://HOST:PORT,... (docs/peers.md).",
)
@click.option(
    "--placement",
    default=None,
    type=click.Path(dir_okay=False),
    help="Expert placement file from `meldlite place` (default: round-robin).",
)
@click.option(
    "--wire",
    default="f32",
    show_default=True,
    type=click.Choice(["f32", "f16", "q8"]),
    help="Encoding of hidden states sent to peers.",
)
@click.option("--exact", is_flag=True, help="Peers' results bit-identical to one node (f32 only).")
@click.option(
    "--fuse",
    default=0.0,
    type=click.FloatRange(0, 1, max_open=True),
    help="Token fusion for prefill: merge near-identical states (relative distance).",
)
@click.option(
    "--link",
    default=None,
    metavar="RATE/LATENCY",
    help='Measurement aid: emulate a link to the peers, e.g. "100Mbit/5ms".',
)
@click.option(
    "--keys",
    default=None,
    type=click.Path(file_okay=False),
    help="CurveZMQ key directory from `meldlite keygen`.",
)
@click.option("--insecure", is_flag=True, help="Allow unencrypted peers beyond loopback.")
@click.option(
    "--peer-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.01),
    help="Seconds a peer has to answer a request before its work is done here.",
)
def run(
    model,
    prompt,
    max_tokens,
    temp,
    top_k,
    top_p,
    min_p,
    repeat_penalty,
    seed,
    threads,
    ctx_size,
    mem_budget,
    cache_policy,
    no_prefetch,
    profile,
    expert_io,
    min_expert_weight,
    io_throttle,
    cold,
    show_stats,
    peers,
    placement,
    wire,
    exact,
    fuse,
    link,
    keys,
    insecure,
    peer_timeout,
):
    """Generate a continuation of PROMPT with MODEL (default: the built-in model)."""
    import meldlite

    m = meldlite.load(
        model,
        n_ctx=ctx_size,
        n_threads=threads,
        mem_budget=mem_budget,
        cache_policy=cache_policy,
        prefetch=not no_prefetch,
        profile=profile,
        expert_io=expert_io,
        min_expert_weight=min_expert_weight,
        io_throttle=io_throttle,
        cold=cold,
        peers=peers,
        placement=placement,
        wire=wire,
        exact=exact,
        fuse=fuse,
        link=link,
        keys=keys,
        insecure=insecure,
        peer_timeout=peer_timeout,
    )
    click.echo(prompt, nl=False)
    for piece in m.generate(
        prompt,
        max_tokens=max_tokens,
        temperature=temp,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repeat_penalty=repeat_penalty,
        seed=seed,
    ):
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
