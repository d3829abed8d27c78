"""`meldlite perplexity`: perplexity of a text file."""

import click

from meldlite.cli import command


@command("perplexity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("textfile", type=click.File("r", encoding="utf-8"))
@click.option(
    "--separator",
    default="<|endoftext|>",
    show_default=True,
    help="Evaluate each document between separators alone ('' for one text).",
)
@click.option(
    "-c",
    "--ctx-size",
    default=None,
    type=click.IntRange(min=2),
    help="Context length (default: the model's).",
)
@click.option("-t", "--threads", default=None, type=click.IntRange(min=1))
def perplexity(model, textfile, separator, ctx_size, threads):
    """Perplexity of MODEL on TEXTFILE."""
    import meldlite

    m = meldlite.load(model, n_ctx=ctx_size, n_threads=threads)
    click.echo(f"{m.perplexity(textfile.read(), separator=separator or None):.4f}")
