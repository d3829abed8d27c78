"""Which node holds which expert: placement files, round-robin, profile-guided
placement and the per-token routing rule that uses them.

Nodes are the peers, in the order of `--peers`, plus optionally "local" (the
coordinator itself). A placement file is JSON:

    {"format": "meldlite-placement", "version": 1, "strategy": "profile",
     "n_layer": L, "n_expert": X,
     "nodes": [{"name": "peer0", "budget": 123456}, ..., {"name": "local", ...}],
     "experts": [[[node, ...] for each expert] for each layer],   # holders, primary first
     "summary": {...}}

Routing rule (`Router.route`): an expert with one holder goes there; an
expert with replicas goes to the holder this token already uses for another
of its experts, else to the holder with the fewest pairs so far in this batch,
else the first. It depends only on the routing, never on which peers are up,
so a failed peer's work can be recomputed elsewhere with the same grouping.

Profile-guided placement (`place`), per layer, from a `meldlite profile`
(per-layer popularity p_e = picks per token and co-activation c_ef = tokens
that pick both e and f, per token):
1. greedy: experts in decreasing popularity go to the node with the most
   co-activation with what it already holds, among nodes whose compute load
   (sum of p_e, expected expert evaluations per token) stays under
   (1 + slack) * k / n_nodes and whose memory share has room;
2. refinement: single moves and pairwise swaps that raise the co-activation
   kept inside nodes, within the same limits, until none helps;
3. replication (optional): the `replicate` most popular experts of each
   layer get a second copy on the node they co-fire with most that has room.
Keeping co-firing experts together lowers the number of peers a token needs
(messages and bytes), the load cap keeps per-token compute even.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from meldlite.errors import BudgetError, FormatError, OptionError

FORMAT = "meldlite-placement"
VERSION = 1
LOCAL = "local"


@dataclass
class Placement:
    nodes: list  # [{"name": str, "budget": int | None}]
    experts: list  # [layer][e] -> [node, ...] (primary first; [] = pruned)
    strategy: str = "custom"
    summary: dict = field(default_factory=dict)

    @property
    def n_layer(self):
        return len(self.experts)

    @property
    def n_expert(self):
        return len(self.experts[0]) if self.experts else 0

    def node_names(self):
        return [n["name"] for n in self.nodes]

    def local_node(self):
        """Index of the "local" node, or None."""
        names = self.node_names()
        return names.index(LOCAL) if LOCAL in names else None

    def peer_nodes(self):
        """Node indices of the peers, in the order they pair with `--peers`."""
        return [i for i, n in enumerate(self.nodes) if n["name"] != LOCAL]

    def experts_of(self, node):
        """[(layer, e)] held by `node` (as primary or replica)."""
        return [
            (L, e) for L, row in enumerate(self.experts) for e, hs in enumerate(row) if node in hs
        ]

    def holds(self, node):
        """(n_layer, n_expert) bool: which experts `node` holds."""
        out = np.zeros((self.n_layer, self.n_expert), bool)
        for L, e in self.experts_of(node):
            out[L, e] = True
        return out

    def to_dict(self):
        return {
            "format": FORMAT,
            "version": VERSION,
            "strategy": self.strategy,
            "n_layer": self.n_layer,
            "n_expert": self.n_expert,
            "nodes": self.nodes,
            "experts": self.experts,
            "summary": self.summary,
        }

    def save(self, path):
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=None, separators=(",", ":")) + "\n")
        os.replace(tmp, path)
        return path

    def check(self, n_layer, n_expert, n_peers, present=None):
        """OptionError unless this placement fits a model of this shape and n_peers peers
        and gives every expert `present` (n_layer, n_expert) bool (default: all) a holder."""
        if (self.n_layer, self.n_expert) != (n_layer, n_expert):
            raise OptionError(
                f"placement is for {self.n_layer} layers x {self.n_expert} experts, "
                f"the model has {n_layer} x {n_expert}"
            )
        if len(self.peer_nodes()) != n_peers:
            raise OptionError(
                f"placement has {len(self.peer_nodes())} peer nodes "
                f"({', '.join(self.node_names())}), {n_peers} peers were given"
            )
        for L, row in enumerate(self.experts):
            for e, hs in enumerate(row):
                if not hs and (present is None or present[L][e]):
                    raise OptionError(f"placement gives layer {L} expert {e} no node")
        return self

    def only(self, present):
        """A copy without holders for the experts where `present` (n_layer, n_expert)
        is False (pruned experts left out of the file: never routed, never sent)."""
        experts = [
            [list(hs) if present[L][e] else [] for e, hs in enumerate(row)]
            for L, row in enumerate(self.experts)
        ]
        return Placement([dict(n) for n in self.nodes], experts, self.strategy, dict(self.summary))


def from_dict(obj, where="placement"):
    """A Placement from parsed JSON, every field checked (FormatError otherwise)."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise FormatError(f"{where}: not a meldlite placement (format != {FORMAT!r})")
    if obj.get("version") != VERSION:
        raise FormatError(
            f"{where}: placement version {obj.get('version')!r}, this meldlite reads {VERSION}"
        )
    nodes, experts = obj.get("nodes"), obj.get("experts")
    if (
        not isinstance(nodes, list)
        or not nodes
        or not all(isinstance(n, dict) and isinstance(n.get("name"), str) for n in nodes)
    ):
        raise FormatError(f"{where}: 'nodes' must be a non-empty list of {{name, budget}}")
    names = [n["name"] for n in nodes]
    if len(set(names)) != len(names):
        raise FormatError(f"{where}: node names repeat: {names}")
    if (
        not isinstance(experts, list)
        or not experts
        or not all(isinstance(r, list) for r in experts)
    ):
        raise FormatError(f"{where}: 'experts' must be a list (layers) of lists (experts)")
    n_expert = len(experts[0])
    for L, row in enumerate(experts):
        if len(row) != n_expert or n_expert == 0:
            raise FormatError(
                f"{where}: layer {L} lists {len(row)} experts, layer 0 lists {n_expert}"
            )
        for e, hs in enumerate(row):
            if (
                not isinstance(hs, list)
                or len(set(hs)) != len(hs)
                or not all(type(h) is int and 0 <= h < len(nodes) for h in hs)
            ):
                raise FormatError(
                    f"{where}: layer {L} expert {e}: holders {hs!r} must be a list "
                    f"of distinct node indices < {len(nodes)} (empty: pruned)"
                )
    clean_nodes = [{"name": n["name"], "budget": n.get("budget")} for n in nodes]
    return Placement(
        clean_nodes,
        [[list(hs) for hs in row] for row in experts],
        str(obj.get("strategy", "custom")),
        obj.get("summary") or {},
    )


