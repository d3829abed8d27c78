"""The `meldlite` command: a thin click layer over the library.

Each subcommand lives in its own module and registers itself on `main` with
`@command()`, which turns any `MeldliteError` (and other bad-input errors) into
one line on stderr and exit status 2.
"""

import functools
import sys

import click

from meldlite.errors import MeldliteError


class OneLineErrors(click.Group):
    """A click group whose usage errors are one line on stderr and exit status 2."""

    def main(self, args=None, prog_name=None, **kwargs):
        try:
            rv = super().main(args=args, prog_name=prog_name, standalone_mode=False, **kwargs)
        except click.UsageError as e:
            fail(e.format_message().replace("\n", " "))
        except click.ClickException as e:
            fail(e.format_message())
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meldlite")
def main():
    """Run Mixture-of-Experts GGUF models on CPU-only edge devices."""


def command(*args, **kwargs):
    """`main.command` whose body reports MeldliteError/OSError as one line, exit 2."""

    def wrap(fn):
        @functools.wraps(fn)
        def guarded(*a, **kw):
            try:
                return fn(*a, **kw)
            except MeldliteError as e:
                fail(str(e))
            except OSError as e:
                fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))

        return main.command(*args, **kwargs)(guarded)

    return wrap


def fail(message):
    """Print one line of error on stderr and exit with status 2."""
    click.echo(f"meldlite: error: {message}", err=True)
    sys.exit(2)


def _register():
    """Import the subcommand modules so they attach themselves to `main`."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


_register()
