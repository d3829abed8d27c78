"""Serving under concurrent clients: `meldlite serve` beside llama-cpp-python's server.

    python benchmarks/serve.py [--model FILE] [--threads 2] [--clients 1,2,4,8]
        [--max-tokens 64] [--rounds 3] [--parallel N] [--ctx 512] [--words 48]
        [--engines meldlite,llama-cpp] [--text ../shared/models/valid.txt]

Each engine serves the same GGUF file (default: meldlite's built-in model) from a
subprocess on a free loopback port, started with the same thread count and context,
and is waited for (/health for meldlite, /v1/models for llama-cpp-python), then
stopped through its Popen handle (terminate, wait, kill). Both servers run from
the start, but only one computes at a time: the engines take turns round by round,
so a burst of load from other processes hits both.

Clients are the official `openai` client, one thread and one connection each. A
round starts N clients together, each streaming one chat completion
(/v1/chat/completions, stream=True, greedy: temperature 0, max_tokens) of its own
prompt: a system message and the first --words words of a held-out story
(../shared/models/valid.txt; the same prompts for both engines). Measured per
request: time to first token (TTFT: from sending the request to the first chunk
with text) and completion tokens (the streamed usage when the server sends it,
`stream_options={"include_usage": True}`; else the chunks with text, one per token
in llama-cpp-python's stream). Per round: tokens/s in total = all completion
tokens / the round's wall time. The table gives, per client count, the median
tokens/s over --rounds rounds and the median and 90th percentile of TTFT over all
requests, for both engines, and the ratios meldlite / llama-cpp-python. A warm-up
request (kernel compilation or loading, page-in) precedes the measurements.

llama-cpp-python's server (0.3.x) computes one request at a time behind a lock and,
by default, cuts off a running stream when another request arrives
(--interrupt_requests True); it is started with --interrupt_requests False so every
stream runs to completion as meldlite's do (it has no n_parallel option). Its
requests also get repeat_penalty 1.0 (its default is 1.1, which changes greedy
output) and --chat_format chatml, the format meldlite falls back to for a file
without a chat template (the built-in model has none). `--parallel N` is passed to
`meldlite serve` only when its --help offers --parallel. The last line counts the
prompts whose greedy replies are equal in both engines (a check that both did the
same work).

The clients and the servers' own event loops run on the same machine as the
compute threads: with --threads equal to the core count of a small machine they
compete. On 2 cores, llama.cpp's spinning OpenMP workers (its default) then made
its figures vary up to threefold between runs; --llamacpp-wait passive gives it
sleeping workers as meldlite's (slower for llama.cpp there), and --threads 1 left a
core to the clients and gave steady figures for both.
"""

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
SYSTEM = "You are a storyteller. Continue the story."
ENGINES = ("meldlite", "llama-cpp")


# -- servers --------------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def meldlite_accepts_parallel():
    """Whether this tree's `meldlite serve` has a --parallel option."""
    r = subprocess.run(
        [sys.executable, "-m", "meldlite", "serve", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return "--parallel" in r.stdout


def server_command(engine, args, port):
    """(argv, environment, readiness path) of `engine` serving args.model on `port`."""
    host = ("--host", "127.0.0.1", "--port", str(port))
    if engine == "meldlite":
        argv = [sys.executable, "-m", "meldlite", "serve", args.model, *host]
        argv += ["-t", str(args.threads), "-c", str(args.ctx)]
        if args.parallel and meldlite_accepts_parallel():
            argv += ["--parallel", str(args.parallel)]
        return argv, dict(os.environ), "/health"
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", args.model, *host]
    argv += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    argv += ["--n_ctx", str(args.ctx), "--chat_format", "chatml"]
    argv += ["--interrupt_requests", "False", "--verbose", "False"]
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }  # llama.cpp's own
    if args.llamacpp_wait == "passive":
        env["OMP_WAIT_POLICY"] = "passive"  # sleeping OpenMP workers, as meldlite's
    return argv, env, "/v1/models"


class Server:
    """A server subprocess on a free loopback port; a context manager that stops it."""

    def __init__(self, engine, args):
        self.engine, self.port = engine, free_port()
        argv, env, self.ready_path = server_command(engine, args, self.port)
        self.argv = argv
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in __exit__)
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout):
        url = f"http://127.0.0.1:{self.port}{self.ready_path}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.engine} exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.engine} not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n=2000):
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# -- clients --------------------------------------------------------------------------------


def prompts(path, words, n):
    """The first `words` words of the first n stories of the held-out text."""
    text = Path(path).read_text(encoding="utf-8")
    stories = [s.strip() for s in text.split("<|endoftext|>") if s.strip()]
    return [" ".join(s.split()[:words]) for s in stories[:n]]


def stream_one(client, engine, prompt, max_tokens, model):
    """One streamed greedy chat completion: {ttft, tokens, text, finished, usage}."""
    extra = {"repeat_penalty": 1.0} if engine == "llama-cpp" else None
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    ttft, pieces, usage, finish = None, [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                ttft = time.perf_counter() - t0 if ttft is None else ttft
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    tokens = usage if usage is not None else len(pieces)
    text = "".join(pieces)
    return {"ttft": ttft, "tokens": tokens, "text": text, "finished": finish is not None}


def run_round(clients, engine, batch, max_tokens, model):
    """All prompts of `batch` at once, one per client: (wall seconds, results)."""
    barrier = threading.Barrier(len(batch) + 1)
    results = [None] * len(batch)

    def work(i):
        barrier.wait()
        try:
            results[i] = stream_one(clients[i], engine, batch[i], max_tokens, model)
        except Exception as e:  # a failed request is counted, not fatal
            results[i] = {"ttft": None, "tokens": 0, "text": "", "finished": False, "error": e}

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batch))]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


class Session:
    """A running server of `engine` and its clients (one per concurrent stream)."""

    def __init__(self, engine, server, n_clients):
        import openai

        self.engine, self.server = engine, server
        url = server.base_url
        self.clients = [
            openai.OpenAI(base_url=url, api_key="x", max_retries=0) for _ in range(n_clients)
        ]
        self.model = self.clients[0].models.list().data[0].id  # the id the server answers to

    def round(self, batch, max_tokens):
        return run_round(self.clients, self.engine, batch, max_tokens, self.model)

    def close(self):
        for c in self.clients:
            c.close()


def measure(args, texts):
    """{engine: {n_clients: summary}} and {engine: {prompt index: reply text}}.

    Both servers run from the start (idle while the other is measured); the engines
    take turns round by round, so a burst of load from other processes hits both."""
    rounds = {e: {n: [] for n in args.clients} for e in args.engines}
    replies = {e: {} for e in args.engines}
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(e, args)) for e in args.engines]
        sessions = []
        for server in servers:
            server.wait_ready(args.start_timeout)
            sessions.append(Session(server.engine, server, max(args.clients)))
            stack.callback(sessions[-1].close)
            sessions[-1].round(texts[:1], args.max_tokens)  # warm-up
        for n in args.clients:
            for r in range(args.rounds):
                idx = [(r * n + i) % len(texts) for i in range(n)]
                for ses in sessions:
                    wall, res = ses.round([texts[i] for i in idx], args.max_tokens)
                    rounds[ses.engine][n].append((wall, res))
                    done = {i: x["text"] for i, x in zip(idx, res) if x["finished"]}
                    replies[ses.engine].update(done)
            for e in args.engines:
                print(
                    f"  {e}, {n} clients: {fmt_summary(summarise(rounds[e][n]))}", file=sys.stderr
                )
    results = {e: {n: summarise(rs) for n, rs in by_n.items()} for e, by_n in rounds.items()}
    return results, replies


# -- figures --------------------------------------------------------------------------------


def summarise(rounds):
    """Median total tokens/s over rounds; TTFT median and p90 over all requests."""
    rates = [sum(x["tokens"] for x in res) / wall for wall, res in rounds]
    ttfts = [x["ttft"] for _, res in rounds for x in res if x["ttft"] is not None]
    requests = [x for _, res in rounds for x in res]
    return {
        "tok_s": statistics.median(rates),
        "ttft_med": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p90": percentile(ttfts, 0.9),
        "tokens": statistics.mean(x["tokens"] for x in requests),
        "unfinished": sum(not x["finished"] for x in requests),
        "requests": len(requests),
    }


