"""The command line: output, timing line, and one-line errors with exit status 2."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from meldlite.cli import main


def run_cli(*args):
    """Run `python -m meldlite` in a subprocess: real exit codes, real streams."""
    return subprocess.run(
        [sys.executable, "-m", "meldlite", *args], capture_output=True, text=True, timeout=300
    )


def test_run_default_model_streams_text_and_reports_speed():
    r = run_cli("run", "-p", "Once upon a time", "-n", "12", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > len("Once upon a time") + 10
    last = r.stderr.strip().splitlines()[-1]
    assert "prefill:" in last and "decode:" in last and "peak RSS:" in last


def test_info_reports_architecture_and_parameters():
    r = CliRunner().invoke(main, ["info"])
    assert r.exit_code == 0, r.output
    assert "qwen3moe" in r.output and "22,204,416 total" in r.output
    assert "expert types" in r.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "/nonexistent/model.gguf", "-n", "1"], "No such file"),
        (["run", "-n", "1", "--top-p", "5"], "top-p"),
        (["run", "-n", "-3"], "n-predict"),
        (["info", "/"], "File '/' is a directory."),
        (["frobnicate"], "No such command"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, needle):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0]


def test_corrupt_model_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    r = run_cli("run", str(bad), "-n", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_perplexity_command(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(
        "Once upon a time, there was a little girl.\n<|endoftext|>\n"
        "Tom had a red ball. He liked to play.\n<|endoftext|>\n"
    )
    r = run_cli("perplexity", "", str(text))
    assert r.returncode == 2  # an empty model path is an error, not the default model
    from meldlite.data import default_model_path

    r = run_cli("perplexity", default_model_path(), str(text))
    assert r.returncode == 0, r.stderr
    assert 1.0 < float(r.stdout) < 200.0
