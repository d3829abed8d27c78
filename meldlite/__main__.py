"""`python -m meldlite` is the `meldlite` command."""

from meldlite.cli import main

main(prog_name="meldlite")
