"""Placement: files, round-robin, routing rule, profile-guided placement, `meldlite place`."""

import json
import subprocess
import sys

import numpy as np
import pytest

from meldlite.errors import BudgetError, FormatError, OptionError
from meldlite.transports import placement as pl


def clustered_routes(n_layer=2, n_expert=16, k=4, n_tok=3000, n_clusters=4, seed=0):
    """Routing where each token picks its k experts inside one of n_clusters groups
    of experts that are *not* contiguous (so round-robin splits every group)."""
    g = np.random.default_rng(seed)
    size = n_expert // n_clusters
    routes = []
    for _ in range(n_layer):
        perm = g.permutation(n_expert)
        groups = perm.reshape(n_clusters, size)
        c = g.integers(0, n_clusters, n_tok)
        ids = np.array([g.choice(groups[ci], k, replace=False) for ci in c], np.int32)
        routes.append(ids)
    return routes


def test_round_robin_and_file_round_trip(tmp_path):
    p = pl.round_robin(3, 8, 3)
    assert p.experts[2][7] == [1] and p.peer_nodes() == [0, 1, 2] and p.local_node() is None
    assert p.experts_of(0) == [(L, e) for L in range(3) for e in (0, 3, 6)]
    path = p.save(tmp_path / "rr.json")
    back = pl.load_placement(path)
    assert back.experts == p.experts and back.node_names() == ["peer0", "peer1", "peer2"]
    assert back.check(3, 8, 3) is back
    with pytest.raises(OptionError, match="3 peer nodes"):
        back.check(3, 8, 2)
    with pytest.raises(OptionError, match="3 layers x 8 experts"):
        back.check(4, 8, 3)


def test_pruned_experts_get_no_node():
    present = np.ones((2, 6), bool)
    present[0, [1, 4]] = present[1, 0] = False
    p = pl.round_robin(2, 6, 2, present)
    assert p.experts[0] == [[0], [], [1], [0], [], [1]]  # present ones dealt in turn
    assert p.experts[1] == [[], [0], [1], [0], [1], [0]]
    back = pl.from_dict(json.loads(json.dumps(p.to_dict())))  # [] = pruned, readable
    assert back.check(2, 6, 2, present) is back
    with pytest.raises(OptionError, match="layer 0 expert 1 no node"):
        back.check(2, 6, 2)  # all present: a hole
    full = pl.round_robin(2, 6, 2).only(present)  # made for all experts
    assert [e for L, e in full.experts_of(0) + full.experts_of(1) if not present[L, e]] == []
    assert pl.Router(p).route(1, np.array([[1, 2], [-1, 5]])).tolist() == [[0, 1], [-1, 0]]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(format="other"), "not a meldlite placement"),
        (lambda d: d.update(version=99), "version"),
        (lambda d: d.update(nodes=[]), "nodes"),
        (lambda d: d["nodes"].append({"name": "peer0"}), "repeat"),
        (lambda d: d["experts"][0].pop(), "lists"),
        (lambda d: d["experts"][1].__setitem__(0, [7]), "holders"),
        (lambda d: d["experts"][1].__setitem__(0, [0, 0]), "holders"),
        (lambda d: d["experts"][1].__setitem__(0, ["0"]), "holders"),
    ],
)
def test_bad_placement_files(tmp_path, change, match):
    d = pl.round_robin(2, 4, 2).to_dict()
    change(d)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(d))
    with pytest.raises(FormatError, match=match):
        pl.load_placement(path)
    path.write_text("{nope")
    with pytest.raises(FormatError, match="not JSON"):
        pl.load_placement(path)


def test_router_prefers_a_replica_the_token_already_uses():
    nodes = [{"name": f"peer{i}", "budget": None} for i in range(3)]
    experts = [[[0], [1], [2], [2, 0]]]  # expert 3 on node 2, replica on node 0
    r = pl.Router(pl.Placement(nodes, experts))
    ids = np.array([[0, 3], [2, 3], [1, 3], [3, -1], [3, 1]], np.int32)
    node = r.route(0, ids)
    assert node[0].tolist() == [0, 0]  # joins node 0, already used by expert 0
    assert node[1].tolist() == [2, 2]
    assert node[3, 1] == -1
    # tokens 2, 3, 4 use no holder of expert 3 otherwise: the less loaded holder, 2 on ties
    assert [node[2, 1], node[3, 0], node[4, 0]] == [2, 0, 2]
    assert np.array_equal(r.route(0, ids), node)  # deterministic


