"""llama.cpp's greedy replies on the built-in model (the reference of the chat and server
tests) and a live `meldlite serve` process on a random loopback port."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from meldlite.data import default_model_path

REPO = Path(__file__).resolve().parents[1]


def llamacpp_greedy(ids, n, n_ctx=256):
    """llama.cpp's greedy continuation (n ids) of `ids` on the built-in model."""
    import llama_cpp

    llm = llama_cpp.Llama(str(default_model_path()), n_ctx=n_ctx, verbose=False, logits_all=True)
    try:
        out = []
        llm.eval(ids)
        for _ in range(n):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
            llm.eval([tok])
        return out
    finally:
        llm.close()


def llamacpp_gaps(ids, reply):
    """Teacher-forced through llama.cpp (the built-in model): for each reply token, how
    far its logit is below the largest (0: llama.cpp's greedy choice too)."""
    import llama_cpp

    n_ctx = len(ids) + len(reply)
    llm = llama_cpp.Llama(str(default_model_path()), n_ctx=n_ctx, verbose=False, logits_all=True)
    try:
        llm.eval(list(ids) + list(reply))
        scores = np.asarray(llm.scores[len(ids) - 1 : n_ctx - 1])  # (R, V)
        return scores.max(axis=1) - scores[np.arange(len(reply)), reply]  # (R,)
    finally:
        llm.close()


def greedy_reply_ids(m, ids, n):
    """The single-sequence engine's greedy reply ids (n at most, ending at end of
    generation), from a fresh cache."""
    m.cache.reset()
    logits, out = m._eval(ids, all_logits=False)[-1], []  # (V,)
    while len(out) < n:
        tok = int(np.argmax(logits))
        if m.tokenizer.is_eog(tok):
            break
        out.append(tok)
        logits = m._eval([tok], all_logits=False)[-1]  # (V,)
    m.cache.reset()
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`python -m meldlite serve ARGS` on a free loopback port, up when /health answers;
    `stop()` ends exactly this process (by its handle). Its output goes to `log`."""

    def __init__(self, args, log, timeout=180.0):
        self.log = Path(log)
        for _attempt in range(3):  # a port taken between the probe and the bind: retry
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            cmd = [sys.executable, "-m", "meldlite", "serve", "--port", str(self.port), *args]
            with open(self.log, "wb") as out:
                env = {**os.environ, "PYTHONUNBUFFERED": "1"}
                self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=out, env=env)
            if self._wait(timeout):
                return
            self.stop()
        raise RuntimeError(f"meldlite serve did not start:\n{self.log.read_text()[-3000:]}")

    def _wait(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                time.sleep(0.2)
        return False

    def health(self):
        return httpx.get(self.url + "/health", timeout=10).json()

    def rss_bytes(self):
        """The server process's resident memory now (VmRSS)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
