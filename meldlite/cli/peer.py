"""`meldlite peer`: serve experts to coordinators over ZeroMQ."""

import logging
import sys

import click

from meldlite.cli import command
from meldlite.cli.options import declared
from meldlite.options import Runtime, Serve


@command("peer")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@declared(Serve, "listen", "mem_budget", "keys", "insecure")
@declared(Runtime, "n_threads")
@declared(Serve, "heartbeat")
@click.option("-v", "--verbose", is_flag=True, help="Log every session change.")
def peer(model, n_threads, verbose, **options):
    """Serve experts of MODEL (or, without MODEL, experts the coordinator sends)."""
    from meldlite.transports import security
    from meldlite.transports.peer import PeerServer

    o = Serve.take(options)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s meldlite peer: %(levelname)s %(message)s",
    )
    security.check_exposure(o.listen, o.keys, o.insecure, "--listen")
    server = PeerServer(
        model,
        o.listen,
        mem_budget=o.mem_budget,
        keys=o.keys,
        threads=n_threads,
        heartbeat=o.heartbeat,
    )
    server.install_signal_handlers()
    what = f"experts of {model}" if model else "experts sent by the coordinator"
    click.echo(
        f"meldlite peer: listening on {server.endpoint} ({what}{', CURVE' if server.keys else ''})"
    )
    sys.stdout.flush()
    try:
        server.serve()
    finally:
        server.close()
