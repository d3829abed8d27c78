"""What the fixed memory of a `meldlite run` process is made of (docs/speed.md, "Fixed memory").

    python benchmarks/memory.py [--model PATH] [-n 8] [--checkout DIR]

Replays `meldlite run -n N` step by step in this process (the imports, Numba's target
setup, loading the model, generating) and prints after each step the resident memory
(VmRSS), its anonymous and file-backed parts (/proc/self/status RssAnon, RssFile), the
change, the largest changes per mapping (/proc/self/smaps: a library, the model file,
[heap] for malloc, [anon] for Python's arenas and other anonymous memory) and the peak
(VmHWM). --checkout runs another checkout's meldlite (e.g. an older commit's worktree)
for a before/after comparison; its Numba cache must be warm (run it once first).
"""

import argparse
import collections
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status():
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def by_mapping():
    """Resident MiB per mapped file name ([heap], [anon], ... for the others)."""
    out = collections.Counter()
    name = None
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                fields = line.split(None, 5)
                name = fields[5].strip().rsplit("/", 1)[-1] if len(fields) > 5 else "[anon]"
            elif line.startswith("Rss:"):
                out[name] += int(line.split()[1]) / 1024
    return out


class Checkpoints:
    def __init__(self, top):
        self.top = top
        self.last_rss = 0.0
        self.last_maps = collections.Counter()
        print(f"{'step':32s} {'RSS':>7s} {'change':>7s} {'anon':>7s} {'file':>7s} {'peak':>7s}")

    def __call__(self, step):
        s, maps = status(), by_mapping()
        change = s["VmRSS"] - self.last_rss
        print(
            f"{step:32s} {s['VmRSS']:7.1f} {change:+7.1f} {s['RssAnon']:7.1f} "
            f"{s['RssFile']:7.1f} {s['VmHWM']:7.1f}"
        )
        diff = {k: maps[k] - self.last_maps.get(k, 0.0) for k in set(maps) | set(self.last_maps)}
        for name, mib in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[: self.top]:
            if abs(mib) >= 0.5:
                print(f"{'':34s}{mib:+7.1f}  {name}")
        self.last_rss, self.last_maps = s["VmRSS"], maps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the built-in model)")
    ap.add_argument("-n", type=int, default=8, help="tokens to generate")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--checkout", type=Path, default=ROOT, help="the meldlite checkout to run")
    ap.add_argument("--top", type=int, default=4, help="mappings shown per step")
    args = ap.parse_args()
    sys.path.insert(0, str(args.checkout))
    check = Checkpoints(args.top)
    check("interpreter")
    import numpy  # noqa: F401

    check("import numpy")
    import click  # noqa: F401
    import gguf  # noqa: F401

    check("import click, gguf")
    import numba  # noqa: F401

    check("import numba (llvmlite)")
    import meldlite.cli  # noqa: F401
    from meldlite import kernels
    from meldlite.api import Model

    check("import meldlite.cli, .api")
    prepare = getattr(kernels, "prepare_target", None)
    if prepare is None:  # a checkout from before the fixed-memory work
        from numba.core.registry import cpu_target

        prepare = cpu_target.target_context.refresh
    prepare()
    check("Numba target setup")
    m = Model(args.model)
    check("Model() (tokenizer, weights)")
    for _ in m.generate(args.prompt, max_tokens=1):
        pass
    check("generate 1 (kernels from cache)")
    for _ in m.generate(args.prompt, max_tokens=args.n):
        pass
    check(f"generate {args.n}")
    m.close()
    print(f"peak RSS {status()['VmHWM']:.1f} MiB ({meldlite_path()})")


def meldlite_path():
    import meldlite

    return Path(meldlite.__file__).parent


if __name__ == "__main__":
    main()
