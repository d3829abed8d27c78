"""The command line: output, timing line, and one-line errors with exit status 2."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from meldlite.cli import main
from meldlite.cli.run import timing_line


def run_cli(*args, input=None):
    """Run `python -m meldlite` in a subprocess: real exit codes, real streams."""
    return subprocess.run(
        [sys.executable, "-m", "meldlite", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        input=input,
    )


def test_run_default_model_streams_text_and_reports_speed():
    r = run_cli("run", "-p", "Once upon a time", "-n", "12", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time") and len(r.stdout) > len("Once upon a time") + 10
    last = r.stderr.strip().splitlines()[-1]
    assert "prefill:" in last and "decode:" in last and "peak RSS:" in last


def test_timing_line_gives_rates_only_from_enough_tokens():
    t = {"prefill_tokens": 5, "prefill_s": 0.61, "decode_tokens": 40, "decode_s": 800.0}
    line = timing_line(t, 2**20)
    assert line == (
        "prefill: 5 tokens in 610 ms, decode: 40 tokens in 800.00 s (0.05 tok/s), peak RSS: 1.0 MiB"
    )
    t = {"prefill_tokens": 64, "prefill_s": 0.5, "decode_tokens": 1, "decode_s": 0.004}
    assert timing_line(t, 0).startswith(
        "prefill: 64 tokens in 500 ms (128.0 tok/s), decode: 1 token in 4.00 ms,"
    )
    t = {"prefill_tokens": 3, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}
    assert timing_line(t, 0).startswith("prefill: 3 tokens in 0.00 ms, decode: 0 tokens,")


@pytest.mark.parametrize(
    "args, stopped",
    [
        (
            ["-n", "300", "-c", "16"],
            "stopped: the context of 16 tokens is full (use -c to enlarge it)",
        ),
        (["-n", "3"], "stopped: 3 tokens generated (the -n limit)"),
        (
            ["-p", "And they lived happily ever after. The end.", "-n", "50"],
            "stopped: end-of-generation token",
        ),
    ],
)
def test_run_says_why_generation_stopped(args, stopped):
    r = run_cli("run", "--temp", "0", *args)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-2] == stopped and lines[-1].startswith("prefill:"), r.stderr
    assert " 0.0 tok/s" not in r.stderr


def test_run_reads_the_prompt_from_a_file_or_standard_input(tmp_path):
    text = "Tom had a red ball. Он любил играть."  # non-ASCII: decoded as UTF-8
    greedy = ("-n", "8", "--temp", "0")
    expected = run_cli("run", "-p", text, *greedy)
    assert expected.returncode == 0, expected.stderr
    path = tmp_path / "prompt.txt"
    path.write_text(text + "\n", encoding="utf-8")  # one trailing newline is dropped
    from_file = run_cli("run", "-f", str(path), *greedy)
    from_stdin = run_cli("run", "-f", "-", *greedy, input=text + "\n")
    assert from_file.returncode == 0 and from_stdin.returncode == 0, from_file.stderr
    assert from_file.stdout == expected.stdout == from_stdin.stdout
    assert expected.stdout.startswith(text) and len(expected.stdout) > len(text) + 1


def test_run_prompt_file_that_is_not_utf8_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Once upon a caf\u00e9".encode("latin-1"))
    r = run_cli("run", "-f", str(path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"meldlite: error: {path} is not UTF-8 text (byte 15: unexpected end of data)"
    ]


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
        (["run", "-f", "/nonexistent/prompt.txt"], "No such file or directory"),
        (["run", "-p", "Hi", "-f", "-"], "not both"),
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
