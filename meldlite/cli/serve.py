"""`meldlite serve`: an OpenAI-compatible HTTP server (needs `meldlite[server]`)."""

from pathlib import Path

import click

from meldlite.cli import command
from meldlite.cli.options import declared
from meldlite.errors import OptionError
from meldlite.options import Peers, Runtime, Store

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@command("serve")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port."
)
@click.option(
    "--api-key",
    envvar="MELDLITE_API_KEY",
    default=None,
    help="Require `Authorization: Bearer KEY` on /v1/ requests (also $MELDLITE_API_KEY).",
)
@declared(Runtime, "n_threads", "n_ctx", "n_batch", "n_parallel", defaults={"n_parallel": 4})
@declared(Store)
@declared(Runtime, "min_expert_weight", "cold")
@declared(Peers)
def serve(model, host, port, api_key, **options):
    """Serve MODEL (default: the built-in model) with OpenAI's /v1/chat/completions,
    /v1/completions and /v1/models, and /health. Up to --parallel requests are
    decoded together (continuous batching), each in its own KV cache of --ctx-size
    positions; more wait their turn. Listens on loopback unless --host says otherwise."""
    try:
        import uvicorn

        from meldlite.server import create_app
    except ImportError as e:
        raise OptionError(
            f"serve needs the server extra: pip install 'meldlite[server]' ({e})"
        ) from None
    from meldlite.api import Model

    if host not in LOOPBACK and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who reaches it may use it",
                   err=True)  # fmt: skip
    runtime, store = Runtime.take(options), Store.take(options)
    peers = Peers.take(options) if options.get("endpoints") else None
    m = Model(model, runtime=runtime, store=store, peers=peers)
    name = Path(model).stem if model else "meldlite-builtin"
    try:
        app = create_app(m, name, api_key=api_key or None)
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    finally:
        m.close()
