"""Expert-parallel inference over ZeroMQ peers on one machine (loopback), with link emulation.

    python benchmarks/peers.py [--peers 1,2,3,4] [--links none,100Mbit/5ms,20Mbit/20ms]
                               [--reps 3] [--prompt 96] [--decode 24] [--kl-stories 8]

Model: ../shared/models' trained tinystories MoE (qwen3moe, 6 layers, 32 experts, top-4,
n_embd 256, F16). Peers are `meldlite peer` processes with the model file, one kernel thread
each; the coordinator uses one kernel thread too (2 cores are shared by everything).

For each configuration (peers, placement, wire encoding, link) it prefills the same prompt
and decodes greedily, and reports medians over --reps runs: prefill and decode tokens/s,
bytes (both directions, payload + ZMTP framing, no TCP/IP headers) and messages per decoded
token, round trips per token (layers that sent anything), stall time per token (waiting for
peers after the local work), and the bound that the link puts on time per token:

    bound = round_trips x 2 x latency + bytes / bandwidth + compute

with compute = the single-node meldlite decode time per token measured in the same run
(one thread), and the ratio measured / bound. Placement "profile" comes from
`meldlite.transports.placement.place` on a routing profile of stories 100-139 of
valid.txt ("+local": the coordinator holds a 1/(n+1) share of the experts too); the prompt is story 0. The table of traffic against round-robin uses routing
recorded on stories 0-9. The KL table measures each lossy choice (wire encoding, token
fusion threshold) as mean KL divergence of next-token distributions from the single-node
run over --kl-stories stories (128 tokens each), with bytes per prefilled token.
llama.cpp (llama-cpp-python) decodes the same prompt on the same file in the same run, one
thread, as the reference for the ratio column.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "models"
MODEL = SHARED / "tinystories-moe-f16.gguf"

import meldlite  # noqa: E402
from meldlite.api import Model  # noqa: E402
from meldlite.experts.profile import build_profile  # noqa: E402
from meldlite.metrics import kl_divergence, top1_agreement  # noqa: E402
from meldlite.options import Peers, Runtime  # noqa: E402
from meldlite.transports import placement as pl  # noqa: E402
from meldlite.transports.link import parse_link  # noqa: E402
from meldlite.transports.local_peer import LocalPeer  # noqa: E402


def stories(a, b):
    text = (SHARED / "valid.txt").read_text(encoding="utf-8")
    docs = [s.strip("\n") for s in text.split("<|endoftext|>")]
    return [s for s in docs if s.strip()][a:b]


def llamacpp_decode(prompt_ids, n_decode):
    """llama.cpp decode tokens/s on the same file and prompt, one thread, in a child process."""
    code = (
        "import json,sys,time,numpy as np,llama_cpp\n"
        "ids,n=json.loads(sys.argv[1])\n"
        f"llm=llama_cpp.Llama({str(MODEL)!r},n_ctx=len(ids)+n+8,n_batch=512,n_threads=1,"
        "n_threads_batch=1,verbose=False)\n"
        "llm.eval(ids);tok=int(np.argmax(llm.scores[llm.n_tokens-1]))\n"
        "t=time.perf_counter()\n"
        "for _ in range(n):\n llm.eval([tok]);tok=int(np.argmax(llm.scores[llm.n_tokens-1]))\n"
        "print(n/(time.perf_counter()-t))\n"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, json.dumps([prompt_ids, n_decode])],
            capture_output=True,
            text=True,
            timeout=600,
        )
        return float(r.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return float("nan")


def timed_run(m, ids, n_decode):
    """(prefill s, decode s per token, store counters before/after decode)."""
    m.cache.reset()
    t0 = time.perf_counter()
    logits = m._eval(ids, all_logits=False)
    t1 = time.perf_counter()
    s0 = m.store.stats()
    for _ in range(n_decode):
        logits = m._eval([int(np.argmax(logits[-1]))], all_logits=False)
    t2 = time.perf_counter()
    s1 = m.store.stats()
    return t1 - t0, (t2 - t1) / n_decode, s0, s1


def per_token(s0, s1, key, n):
    return (s1.get(key, 0) - s0.get(key, 0)) / n


def with_peers(path, endpoints, **options):
    """The model with its experts on `endpoints` (Peers options as keywords)."""
    peers = Peers(endpoints, **{"timeout": 30.0, **options})
    return Model(path, runtime=Runtime(n_threads=1), peers=peers)


def bench_config(path, endpoints, ids, n_decode, reps, **options):
    m = with_peers(path, endpoints, **options)
    try:
        timed_run(m, ids[:8], 2)  # warm-up
        rows = []
        for _ in range(reps):
            tp, td, s0, s1 = timed_run(m, ids, n_decode)
            n = n_decode
            rows.append(
                {
                    "prefill_tps": len(ids) / tp,
                    "decode_tps": 1 / td,
                    "decode_s": td,
                    "bytes": per_token(s0, s1, "peers_bytes_out", n)
                    + per_token(s0, s1, "peers_bytes_in", n),
                    "bytes_out": per_token(s0, s1, "peers_bytes_out", n),
                    "messages": per_token(s0, s1, "peers_messages_out", n)
                    + per_token(s0, s1, "peers_messages_in", n),
                    "round_trips": per_token(s0, s1, "peers_remote_layers", n),
                    "requests": per_token(s0, s1, "peers_requests", n),
                    "stall_s": per_token(s0, s1, "peers_stall_s", n),
                    "failovers": s1["peers_failovers"],
                }
            )
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        med["failovers"] = max(r["failovers"] for r in rows)
        return med
    finally:
        m.close()


def encoded_state_bytes(wire, n_embd):
    return {"f32": 4 * n_embd, "f16": 2 * n_embd, "q8": n_embd // 32 * 34}[wire]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers", default="1,2,3,4")
    ap.add_argument("--links", default="none,100Mbit/5ms,20Mbit/20ms")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=96)
    ap.add_argument("--decode", type=int, default=24)
    ap.add_argument("--kl-stories", type=int, default=8)
    ap.add_argument("--json", default=None, help="Also write all results here.")
    args = ap.parse_args()
    counts = [int(n) for n in args.peers.split(",")]
    links = [None if x == "none" else x for x in args.links.split(",")]
    load0 = os.getloadavg()[0]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, model {MODEL.name}, prompt {args.prompt} tokens, "
        f"decode {args.decode} tokens, median of {args.reps} runs; peers and coordinator 1 "
        f"kernel thread each; 1-min load average {load0:.2f} before",
        flush=True,
    )

    base = meldlite.load(MODEL, n_threads=1)
    cfg = base.cfg
    ids = base.tokenize(stories(0, 1)[0])[: args.prompt]
    # single node, and llama.cpp, same prompt
    single = [timed_run(base, ids, args.decode)[:2] for _ in range(args.reps)]
    single_decode_s = statistics.median(s[1] for s in single)
    single_prefill = statistics.median(len(ids) / s[0] for s in single)
    ref_tps = llamacpp_decode([int(i) for i in ids], args.decode)
    print(
        f"single node: meldlite prefill {single_prefill:.0f} tok/s, decode "
        f"{1 / single_decode_s:.1f} tok/s ({single_decode_s * 1e3:.1f} ms/token); llama.cpp "
        f"decode {ref_tps:.1f} tok/s (1 thread)",
        flush=True,
    )

    # profile on stories 100-139, record routing on stories 0-9 for the traffic table
    t = time.perf_counter()
    prof = build_profile(base, "<|endoftext|>".join(stories(100, 140)))
    routes = [[] for _ in range(cfg.n_layer)]

    def record(layer, h, ids_, weights):
        routes[layer].append(np.array(ids_))

    for s in stories(0, 10):
        base.cache.reset()
        from meldlite.model import forward

        forward(
            cfg,
            base.weights,
            base.store,
            base.cache,
            base.tokenize(s)[: cfg.n_ctx_train],
            on_route=record,
        )
    routes = [np.concatenate(r) for r in routes]
    sizes = pl.expert_sizes(base.gguf, cfg.n_layer, cfg.n_expert)
    print(
        f"profile: {prof['text']['tokens']} tokens in {time.perf_counter() - t:.1f} s; "
        f"routing recorded on {len(routes[0])} tokens of stories 0-9",
        flush=True,
    )
    placements = {}
    print("\n### Traffic of a placement on recorded routing (per token, all 6 layers)\n")
    print(
        "| peers | placement | requests/token | peers per layer | max/mean peer work | "
        "co-activation kept |"
    )
    print("|---|---|---|---|---|---|")
    for n in counts:
        rr = pl.round_robin(cfg.n_layer, cfg.n_expert, n)
        rr.summary = pl.placement_summary(rr, pl.routing_stats_from_profile(prof), sizes)
        placements[(n, "round-robin")] = rr
        kinds = [("round-robin", rr)]
        if n > 1:
            p = pl.place(prof, n, None, sizes)
            placements[(n, "profile")] = p
            kinds.append(("profile", p))
            pr = pl.place(prof, n, None, sizes, replicate=2)
            placements[(n, "profile+2 replicas")] = pr
            kinds.append(("profile+2 replicas", pr))
            pc = pl.place(prof, n, None, sizes, local_budget=int(sizes.sum() // (n + 1)) + 1)
            placements[(n, "profile+local")] = pc
            kinds.append(("profile+local", pc))
        for name, p in kinds:
            ev = pl.evaluate(p, routes)
            kept = p.summary.get("coactivation_kept")
            print(
                f"| {n} | {name} | {ev['requests_per_token']:.2f} | {ev['peers_per_layer']:.2f} | "
                f"{ev['load_imbalance']:.2f} | {'-' if kept is None else f'{100 * kept:.0f}%'} |",
                flush=True,
            )

    results = []
    peers = LocalPeer.start(max(counts), MODEL, timeout=600.0)
    try:
        endpoints = [p.endpoint for p in peers]
        configs = []
        for link in links:
            for n in counts:
                for kind in ["round-robin"] + (["profile"] if n > 1 else []):
                    configs.append((n, kind, "f32", False, link))
            if max(counts) > 1:
                configs.append((max(counts), "profile+local", "f32", False, link))
            for wire in ("f16", "q8"):
                configs.append(
                    (
                        max(counts),
                        "profile" if max(counts) > 1 else "round-robin",
                        wire,
                        False,
                        link,
                    )
                )
        configs.insert(1, (max(counts), "round-robin", "f32", True, None))  # exact mode
        print("\n### Decode and prefill over peers\n")
        print(
            "| peers | placement | wire | link | prefill tok/s | decode tok/s | vs llama.cpp | "
            "bytes/token | x states | msgs/token | round trips | stall ms/token | "
            "bound ms/token | measured/bound |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for n, kind, wire, exact, link in configs:
            r = bench_config(
                MODEL,
                endpoints[:n],
                ids,
                args.decode,
                args.reps,
                placement=placements[(n, kind)],
                wire=wire,
                exact=exact,
                link=link,
            )
            lk = parse_link(link)
            transfer = 0.0 if lk is None else lk.bound(r["round_trips"], r["bytes"])
            bound = transfer + single_decode_s
            state = encoded_state_bytes(wire, cfg.n_embd)
            x_states = r["bytes"] / (2 * state * r["requests"]) if r["requests"] else float("nan")
            r.update(
                peers=n,
                placement=kind,
                wire=wire + (" exact" if exact else ""),
                link=link or "none",
                bound_s=bound,
                x_states=x_states,
            )
            results.append(r)
            print(
                f"| {n} | {kind} | {r['wire']} | {r['link']} | {r['prefill_tps']:.0f} | "
                f"{r['decode_tps']:.1f} | {r['decode_tps'] / ref_tps:.2f} | {r['bytes']:.0f} | "
                f"{x_states:.3f} | {r['messages']:.1f} | {r['round_trips']:.2f} | "
                f"{r['stall_s'] * 1e3:.1f} | {bound * 1e3:.1f} | {r['decode_s'] / bound:.2f} |"
                + (f" failovers {r['failovers']}" if r["failovers"] else ""),
                flush=True,
            )

        # lossy choices: KL from the single-node run
        print("\n### Cost of lossy wire choices (prefill of stories, 128 tokens each)\n")
        print("| wire | fusion tau | bytes/prefill token | rows fused | mean KL | top-1 agree |")
        print("|---|---|---|---|---|---|")
        docs = [base.tokenize(s)[:128] for s in stories(10, 10 + args.kl_stories)]
        ref = [base.logits(d) for d in docs]
        n = min(2, max(counts))
        for wire, tau in (
            ("f32", 0),
            ("f16", 0),
            ("q8", 0),
            ("f32", 0.05),
            ("f32", 0.1),
            ("f32", 0.2),
            ("f32", 0.3),
            ("q8", 0.2),
        ):
            m = with_peers(
                MODEL,
                endpoints[:n],
                placement=placements[(n, "profile" if n > 1 else "round-robin")],
                wire=wire,
                fuse=tau,
            )
            try:
                s0 = m.store.stats()
                got = [m.logits(d) for d in docs]
                s1 = m.store.stats()
            finally:
                m.close()
            tokens = sum(len(d) for d in docs)
            kl = float(np.mean(np.concatenate([kl_divergence(a, b) for a, b in zip(ref, got)])))
            agree = float(np.mean([top1_agreement(a, b) for a, b in zip(ref, got)]))
            byt = (
                s1["peers_bytes_out"]
                + s1["peers_bytes_in"]
                - s0["peers_bytes_out"]
                - s0["peers_bytes_in"]
            ) / tokens
            fused = (s1["peers_rows_fused"] - s0["peers_rows_fused"]) / max(
                1,
                s1["peers_rows_sent"]
                - s0["peers_rows_sent"]
                + s1["peers_rows_fused"]
                - s0["peers_rows_fused"],
            )
            results.append(
                {
                    "kl_wire": wire,
                    "tau": tau,
                    "kl": kl,
                    "agree": agree,
                    "bytes": byt,
                    "fused": fused,
                }
            )
            print(
                f"| {wire} | {tau or '-'} | {byt:.0f} | {100 * fused:.1f}% | {kl:.2e} | "
                f"{100 * agree:.1f}% |",
                flush=True,
            )
    finally:
        for p in peers:
            p.stop()
        base.close()
    print(f"\n1-min load average {os.getloadavg()[0]:.2f} after")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "single_decode_s": single_decode_s,
                    "llamacpp_decode_tps": ref_tps,
                    "results": results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