def test_profile_guided_placement_keeps_clusters_together_and_balances():
    routes = clustered_routes()
    stats = pl.routing_stats_from_routes(routes, 16)
    sizes = np.full((2, 16), 1000)
    p = pl.place(stats, 4, None, sizes)
    rr = pl.round_robin(2, 16, 4)
    ev, ev_rr = pl.evaluate(p, routes), pl.evaluate(rr, routes)
    assert p.summary["coactivation_kept"] > 0.95
    assert ev["peers_per_layer"] < 1.2 < 2.5 < ev_rr["peers_per_layer"]
    assert ev["load_imbalance"] <= 1.1 + 0.05
    assert ev["requests_per_token"] < ev_rr["requests_per_token"] / 2


def test_budgets_are_respected_and_too_small_is_an_error():
    routes = clustered_routes(n_layer=3)
    stats = pl.routing_stats_from_routes(routes, 16)
    sizes = np.random.default_rng(1).integers(800, 1200, (3, 16))
    budgets = [int(sizes.sum() * f) + 1200 for f in (0.4, 0.3, 0.2, 0.1)]
    p = pl.place(stats, 4, budgets, sizes)
    for node, budget in enumerate(budgets):
        used = sum(sizes[L, e] for L, e in p.experts_of(node))
        assert used <= budget
    with pytest.raises(BudgetError, match="budgets add up"):
        pl.place(stats, 4, [int(sizes.sum() / 5)] * 4, sizes)


def test_replicas_and_local_node():
    routes = clustered_routes()
    stats = pl.routing_stats_from_routes(routes, 16)
    sizes = np.full((2, 16), 10)
    p = pl.place(stats, 3, None, sizes, replicate=2, local_budget=10_000)
    assert p.node_names() == ["peer0", "peer1", "peer2", "local"]
    assert p.local_node() == 3 and p.peer_nodes() == [0, 1, 2]
    assert p.summary["replicas"] == 4
    hot = np.argsort(-stats.popularity[0], kind="stable")[:2]
    assert all(len(p.experts[0][e]) == 2 for e in hot)
    ev = pl.evaluate(p, routes)
    assert 0 < ev["local_only_share"] < 1


def test_place_argument_errors():
    stats = pl.routing_stats_from_routes(clustered_routes(), 16)
    with pytest.raises(OptionError, match="do not match"):
        pl.place(stats, 2, None, np.ones((3, 16)))
    with pytest.raises(OptionError, match="budgets for"):
        pl.place(stats, 2, [1, 2, 3], np.ones((2, 16)))
    with pytest.raises(OptionError, match="at least one"):
        pl.place(stats, 0, None, np.ones((2, 16)))


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """A tiny random model and its `meldlite profile` output (the expert-cache format)."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from helpers_models import Shape, write_random_model

    d = tmp_path_factory.mktemp("place")
    model = write_random_model(
        d / "m.gguf",
        "qwen3moe",
        Shape(n_embd=128, n_layer=2, n_expert=8, n_expert_used=2, n_ff_exp=128, head_dim=32),
        np.float16,
    )
    text = d / "text.txt"
    text.write_text("Once upon a time there was a cat.\n<|endoftext|>\nThe dog ran home fast.\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "meldlite",
            "profile",
            str(model),
            str(text),
            "-o",
            str(d / "prof.json"),
            "-t",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return model, d / "prof.json"


def test_reads_meldlite_profile_files(profiled):
    _, prof_path = profiled
    stats = pl.routing_stats_from_profile(prof_path)
    assert stats.popularity.shape == (2, 8) and stats.coact.shape == (2, 8, 8)
    assert np.allclose(stats.popularity.sum(axis=1), 2.0)  # k picks per token
    assert np.allclose(np.diagonal(stats.coact, axis1=1, axis2=2), stats.popularity)


def test_cli_place(profiled, tmp_path):
    model, prof_path = profiled
    out = tmp_path / "placement.json"

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "meldlite", "place", str(prof_path), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = cli(
        "--peers", "2", "--model", str(model), "--budget", "1MB", "--replicate", "1", "-o", str(out)
    )
    assert r.returncode == 0, r.stderr
    assert "co-activation kept" in r.stdout and "round-robin" in r.stdout
    p = pl.load_placement(out)
    assert p.strategy == "profile" and len(p.peer_nodes()) == 2
    assert all(b <= 1_000_000 for b in p.summary["bytes"])
    r = cli("--peers", "2", "--round-robin", "-o", str(out))
    assert r.returncode == 0 and pl.load_placement(out).strategy == "round-robin"
    r = cli("--peers", "2", "--budget", "1MB", "-o", str(out))
    assert r.returncode == 2 and "--model" in r.stderr
    r = cli("--peers", "2", "--model", str(model), "--budget", "10kB", "-o", str(out))
    assert r.returncode == 2 and "budgets add up" in r.stderr and len(r.stderr.splitlines()) == 1