def load_placement(path):
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not JSON: {e}") from None
    return from_dict(obj, str(path))


def as_placement(placement):
    if placement is None or isinstance(placement, Placement):
        return placement
    if isinstance(placement, dict):
        return from_dict(placement)
    return load_placement(placement)


def peer_names(n_peers):
    return [f"peer{i}" for i in range(n_peers)]


def round_robin(n_layer, n_expert, n_peers, present=None):
    """The i-th expert of every layer on peer i mod n_peers (the baseline); with
    `present` (n_layer, n_expert) bool, only present experts are counted and placed
    (pruned ones get no node)."""
    if n_peers < 1:
        raise OptionError("round-robin placement needs at least one peer")
    if present is None:
        present = np.ones((n_layer, n_expert), bool)
    nodes = [{"name": n, "budget": None} for n in peer_names(n_peers)]
    rank = np.cumsum(present, axis=1) - 1  # (L, X)
    experts = [
        [[int(rank[L, e]) % n_peers] if present[L, e] else [] for e in range(n_expert)]
        for L in range(n_layer)
    ]
    return Placement(nodes, experts, "round-robin")


# -- routing --------------------------------------------------------------------------


class Router:
    """Node of every (token, slot) pair, by the rule in the module docstring."""

    def __init__(self, placement):
        self.n_nodes = len(placement.nodes)
        self.primary = np.array(
            [[hs[0] if hs else -1 for hs in row] for row in placement.experts], np.int64
        )  # (L, X) -1: pruned
        self.replicas = [
            {e: hs for e, hs in enumerate(row) if len(hs) > 1} for row in placement.experts
        ]

    def route(self, layer, ids):
        """ids (T, k) -> node (T, k) int64, -1 where ids is -1."""
        ids = np.asarray(ids)
        valid = ids >= 0
        node = np.where(valid, self.primary[layer][np.where(valid, ids, 0)], -1)
        reps = self.replicas[layer]
        if not reps:
            return node
        multi = valid & np.isin(ids, list(reps))
        if not multi.any():
            return node
        load = np.bincount(node[valid & ~multi], minlength=self.n_nodes)
        for t in np.flatnonzero(multi.any(axis=1)):
            chosen = set(node[t][valid[t] & ~multi[t]].tolist())
            for j in np.flatnonzero(multi[t]):
                holders = reps[int(ids[t, j])]
                shared = [h for h in holders if h in chosen]
                h = shared[0] if shared else min(holders, key=lambda n: (load[n], holders.index(n)))
                node[t, j] = h
                load[h] += 1
                chosen.add(h)
        return node


