"""`meldlite serve`: an OpenAI-compatible HTTP server (needs `meldlite[server]`)."""

from pathlib import Path

import click

from meldlite.cli import command
from meldlite.cli.options import declared
from meldlite.errors import OptionError
from meldlite.options import Peers, Runtime, Store


@command("serve")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port."
)
@declared(Runtime, "n_threads", "n_ctx")
@declared(Store)
@declared(Runtime, "min_expert_weight", "cold")
@declared(Peers)
def serve(model, host, port, **options):
    """Serve MODEL (default: the built-in model) with OpenAI's /v1/chat/completions,
    /v1/completions and /v1/models, and /health."""
    try:
        import uvicorn

        from meldlite.server import create_app
    except ImportError as e:
        raise OptionError(
            f"serve needs the server extra: pip install 'meldlite[server]' ({e})"
        ) from None
    from meldlite.api import Model

    runtime, store = Runtime.take(options), Store.take(options)
    peers = Peers.take(options) if options.get("endpoints") else None
    m = Model(model, runtime=runtime, store=store, peers=peers)
    name = Path(model).stem if model else "meldlite-builtin"
    try:
        uvicorn.run(create_app(m, name), host=host, port=port, log_level="info")
    finally:
        m.close()
