"""`meldlite keygen`: CurveZMQ key pairs for peers and coordinators."""

import click

from meldlite.cli import command


@command("keygen")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option(
    "--name", default=None, help="Write only one more key pair NAME.key / NAME.key_secret."
)
@click.option("--force", is_flag=True, help="Replace existing keys.")
def keygen(directory, name, force):
    """Write CurveZMQ keys into DIRECTORY for `meldlite peer --keys` and `run --keys`."""
    from meldlite.transports.security import keygen as make

    paths = make(directory, name=name, force=force)
    for p in paths:
        click.echo(f"wrote {p}")
    if not name:
        click.echo(
            f"peers need {directory}/peer.key_secret and {directory}/authorized/; "
            f"the coordinator needs {directory}/coordinator.key_secret and {directory}/peer.key "
            f"(keep *.key_secret private)"
        )
