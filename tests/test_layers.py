"""The layer contract in pyproject.toml ([tool.importlinter]) holds: no module
imports from a layer above its own, and no import cycle joins sibling modules."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_and_no_cycles():
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout
