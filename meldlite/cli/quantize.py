"""`meldlite quantize`: a float GGUF to a uniform or per-expert mixed quantized file."""

import click

from meldlite.cli import command


@command("quantize")
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option(
    "--type",
    "qtype",
    default=None,
    help="One type for every weight (e.g. Q4_K): llama.cpp's stacked layout.",
)
@click.option(
    "--size", default=None, help='Size budget of a per-expert mixed file: bytes, "300MB", "12MiB".'
)
@click.option(
    "--bpw",
    default=None,
    type=float,
    help="Bits per weight of a per-expert mixed file (instead of --size).",
)
@click.option(
    "--profile",
    "profile_path",
    default=None,
    type=click.Path(dir_okay=False),
    help="`meldlite profile` output with calibration data (needed by --size/--bpw).",
)
@click.option(
    "--prune-experts",
    "prune",
    default=None,
    metavar="N|FRACTION",
    help="Then leave out the N (or FRACTION) least used experts of each layer "
    "(popularity from --profile): OUT is in the per-expert layout.",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def quantize(src, out, qtype, size, bpw, profile_path, prune, quiet):
    """Quantize SRC (F32/F16/BF16 GGUF; MXFP4 experts allowed) into OUT."""
    from meldlite.compress.quantize import quantize_model

    if prune is not None:
        from meldlite.compress.prune import check_request

        check_request(src, profile_path, prune)  # bad values fail before writing
    bar = None

    def progress(done, total, what):
        nonlocal bar
        if quiet:
            return
        if bar is None or bar.label != what:
            if bar is not None:
                bar.render_finish()
            bar = click.progressbar(length=total, label=what, file=click.get_text_stream("stderr"))
        bar.update(done - bar.pos)

    try:
        uniform_pruned = qtype is not None and prune is not None  # the profile is for pruning
        r = quantize_model(
            src,
            out,
            qtype=qtype,
            size=size,
            bpw=bpw,
            profile=None if uniform_pruned else profile_path,
            progress=progress,
        )
    finally:
        if bar is not None:
            bar.render_finish()
    types = ", ".join(f"{k} x{v}" for k, v in sorted(r.tensor_types.items()))
    budget = f" (budget {r.budget:,})" if r.budget else ""
    click.echo(f"wrote {r.path}: {r.nbytes:,} bytes{budget}; tensors {types}")
    if prune is not None:
        from meldlite.compress.prune import prune_file

        p = prune_file(out, out, profile_path, prune)
        click.echo(f"pruned {p.n_pruned} experts: {p.nbytes:,} bytes")
