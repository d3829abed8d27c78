"""`meldlite perplexity`: perplexity of a text file."""

import click

from meldlite.cli import command
from meldlite.cli.options import declared
from meldlite.options import Runtime


@command("perplexity")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("textfile", type=click.File("r", encoding="utf-8"))
@click.option(
    "--separator",
    default="<|endoftext|>",
    show_default=True,
    help="Evaluate each document between separators alone ('' for one text).",
)
@declared(Runtime, "n_ctx", "n_threads")
def perplexity(model, textfile, separator, **options):
    """Perplexity of MODEL on TEXTFILE."""
    from meldlite.api import Model

    m = Model(model, runtime=Runtime.take(options))
    click.echo(f"{m.perplexity(textfile.read(), separator=separator or None):.4f}")
