"""SmallThinker files: the router on the layer input (run before attention), ReLU
experts, the gating kind from the file; greedy decoding like llama.cpp; the early
routing reaches the store (`announce`) and the prefetcher loads exactly those
experts first; memory budgets and peers give the all-resident bits; `pack`,
`quantize --type` and mixed files, `profile` and `info` work. Logit parity per file
type with llama.cpp is in test_parity.py (ARCHS "smallthinker").

Files are shaped like SmallThinker-4BA0.6B scaled down (32 experts of 768, top-4,
12/2 heads of 128 there): 16 experts of 128, top-4, 4/2 heads of 64."""

import numpy as np
import pytest
from gguf import ExpertGatingFuncType, GGUFReader, GGUFValueType, GGUFWriter, Keys
from helpers_models import Shape, llamacpp_logits, write_random_model
from helpers_runs import (
    PROMPT,
    check_info_and_profile,
    peer_steps,
    quantized_pair,
    resident_steps,
    steps,
)

import meldlite
from meldlite.formats import pack
from meldlite.kernels import route_ref
from meldlite.kernels.reference import matmul_ref
from meldlite.kernels.router import route_input
from meldlite.metrics import kl_divergence

SHAPE = Shape(n_expert=16, n_expert_used=4, n_ff_exp=128, n_ctx=128)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{"f16": stacked F16 file, "packed": its per-expert layout, "tied": no output.weight}."""
    d = tmp_path_factory.mktemp("smallthinker")
    f16 = write_random_model(d / "f16.gguf", "smallthinker", SHAPE, np.float16, seed=7)
    pack(f16, d / "packed.gguf", "SRC")
    tied = write_random_model(d / "tied.gguf", "smallthinker", SHAPE, np.float32, seed=8, tied=True)
    return {"f16": f16, "packed": d / "packed.gguf", "tied": tied}


@pytest.fixture(scope="module")
def resident(files):
    return resident_steps(files["f16"], PROMPT)


def test_config(files):
    cfg = meldlite.load(files["f16"], n_ctx=64).cfg
    assert cfg.arch == "smallthinker"
    assert cfg.traits.expert_act == "relu" and cfg.traits.router_input == "layer"
    assert (cfg.n_expert, cfg.n_expert_used, cfg.n_ff_exp) == (16, 4, 128)
    assert cfg.n_rot == SHAPE.head_dim  # the converter writes no rope dimension count


def test_router_kernel_matches_reference():
    rng = np.random.default_rng(60)
    x = rng.standard_normal((5, 256)).astype(np.float32)  # (T, E)
    wr = (rng.standard_normal((16, 256)) * 0.1).astype(np.float32)  # (X, E)
    raw = wr.view(np.uint8)
    raw.flags.writeable = False
    bias = np.zeros(16, np.float32)
    bias[3] = -np.inf  # a pruned expert
    no_bias = np.zeros(0, np.float32)
    for gating, norm in ((0, True), (0, False), (1, True)):  # softmax, sigmoid (GATINGS)
        ids, wts = np.empty((5, 4), np.int32), np.empty((5, 4), np.float32)
        route_input(x, raw, 0, 0, bias, no_bias, gating, 0, 0, norm, 0.0, 4, ids, wts)
        logits = (matmul_ref(raw, 0, x) + bias).astype(np.float32)  # (T, X)
        name = ("softmax", "sigmoid")[gating]
        want_ids, want_w = route_ref.route(logits, 4, norm, name)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(wts, want_w, rtol=1e-5)
        assert not (ids == 3).any()


def test_tied_output_file_matches_llamacpp(files):
    pytest.importorskip("llama_cpp")
    tokens = [1] + np.random.default_rng(2).integers(3, 4000, 47).tolist()
    ref = llamacpp_logits(files["tied"], tokens, n_ctx=64)
    ours = meldlite.load(files["tied"], n_ctx=64).logits(tokens)
    assert np.abs(ours - ref).max() <= 1e-3 * np.abs(ref).max()


def test_greedy_decoding_matches_llamacpp(files):
    llama_cpp = pytest.importorskip("llama_cpp")
    n = 12
    llm = llama_cpp.Llama(str(files["f16"]), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    ref = []
    for _ in range(n):
        ref.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([ref[-1]])
    llm.close()
    m = meldlite.load(files["f16"], n_ctx=64)
    logits = m._eval(PROMPT, all_logits=False)
    ours = []
    for _ in range(n):
        ours.append(int(np.argmax(logits[-1])))
        logits = m._eval([ours[-1]], all_logits=False)
    assert ours == ref


def _rewrite(src, dst, values):
    """A copy of src with the metadata {key: (value, GGUFValueType)} set (tensors unchanged)."""
    r = GGUFReader(src)
    w = GGUFWriter(str(dst), "smallthinker")
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == Keys.General.ARCHITECTURE or name in values:
            continue
        sub = field.types[1] if len(field.types) > 1 else None
        w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    for key, (value, vtype) in values.items():
        w.add_key_value(key, value, vtype)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


U32, F32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
VARIANTS = {
    # moe_primary_router_apply_softmax false: the converter writes sigmoid gating
    "sigmoid": {Keys.LLM.EXPERT_GATING_FUNC: (int(ExpertGatingFuncType.SIGMOID), U32)},
    # sliding_window_layout with SWA layers: layer 0 global without RoPE, layer 1 SWA
    # (window forced to 4096) with RoPE of base rope.freq_base_swa
    "swa": {
        Keys.Attention.SLIDING_WINDOW: (4096, U32),
        Keys.Rope.FREQ_BASE_SWA: (500000.0, F32),
    },
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variants_match_llamacpp(files, tmp_path, variant):
    pytest.importorskip("llama_cpp")
    keys = {k.format(arch="smallthinker"): v for k, v in VARIANTS[variant].items()}
    path = _rewrite(files["tied"], tmp_path / f"{variant}.gguf", keys)
    m = meldlite.load(path, n_ctx=64)
    if variant == "swa":
        assert m.cfg.swa_layers == (0, 1) and m.cfg.nope_layers == (1, 0)
        assert m.cfg.n_swa == 4096 and m.cfg.rope_base_swa == 500000.0
    else:
        assert m.cfg.gating == "sigmoid"
    tokens = [1] + np.random.default_rng(3).integers(3, 4000, 47).tolist()
    ref = llamacpp_logits(path, tokens, n_ctx=64)
    ours = m.logits(tokens)
    diff = np.abs(ours - ref)
    assert diff.max() <= 1e-3 * np.abs(ref).max()
    assert np.median(diff) <= 5e-4 * np.abs(ref).max()


class _Recorder:
    """A store wrapper that records the order of announce and moe calls."""

    def __init__(self, store):
        self.store, self.calls = store, []

    def announce(self, layer, ids):
        self.calls.append(("announce", layer, np.array(ids)))
        self.store.announce(layer, ids)

    def moe(self, layer, x, ids, weights):
        self.calls.append(("moe", layer, np.array(ids)))
        return self.store.moe(layer, x, ids, weights)


def test_routing_is_announced_before_attention(files, resident):
    m = meldlite.load(files["f16"], n_ctx=64, n_threads=1)
    rec = _Recorder(m.store)
    m.store = rec
    got = steps(m, PROMPT)
    m.store = rec.store
    m.close()
    assert all(np.array_equal(a, b) for a, b in zip(resident, got))
    n_layer = SHAPE.n_layer
    assert len(rec.calls) == 2 * n_layer * 4  # prefill + 3 decode steps
    for i in range(0, len(rec.calls), 2):
        (a, la, ia), (b, lb, ib) = rec.calls[i], rec.calls[i + 1]
        assert (a, b, la) == ("announce", "moe", lb)
        np.testing.assert_array_equal(ia, ib)  # exact: the experts moe then gets


def test_announce_queues_exact_loads_first(files):
    from meldlite.experts.prefetch import EXACT, PREDICTED

    m = meldlite.load(files["packed"], n_ctx=64, n_threads=1, mem_budget="25%", prefetch=True)
    try:
        st, X = m.store, SHAPE.n_expert
        st.loader.stop()  # keep the queue as announce leaves it
        st.loader = None
        q = st.loads.queue
        q.push(1 * X + 15, PREDICTED, (1, 0))  # a guess for layer 1 the routing proves wrong
        ids = np.array([[2, 5, 7, 9]], np.int32)
        st.announce(1, ids)
        assert not q.queued(1 * X + 15)
        queued = []
        while q.peek() is not None:
            prio, _, g, _ = q.pop()
            queued.append((prio, g))
        assert [g - X for _, g in queued] == [2, 5, 7, 9]
        assert all(EXACT <= p < PREDICTED for p, _ in queued)
        assert st.stats()["announced"] == 4
    finally:
        m.close()


@pytest.mark.parametrize("layout", ["f16", "packed"])
@pytest.mark.parametrize("budget", ["25%", "50%"])
def test_memory_budget_is_bit_identical(files, resident, layout, budget):
    m = meldlite.load(files[layout], n_ctx=64, n_threads=1, mem_budget=budget, prefetch=True)
    got = steps(m, PROMPT)
    st = m.stats()
    m.close()
    assert all(np.array_equal(a, b) for a, b in zip(resident, got))
    assert st["expert_misses"] > 0 and st["announced"] > 0


def test_peers_exact_mode_is_bit_identical(files, resident):
    got, requests = peer_steps(files["packed"], PROMPT)
    assert all(np.array_equal(a, b) for a, b in zip(resident, got))
    assert requests > 0


def test_quantize_uniform_and_mixed_files_run_like_llamacpp(files, tmp_path):
    pytest.importorskip("llama_cpp")
    tokens = np.random.default_rng(1).integers(3, 4000, 64)
    uniform, mixed = quantized_pair(files["f16"], tmp_path)
    ref = llamacpp_logits(uniform, tokens, n_ctx=64)  # llama.cpp loads the uniform file
    ours_uniform = meldlite.load(uniform, n_ctx=64).logits(tokens)
    assert kl_divergence(ref, ours_uniform).mean() <= 1e-3
    # the per-expert mixed file is meldlite's own: against llama.cpp on the F16 source.
    # In these small files the embedding and output take 40% of the bytes, so at 5 bpw
    # the experts get 2-4 bits: the mixed file's loss is held to that of uniform Q4_K
    # (measured 0.096 and 0.065; llama.cpp's F16 and the files' KL is large here because
    # random routers sit near ties, for qwen3moe files of this shape too)
    f16 = llamacpp_logits(files["f16"], tokens, n_ctx=64)
    kl_mixed = kl_divergence(f16, meldlite.load(mixed, n_ctx=64).logits(tokens)).mean()
    assert kl_mixed <= 2 * kl_divergence(f16, ours_uniform).mean()


def test_info_and_profile_commands(files, tmp_path):
    check_info_and_profile(files["f16"], tmp_path, "smallthinker")
