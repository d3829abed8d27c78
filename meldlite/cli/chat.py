"""`meldlite chat`: an interactive terminal chat with MODEL."""

from pathlib import Path

import click

from meldlite.cli import command
from meldlite.cli.options import declared
from meldlite.options import Generation, Peers, Runtime, Sampler, Store

HELP_LINE = "Type a message. /reset starts over, /exit or Ctrl-D quits, Ctrl-C stops an answer."


@command("chat")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@declared(Generation, "max_tokens")
@declared(Sampler)
@declared(Runtime, "n_threads", "n_ctx", "n_batch")
@declared(Store)
@declared(Runtime, "min_expert_weight", "cold")
@click.option("--system", default=None, help="A system message that opens the conversation.")
@click.option(
    "--chat-template",
    "template_file",
    type=click.Path(exists=True, dir_okay=False),
    help="A Jinja chat template file to use instead of the model's.",
)
@declared(Peers)
def chat(model, system, template_file, **options):
    """Chat with MODEL (default: the built-in model) in the terminal."""
    from meldlite.api import Model
    from meldlite.tokenizer.chat import ChatTemplate

    gen, sampler = Generation.take(options), Sampler.take(options)
    runtime, store = Runtime.take(options), Store.take(options)
    peers = Peers.take(options) if options.get("endpoints") else None
    m = Model(model, runtime=runtime, store=store, peers=peers)
    template = None
    if template_file:
        text = Path(template_file).read_text(errors="replace")
        template = ChatTemplate.for_model(m.gguf.metadata, m.tokenizer, override=text)
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    click.echo(HELP_LINE, err=True)
    try:
        while (line := _read_line()) is not None:
            if line.strip() == "/exit":
                break
            if line.strip() == "/reset":
                history = list(opening)
                m.cache.reset()
                continue
            if line.strip():
                history.append({"role": "user", "content": line})
                reply = m.chat(
                    history, max_tokens=gen.max_tokens, sampler=sampler, template=template
                )
                history.append({"role": "assistant", "content": _stream(reply)})
    finally:
        m.close()


def _read_line():
    """The user's next line, or None at end of input (Ctrl-D) or Ctrl-C."""
    try:
        return click.prompt("", prompt_suffix="> ", default="", show_default=False)
    except (EOFError, KeyboardInterrupt, click.Abort):
        click.echo(err=True)
        return None


def _stream(reply):
    """Print the reply's pieces as they come; Ctrl-C ends the answer, not the chat."""
    try:
        for piece in reply:
            click.echo(piece, nl=False)
    except KeyboardInterrupt:
        click.echo(" [stopped]", nl=False)
    click.echo()
    return reply.text
