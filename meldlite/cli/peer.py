"""`meldlite peer`: serve experts to coordinators over ZeroMQ."""

import logging
import sys

import click

from meldlite.cli import command


@command("peer")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--listen",
    default="tcp://127.0.0.1:5555",
    show_default=True,
    metavar="ENDPOINT",
    help="tcp://HOST:PORT to bind (port 0: any free port, printed at start).",
)
@click.option(
    "--mem-budget",
    default=None,
    metavar="SIZE",
    help='Most expert bytes this peer holds, e.g. "512MB" (default: no limit).',
)
@click.option(
    "--keys",
    default=None,
    type=click.Path(file_okay=False),
    help="Key directory from `meldlite keygen`: serve with CURVE, accept only its "
    "authorized/ client keys.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow listening beyond loopback without keys (anyone can connect).",
)
@click.option(
    "-t",
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="Kernel threads (default: all cores).",
)
@click.option(
    "--heartbeat",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.01, 3600),
    help="Seconds between heartbeats to each coordinator.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log every session change.")
def peer(model, listen, mem_budget, keys, insecure, threads, heartbeat, verbose):
    """Serve experts of MODEL (or, without MODEL, experts the coordinator sends)."""
    from meldlite.transports import security
    from meldlite.transports.peer import PeerServer
    from meldlite.units import parse_size

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s meldlite peer: %(levelname)s %(message)s",
    )
    security.check_exposure(listen, keys, insecure, "--listen")
    budget = None if mem_budget is None else parse_size(mem_budget, "--mem-budget")
    server = PeerServer(
        model, listen, mem_budget=budget, keys=keys, threads=threads, heartbeat=heartbeat
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
