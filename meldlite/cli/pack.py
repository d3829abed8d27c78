"""`meldlite pack`: per-expert layout with a quantization type chosen per expert."""

import click

from meldlite.cli import command
from meldlite.errors import OptionError

SPEC_HELP = """Which source each expert comes from (its type label).
Inline: a default, then overrides, the last matching one wins:
"Q4_K,3.*=Q8_0,0.5=Q6_K" (layer 3 from Q8_0, expert 5 of layer 0
from Q6_K); selectors are N, A-B or *, e.g. "*.0=Q8_0", "2-4=Q8_0".
Or a JSON file: {"default": "Q4_K", "layers": {"3": "Q8_0"},
"experts": {"0.5": "Q6_K"}}. SRC is labelled SRC, by its file type
(e.g. Q4_K_M) and by its expert type (e.g. Q4_K)."""


@command("pack")
@click.argument("src")
@click.argument("out")
@click.option("--expert-types", "spec", required=True, metavar="SPEC", help=SPEC_HELP)
@click.option(
    "--from",
    "sources",
    multiple=True,
    metavar="LABEL=FILE",
    help="Another quantization of the same model, as source LABEL (repeatable).",
)
@click.option(
    "--prune-experts",
    "prune",
    default=None,
    metavar="N|FRACTION",
    help="Leave out the N (or FRACTION) least used experts of each layer "
    "(popularity from --profile); they are never routed.",
)
@click.option(
    "--profile",
    "profile_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="`meldlite profile` output giving expert popularity (for --prune-experts).",
)
def pack(src, out, spec, sources, prune, profile_path):
    """Write OUT in meldlite's per-expert layout: every non-expert tensor and all
    metadata from SRC, each expert's bytes from the source SPEC names for it
    (copied, not re-quantized; gate/up/down keep that source's types)."""
    from meldlite.formats.pack import pack as pack_file

    if prune is not None:
        from meldlite.compress.prune import check_request

        check_request(src, profile_path, prune)  # bad values fail before writing
    result = pack_file(src, out, spec, parse_sources(sources))
    counts = ", ".join(f"{label} x{n}" for label, n in sorted(result.labels.items()))
    click.echo(
        f"wrote {result.path}: {result.n_experts} experts ({counts}), "
        f"{result.nbytes / 2**20:.2f} MiB"
    )
    if prune is not None:
        from meldlite.compress.prune import prune_file

        p = prune_file(out, out, profile_path, prune)
        click.echo(f"pruned {p.n_pruned} experts: {p.nbytes / 2**20:.2f} MiB")


def parse_sources(items):
    """("LABEL=FILE", ...) -> {LABEL: FILE}."""
    sources = {}
    for item in items:
        label, eq, path = item.partition("=")
        if not eq or not label.strip() or not path.strip():
            raise OptionError(f"--from {item!r}: expected LABEL=FILE, e.g. Q8_0=model-q8_0.gguf")
        key = label.strip().upper()
        if key in sources:
            raise OptionError(f"--from label {key} given twice")
        sources[key] = path.strip()
    return sources