def evaluate(placement, routes, local_node=None):
    """Traffic a placement causes on recorded routing.

    routes: per layer a list/array of ids (T, k). Returns per-token averages:
    remote messages (requests; replies are as many), peers per token-layer, the
    share of layer visits needing no peer, and each node's share of expert work.
    """
    router = Router(placement)
    local = placement.local_node() if local_node is None else local_node
    n_nodes = len(placement.nodes)
    msgs = visits = local_only = 0
    work = np.zeros(n_nodes, np.int64)
    n_tok = 0
    for L, ids in enumerate(routes):
        ids = np.asarray(ids)
        if L == 0:
            n_tok = len(ids)
        node = router.route(L, ids)  # (T, k)
        for t in range(len(ids)):
            used = set(node[t][node[t] >= 0].tolist()) - {local}
            msgs += len(used)
            local_only += not used
            visits += 1
        work += np.bincount(node[node >= 0], minlength=n_nodes)
    share = work / max(1, work.sum())
    peers = [i for i in range(n_nodes) if i != local]
    pshare = share[peers] if peers else share
    return {
        "requests_per_token": msgs / max(1, n_tok),
        "peers_per_layer": msgs / max(1, visits),
        "local_only_share": local_only / max(1, visits),
        "work_share": [round(float(s), 4) for s in share],
        "load_imbalance": float(pshare.max() / pshare.mean()) if pshare.mean() > 0 else 1.0,
    }


# -- profile-guided placement ------------------------------------------------------------


@dataclass
class RoutingStats:
    """Per-layer routing statistics, per token: popularity (L, X), coact (L, X, X)."""

    popularity: np.ndarray
    coact: np.ndarray
    tokens: int = 0

    @property
    def n_layer(self):
        return self.popularity.shape[0]

    @property
    def n_expert(self):
        return self.popularity.shape[1]


def routing_stats_from_profile(profile):
    """RoutingStats from a `meldlite profile` file or dict (meldlite.formats.profile):
    per layer "tokens", "counts" (X,) and "coactivation" (X, X) token counts."""
    if isinstance(profile, RoutingStats):
        return profile
    if not isinstance(profile, dict):
        from meldlite.formats.profile import read_profile as read_json

        profile = read_json(profile)
    try:
        layers = profile["layers"]
        tokens = np.array([lay["tokens"] for lay in layers], np.float64)
        counts = np.array([lay["counts"] for lay in layers], np.float64)
        co = np.array([lay["coactivation"] for lay in layers], np.float64)
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"profile lacks per-layer tokens/counts/coactivation: {e}") from None
    L = len(layers)
    if L == 0 or counts.ndim != 2 or co.shape != (L, counts.shape[1], counts.shape[1]):
        raise FormatError(f"profile counts {counts.shape} and coactivation {co.shape} disagree")
    if (tokens <= 0).any() or not np.isfinite(co).all() or (co < 0).any():
        raise FormatError("profile has a layer with no tokens or bad co-activation counts")
    per = tokens[:, None]
    return RoutingStats(counts / per, co / per[..., None], int(tokens[0]))


