"""`meldlite profile`: record how a model routes a text (expert popularity,
co-activation, route recurrence, prefetch predictability) into a JSON file, and
a calibration sample of expert inputs into a sidecar .npz."""

import click

from meldlite.cli import command
from meldlite.cli.options import declared
from meldlite.options import Runtime


@command("profile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("textfile", type=click.File("r", encoding="utf-8"))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the profile (JSON, see docs/experts.md).",
)
@click.option(
    "--separator",
    default="<|endoftext|>",
    show_default=True,
    help="Run each document between separators alone ('' for one text).",
)
@click.option(
    "--max-tokens",
    default=None,
    type=click.IntRange(min=1),
    help="Stop after the document that reaches this many tokens.",
)
@declared(Runtime, "n_ctx", "n_threads")
@click.option(
    "--calib-rows",
    default=None,
    type=click.IntRange(min=0),
    help="Rows per layer of the calibration sample kept for `meldlite quantize` "
    "(default 4096, fewer for big models; 0: none).",
)
def profile(model, textfile, output, separator, max_tokens, calib_rows, **options):
    """Profile MODEL's expert routing on TEXTFILE into OUTPUT."""
    from meldlite.api import Model
    from meldlite.experts.profile import build_profile
    from meldlite.formats.profile import save_profile

    m = Model(model, runtime=Runtime.take(options))
    prof = build_profile(
        m,
        textfile.read(),
        separator=separator or None,
        max_tokens=max_tokens,
        text_name=getattr(textfile, "name", None),
        calib_rows=calib_rows,
    )
    save_profile(prof, output)
    s = prof["summary"]
    rec = ", ".join(f"{w}: {v:.3f}" for w, v in s["recurrence"].items())
    pred = s["prediction_overlap"]
    click.echo(
        f"wrote {output}: {prof['text']['tokens']} tokens, {prof['text']['documents']} documents; "
        f"route recurrence (window: share) {rec}; next-layer prediction overlap "
        f"{'-' if pred is None else f'{pred:.3f}'}; entropy/ln(n_expert) {s['entropy_ratio']:.3f}"
    )
