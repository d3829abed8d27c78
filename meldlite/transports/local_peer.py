"""`LocalPeer`: a `meldlite peer` process on this machine, for tests, benchmarks and examples."""

import os
import signal


class LocalPeer:
    """A `meldlite peer` process on this machine, for tests, benchmarks and examples.

    Starts `python -m meldlite peer [MODEL] --listen tcp://127.0.0.1:0 ...`, waits
    for its "listening on" line and keeps the Popen handle: `stop`, `kill`,
    `suspend` and `resume` act on exactly this process. stderr goes to `log`
    (a path) or is discarded.
    """

    def __init__(
        self,
        model=None,
        *,
        listen="tcp://127.0.0.1:0",
        threads=1,
        args=(),
        log=None,
        timeout=300.0,
        wait=True,
    ):
        import subprocess
        import sys

        self.cmd = [sys.executable, "-m", "meldlite", "peer"] + (
            [os.fspath(model)] if model else []
        )
        self.cmd += ["--listen", listen, *map(str, args)]
        if threads:
            self.cmd += ["--threads", str(threads)]
        self.log = log
        self.endpoint = None
        err = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        if log:
            err.close()
        if wait:
            self.wait_ready(timeout)

    @classmethod
    def start(cls, n, model=None, logs=None, timeout=300.0, **kw):
        """n peers started side by side (they load in parallel), each waited for."""
        peers = []
        try:
            for i in range(n):
                peers.append(cls(model, log=logs[i] if logs else None, wait=False, **kw))
            for p in peers:
                p.wait_ready(timeout)
        except BaseException:
            for p in peers:
                p.stop()
            raise
        return peers

    def wait_ready(self, timeout=300.0):
        """Wait for the "listening on" line; returns the bound endpoint."""
        import selectors

        if self.endpoint:
            return self.endpoint
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        line = self.proc.stdout.readline() if sel.select(timeout) else ""
        sel.close()
        if "listening on " not in line:
            self.kill()
            raise RuntimeError(
                f"peer did not start ({' '.join(self.cmd)}): {line!r}, "
                f"exit code {self.proc.returncode}"
            )
        self.endpoint = line.split("listening on ")[1].split()[0]
        return self.endpoint

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def suspend(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()

    def stop(self, timeout=10.0):
        """SIGTERM, then SIGKILL if it has not exited within `timeout`."""
        import subprocess

        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