def routing_stats_from_routes(routes, n_expert):
    """RoutingStats from recorded routing: per layer ids (T, k) (tests, benchmarks)."""
    pops, cos = [], []
    for ids in routes:
        ids = np.asarray(ids)
        onehot = np.zeros((len(ids), n_expert))
        for j in range(ids.shape[1]):
            ok = ids[:, j] >= 0
            onehot[np.flatnonzero(ok), ids[ok, j]] = 1
        pops.append(onehot.mean(axis=0))
        cos.append(onehot.T @ onehot / max(1, len(ids)))
    return RoutingStats(np.array(pops), np.array(cos), len(routes[0]) if routes else 0)


def place(profile, n_peers, budgets, expert_bytes, *, replicate=0, local_budget=0, slack=0.1):
    """Placement of every expert on `n_peers` peers (plus "local" if local_budget > 0).

    budgets: bytes per peer (one number for all, or a list; None = unlimited);
    expert_bytes: (n_layer, n_expert) bytes of each expert; replicate: extra copies
    of this many of the most popular experts per layer; slack: allowed excess of a
    node's load over the even share. BudgetError if the experts do not fit.
    """
    stats = routing_stats_from_profile(profile)
    sizes = np.asarray(expert_bytes, np.float64)
    L, X = stats.n_layer, stats.n_expert
    if sizes.shape != (L, X):
        raise OptionError(f"expert sizes {sizes.shape} do not match the profile's {L} x {X}")
    if n_peers < 1:
        raise OptionError("placement needs at least one peer")
    if not 0 <= slack <= 10:
        raise OptionError(f"slack must be in [0, 10], got {slack}")
    if replicate < 0 or replicate > X:
        raise OptionError(f"replicate must be in 0..{X}, got {replicate}")
    budgets = list(budgets) if isinstance(budgets, (list, tuple)) else [budgets] * n_peers
    if len(budgets) != n_peers:
        raise OptionError(f"{len(budgets)} budgets for {n_peers} peers")
    nodes = [{"name": n, "budget": b} for n, b in zip(peer_names(n_peers), budgets)]
    if local_budget:
        nodes.append({"name": LOCAL, "budget": int(local_budget)})
    cap_total = np.array([np.inf if n["budget"] is None else float(n["budget"]) for n in nodes])
    total = sizes.sum()
    if cap_total.sum() < total:
        raise BudgetError(
            f"the experts need {total / 2**20:.1f} MiB, the budgets add up to "
            f"{cap_total.sum() / 2**20:.1f} MiB"
        )
    left = cap_total.copy()
    experts = []
    for layer in range(L):
        rest = sizes[layer:].sum()
        share = np.where(np.isinf(left), np.inf, left * sizes[layer].sum() / max(rest, 1.0))
        mem_cap = share + sizes[layer].max()  # one expert of slack per layer
        assign = _partition(
            stats.popularity[layer],
            stats.coact[layer],
            sizes[layer],
            np.minimum(mem_cap, left),
            slack,
        )
        holders = [[int(a)] for a in assign]
        used = np.bincount(assign, weights=sizes[layer], minlength=len(nodes))
        left -= used
        if replicate:
            left -= _replicate(
                holders, stats.popularity[layer], stats.coact[layer], sizes[layer], left, replicate
            )
        experts.append(holders)
    p = Placement(nodes, experts, "profile")
    p.summary = placement_summary(p, stats, sizes)
    return p