def percentile(xs, q):
    """The q-quantile of xs, linear between order statistics (nan for none)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def fmt_summary(s):
    return (
        f"{s['tok_s']:.1f} tok/s, TTFT {s['ttft_med'] * 1e3:.0f} / {s['ttft_p90'] * 1e3:.0f} ms, "
        f"{s['tokens']:.1f} tokens/request, {s['unfinished']}/{s['requests']} unfinished"
    )


def ratio(a, b):
    return f"{a / b:.2f}" if a == a and b == b and b > 0 else "-"


def num(x, scale=1, digits=1):
    """x * scale as text, "-" when not measured (nan)."""
    return f"{x * scale:.{digits}f}" if x == x else "-"


def table(results, clients):
    """Markdown rows: per client count, both engines and the ratios."""
    m, ll = results.get("meldlite", {}), results.get("llama-cpp", {})
    lines = [
        "| clients | meldlite tok/s | llama-cpp tok/s | ratio | meldlite TTFT med / p90 ms "
        "| llama-cpp TTFT med / p90 ms | TTFT ratio (med) | tokens/request m / l "
        "| unfinished m / l |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    none = dict.fromkeys(("tok_s", "ttft_med", "ttft_p90", "tokens"), float("nan"))
    for n in clients:
        a, b = m.get(n, none), ll.get(n, none)
        ttft = [f"{num(x['ttft_med'], 1e3, 0)} / {num(x['ttft_p90'], 1e3, 0)}" for x in (a, b)]
        lines.append(
            f"| {n} | {num(a['tok_s'])} | {num(b['tok_s'])} | {ratio(a['tok_s'], b['tok_s'])} "
            f"| {ttft[0]} | {ttft[1]} | {ratio(a['ttft_med'], b['ttft_med'])} "
            f"| {num(a['tokens'])} / {num(b['tokens'])} "
            f"| {a.get('unfinished', '-')} / {b.get('unfinished', '-')} |"
        )
    return "\n".join(lines)


def same_replies(replies):
    """(prompts whose replies are equal in both engines, prompts both answered)."""
    a, b = replies.get("meldlite", {}), replies.get("llama-cpp", {})
    both = sorted(set(a) & set(b))
    return sum(a[i] == b[i] for i in both), len(both)


# -- main -----------------------------------------------------------------------------------


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the built-in model)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads per server")
    p.add_argument("--clients", default="1,2,4,8", help="concurrent client counts")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--rounds", type=int, default=3, help="rounds per client count")
    p.add_argument("--parallel", type=int, default=None, help="meldlite serve --parallel N")
    p.add_argument("--ctx", type=int, default=512, help="context length of both servers")
    p.add_argument("--words", type=int, default=48, help="words of a story per prompt")
    p.add_argument("--engines", default=",".join(ENGINES), help="which servers to run")
    p.add_argument("--text", default=str(SHARED / "valid.txt"), help="held-out stories")
    p.add_argument(
        "--llamacpp-wait",
        choices=("default", "passive"),
        default="default",
        help="llama.cpp's OpenMP workers: its default (spinning) or passive (as meldlite's)",
    )
    p.add_argument("--start-timeout", type=float, default=900, help="seconds to be ready")
    args = p.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    args.engines = [e for e in args.engines.split(",") if e]
    if set(args.engines) - set(ENGINES):
        p.error(f"--engines: choose from {', '.join(ENGINES)}")
    if args.model is None:
        sys.path.insert(0, str(ROOT))  # this working tree's built-in model
        from meldlite.data import default_model_path

        args.model = default_model_path()
    if not Path(args.text).is_file():
        p.error(f"--text {args.text}: no such file (the held-out stories)")
    return args


def main():
    args = parse_args()
    texts = prompts(args.text, args.words, max(args.clients) * args.rounds)
    load_before = os.getloadavg()[0]
    results, replies = measure(args, texts)
    parallel = args.parallel if args.parallel and meldlite_accepts_parallel() else None
    print(
        f"{time.strftime('%Y-%m-%d')}, {Path(args.model).name}, {args.threads} threads per "
        f"server, max_tokens {args.max_tokens}, {args.rounds} rounds, ctx {args.ctx}, "
        f"meldlite --parallel {parallel or 'not given'}, CPUs {os.cpu_count()}, "
        f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(table(results, args.clients))
    equal, both = same_replies(replies)
    print(f"greedy replies equal in both engines: {equal} of {both} prompts")


if __name__ == "__main__":
    main()
