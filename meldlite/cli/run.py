"""`meldlite run`: generate text, streaming it to stdout."""

import sys

import click

from meldlite.cli import command
from meldlite.cli.options import declared
from meldlite.errors import OptionError
from meldlite.options import Generation, Peers, Runtime, Sampler, Store

RATE_MIN_TOKENS = 32  # fewer: a rate mostly measures per-call fixed costs; the time alone
STOPPED = {
    "eog": "stopped: end-of-generation token",
    "max_tokens": "stopped: {max_tokens} tokens generated (the -n limit)",
    "context_full": "stopped: the context of {n_ctx} tokens is full (use -c to enlarge it)",
}


@command("run")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@declared(Generation, "prompt", "prompt_file", "max_tokens")
@declared(Sampler)
@declared(Runtime, "n_threads", "n_ctx", "n_batch")
@declared(Store)
@declared(Runtime, "min_expert_weight", "cold")
@click.option("--stats", "show_stats", is_flag=True, help="Print the expert store's counters.")
@declared(Peers)
def run(model, show_stats, **options):
    """Generate a continuation of PROMPT with MODEL (default: the built-in model).

    The prompt is -p TEXT, or -f FILE (-f - reads standard input, e.g.
    `cat story.txt | meldlite run -f -`). Afterwards stderr tells why generation
    stopped and the prefill and decode times: tokens and time, and tokens per
    second from 32 tokens on (fewer are dominated by fixed costs, and the first
    run of a process includes loading or compiling the kernels)."""
    from meldlite.api import Model

    options["prompt"] = _prompt(options["prompt"], options.pop("prompt_file"))
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
    reason = STOPPED[m.timings["stop_reason"]]
    click.echo(reason.format(max_tokens=gen.max_tokens, n_ctx=m.n_ctx), err=True)
    click.echo(timing_line(m.timings, stats["peak_rss_bytes"]), err=True)
    if show_stats:
        click.echo(stats_text(stats), err=True)


def _prompt(text, path):
    """The prompt: `text` (-p), or the file at `path` (-f; "-": standard input) as
    UTF-8 without one trailing newline (as llama.cpp's -f reads it)."""
    if path is None:
        return text
    if click.get_current_context().get_parameter_source("prompt").name != "DEFAULT":
        raise OptionError("give the prompt with -p or with -f, not both")
    name = "standard input" if path == "-" else path
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        with open(path, "rb") as f:
            data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise OptionError(f"{name} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    return text[:-1] if text.endswith("\n") else text


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
    """The prefill and decode times and peak RSS, e.g. "prefill: 5 tokens in 106 ms,
    decode: 127 tokens in 130 ms (977 tok/s), peak RSS: 214.7 MiB"."""
    return (
        f"prefill: {_span(t['prefill_tokens'], t['prefill_s'])}, "
        f"decode: {_span(t['decode_tokens'], t['decode_s'])}, "
        f"peak RSS: {peak_rss / 2**20:.1f} MiB"
    )


def _span(n, s):
    """ "N tokens in TIME", with the rate from RATE_MIN_TOKENS tokens on."""
    if n == 0:
        return "0 tokens"
    text = f"{n} token{'s' if n != 1 else ''} in {_duration(s)}"
    if n >= RATE_MIN_TOKENS and s > 0:
        text += f" ({_significant(n / s)} tok/s)"
    return text


def _duration(s):
    if s < 0.01:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def _significant(x):
    """x with one decimal, or two significant digits below 1 (never "0.0")."""
    return f"{x:.1f}" if x >= 1 else f"{x:.2g}"