def _partition(pop, co, size, mem_cap, slack):
    """Node per expert for one layer (greedy + refinement, see module docstring)."""
    n_nodes, X = len(mem_cap), len(pop)
    w = co.copy()
    np.fill_diagonal(w, 0.0)
    w = (w + w.T) / 2
    load_cap = (1 + slack) * pop.sum() / n_nodes + 1e-12
    load, mem = np.zeros(n_nodes), np.zeros(n_nodes)
    aff = np.zeros((X, n_nodes))  # co-activation of e with each node
    assign = np.full(X, -1)
    for e in np.argsort(-pop, kind="stable"):
        fits = mem + size[e] <= mem_cap + 1e-6
        ok = fits & (load + pop[e] <= load_cap)
        cand = np.flatnonzero(ok) if ok.any() else np.flatnonzero(fits)
        if len(cand) == 0:
            raise BudgetError(f"an expert of {size[e] / 2**20:.2f} MiB fits no node's budget")
        best = cand[np.lexsort((load[cand], -aff[e, cand]))[0]]
        assign[e] = best
        load[best] += pop[e]
        mem[best] += size[e]
        aff[:, best] += w[:, e]
    # refinement: moves and swaps that raise the co-activation kept inside nodes
    for _ in range(50):
        improved = False
        for e in range(X):
            p = assign[e]
            for q in range(n_nodes):
                if q == p:
                    continue
                gain = aff[e, q] - aff[e, p]
                if (
                    gain > 1e-12
                    and load[q] + pop[e] <= load_cap
                    and mem[q] + size[e] <= mem_cap[q] + 1e-6
                ):
                    _move(e, p, q, assign, load, mem, aff, w, pop, size)
                    improved = True
                    break
                members = np.flatnonzero(assign == q)
                gains = (
                    aff[e, q] - aff[e, p] + aff[members, p] - aff[members, q] - 2 * w[e, members]
                )
                for f in members[np.argsort(-gains)]:
                    g = aff[e, q] - aff[e, p] + aff[f, p] - aff[f, q] - 2 * w[e, f]
                    if g <= 1e-12:
                        break
                    dl = pop[e] - pop[f]
                    dm = size[e] - size[f]
                    if (
                        load[q] + dl <= load_cap
                        and load[p] - dl <= load_cap
                        and mem[q] + dm <= mem_cap[q] + 1e-6
                        and mem[p] - dm <= mem_cap[p] + 1e-6
                    ):
                        _move(e, p, q, assign, load, mem, aff, w, pop, size)
                        _move(f, q, p, assign, load, mem, aff, w, pop, size)
                        improved = True
                        break
                if assign[e] != p:
                    break
        if not improved:
            break
    return assign


def _move(e, p, q, assign, load, mem, aff, w, pop, size):
    assign[e] = q
    load[p] -= pop[e]
    load[q] += pop[e]
    mem[p] -= size[e]
    mem[q] += size[e]
    aff[:, p] -= w[:, e]
    aff[:, q] += w[:, e]


def _replicate(holders, pop, co, size, left, n):
    """Second copies of the n most popular experts; returns bytes used per node."""
    used = np.zeros(len(left))
    for e in np.argsort(-pop, kind="stable")[:n]:
        p = holders[e][0]
        members = [[f for f in range(len(holders)) if holders[f][0] == q] for q in range(len(left))]
        scores = [(co[e, members[q]].sum() if members[q] else 0.0, -q) for q in range(len(left))]
        for _score, negq in sorted(scores, reverse=True):
            q = -negq
            if q != p and left[q] - used[q] >= size[e]:
                holders[e].append(q)
                used[q] += size[e]
                break
    return used


def placement_summary(p, stats, sizes):
    """Budget use, load balance and co-activation kept together, per node."""
    n_nodes = len(p.nodes)
    load = np.zeros(n_nodes)
    mem = np.zeros(n_nodes)
    kept = total = 0.0
    for L, row in enumerate(p.experts):
        prim = np.array([hs[0] for hs in row])
        for e, hs in enumerate(row):
            load[hs[0]] += stats.popularity[L, e] if stats is not None else 1.0
            for h in hs:
                mem[h] += sizes[L, e]
        if stats is not None:
            w = stats.coact[L].copy()
            np.fill_diagonal(w, 0)
            total += w.sum()
            kept += w[prim[:, None] == prim[None, :]].sum()
    return {
        "bytes": [int(m) for m in mem],
        "load_per_token": [round(float(v), 4) for v in load / max(1, p.n_layer)],
        "load_imbalance": round(float(load.max() / load.mean()), 4) if load.mean() else 1.0,
        "coactivation_kept": round(kept / total, 4) if total else None,
        "replicas": sum(len(hs) - 1 for row in p.experts for hs in row),
    }


def expert_sizes(gguf, n_layer, n_expert):
    """(n_layer, n_expert) bytes of each expert of a GGUF file (0: pruned, left out)."""
    return np.array(
        [
            [
                sum(n for _, n in gguf.expert_ranges(L, e)) if gguf.expert_present(L, e) else 0
                for e in range(n_expert)
            ]
            for L in range(n_layer)
        ],
        np.int64,
    )
