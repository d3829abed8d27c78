"""`meldlite run`: generate text, streaming it to stdout."""

import click

from meldlite.cli import command


@command("run")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("-p", "--prompt", default="Once upon a time", show_default=True, help="Prompt text.")
@click.option("-n", "--n-predict", "max_tokens", default=128, show_default=True,
              type=click.IntRange(min=0), help="Tokens to generate at most.")
@click.option("--temp", default=0.8, show_default=True, type=click.FloatRange(min=0),
              help="Temperature; 0 is greedy.")
@click.option("--top-k", default=40, show_default=True, type=click.IntRange(min=0),
              help="Keep the k most likely tokens (0: off).")
@click.option("--top-p", default=0.95, show_default=True,
              type=click.FloatRange(min=0, max=1, min_open=True), help="Nucleus mass.")
@click.option("--min-p", default=0.05, show_default=True, type=click.FloatRange(0, 1),
              help="Minimum probability relative to the top token.")
@click.option("--repeat-penalty", default=1.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="Penalty on recent tokens.")
@click.option("--seed", default=None, type=int, help="Random seed (default: random).")
@click.option("-t", "--threads", default=None, type=click.IntRange(min=1),
              help="Compute threads (default: all cores).")
@click.option("-c", "--ctx-size", default=None, type=click.IntRange(min=1),
              help="Context length (default: the model's, at most 4096).")
def run(model, prompt, max_tokens, temp, top_k, top_p, min_p, repeat_penalty, seed, threads,
        ctx_size):
    """Generate a continuation of PROMPT with MODEL (default: the built-in model)."""
    import meldlite
    m = meldlite.load(model, n_ctx=ctx_size, n_threads=threads)
    click.echo(prompt, nl=False)
    for piece in m.generate(prompt, max_tokens=max_tokens, temperature=temp, top_k=top_k,
                            top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed):
        click.echo(piece, nl=False)
    click.echo()
    click.echo(timing_line(m.timings, m.stats()["peak_rss_bytes"]), err=True)


def timing_line(t, peak_rss):
    def rate(n, s):
        return n / s if s > 0 else 0.0
    return (f"prefill: {rate(t['prefill_tokens'], t['prefill_s']):.1f} tok/s "
            f"({t['prefill_tokens']} tokens), decode: {rate(t['decode_tokens'], t['decode_s']):.1f} "
            f"tok/s ({t['decode_tokens']} tokens), peak RSS: {peak_rss / 2**20:.1f} MiB")
