"""llama.cpp's real vocabulary files (`models/ggml-vocab-*.gguf` and their `.inp`/`.out`
test texts) and real chat templates (`models/templates/*.jinja`) for the installed llama-cpp-python: from MELDLITE_LLAMA_CPP_SRC (a
`vendor/llama.cpp` directory) when set, else from its source distribution, fetched
from PyPI once (`pip download`, as CI can) and cached outside the repository."""

import importlib.metadata
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

MARKS = ("/vendor/llama.cpp/models/ggml-vocab-", "/vendor/llama.cpp/models/templates/")


def vocab_dir():
    """The directory holding ggml-vocab-*.gguf and the *.jinja templates, or None
    when it cannot be had."""
    env = os.environ.get("MELDLITE_LLAMA_CPP_SRC")
    if env:
        return Path(env) / "models"  # templates: under models/templates there
    version = importlib.metadata.version("llama-cpp-python")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = base / "meldlite-tests" / f"llama.cpp-{version}-models"
    if (cache / "complete").exists():
        return cache
    local = Path(f"/tmp/sdist/llama_cpp_python-{version}.tar.gz")  # a developer's copy
    try:
        if local.exists():
            _extract(local, cache)
        else:
            with tempfile.TemporaryDirectory() as d:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                     ":all:", f"llama-cpp-python=={version}", "-d", d],
                    check=True, capture_output=True, timeout=900,
                )  # fmt: skip
                _extract(next(Path(d).glob("*.tar.gz")), cache)
    except (OSError, subprocess.SubprocessError, StopIteration, tarfile.TarError):
        return None
    return cache


def _extract(tar_path, cache):
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if any(m in member.name for m in MARKS) and member.isfile():
                data = tar.extractfile(member).read()
                (cache / member.name.rsplit("/", 1)[1]).write_bytes(data)
    (cache / "complete").touch()


def llamacpp_file(name):
    """Path of one of those files (a vocabulary or a template), or None."""
    folder = vocab_dir()
    if folder is None:
        return None
    for path in (folder / name, folder / "templates" / name):
        if path.exists():
            return path
    return None
