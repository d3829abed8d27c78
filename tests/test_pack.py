"""`meldlite pack`: SPEC parsing, the per-expert writer, and the CLI.

One small random F16 qwen3moe-like model is quantized twice by llama.cpp
(Q4_K_M, whose last layer gives ffn_down Q6_K, and Q8_0); packs mix the sources
per layer and per expert and are checked byte for byte against them.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from helpers_gguf import quantize_with_llamacpp
from test_formats import write_moe_gguf

from meldlite.errors import OptionError
from meldlite.formats import read_gguf
from meldlite.formats.layout import KINDS, stacked_name
from meldlite.formats.pack import non_expert_names, pack
from meldlite.formats.spec import parse_spec

N_LAYERS, N_EXPERT = 3, 4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """{label: path} of the F16 model and its Q4_K_M (mixed, not pure) and Q8_0 quantizations."""
    pytest.importorskip("llama_cpp")
    d = tmp_path_factory.mktemp("pack")
    f16 = write_moe_gguf(d / "f16.gguf", n_layers=N_LAYERS, n_expert=N_EXPERT, n_embd=256, n_ff=256)
    return {
        "F16": f16,
        "Q4_K_M": quantize_with_llamacpp(f16, d / "q4_k_m.gguf", "Q4_K_M", pure=False, nthread=1),
        "Q8_0": quantize_with_llamacpp(f16, d / "q8_0.gguf", "Q8_0", nthread=1),
    }


SPEC = "Q4_K,1.*=Q8_0,0.2=Q8_0,2.3=F16"


def expected_label(layer, e):
    return {(0, 2): "Q8_0", (2, 3): "F16"}.get((layer, e), "Q8_0" if layer == 1 else "Q4_K_M")


@pytest.fixture(scope="module")
def packed(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "mixed.gguf"
    result = pack(model["Q4_K_M"], out, SPEC, {"Q8_0": model["Q8_0"], "F16": model["F16"]})
    assert result.n_experts == N_LAYERS * N_EXPERT
    assert result.labels == {"Q4_K": 6, "Q8_0": 5, "F16": 1}
    return out


# ------------------------------------------------------------------ SPEC --


def test_spec_inline_last_rule_wins():
    s = parse_spec(" q4_k , 3.*=Q8_0, 3.5=Q6_K, *.7=F16, 1-2.0-1=Q5_K, 4=Q8_0 ")
    assert s.label_for(0, 0) == "Q4_K"
    assert s.label_for(3, 0) == "Q8_0" and s.label_for(3, 5) == "Q6_K"
    assert s.label_for(3, 7) == "F16" and s.label_for(9, 7) == "F16"
    assert s.label_for(2, 1) == "Q5_K" and s.label_for(2, 2) == "Q4_K"
    assert s.label_for(4, 3) == "Q8_0"
    assert s.labels() == {"Q4_K", "Q8_0", "Q6_K", "F16", "Q5_K"}
    assert parse_spec("0.1=Q8_0").label_for(0, 0) is None


def test_spec_json_inline_and_file(tmp_path):
    obj = {"default": "Q4_K", "experts": {"0.5": "Q6_K"}, "layers": {"0": "Q8_0", "2-3": "F16"}}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(obj))
    for s in (parse_spec(json.dumps(obj)), parse_spec(str(path))):
        assert s.label_for(0, 5) == "Q6_K"  # experts beat layers whatever the key order
        assert (
            s.label_for(0, 4) == "Q8_0"
            and s.label_for(3, 0) == "F16"
            and s.label_for(1, 0) == "Q4_K"
        )


@pytest.mark.parametrize(
    "bad, match",
    [
        ("", "empty"),
        ("Q4_K,,3=Q8_0", "empty item"),
        ("Q4_K,Q8_0", "only the first item"),
        ("Q4_K,x.1=Q8_0", "selector"),
        ("Q4_K,1.2.3=Q8_0", "selector"),
        ("Q4_K,3-1=Q8_0", "end before start"),
        ("Q4_K,1=Q8-0", "label"),
        ("Q4_K,1=", "label"),
        ('{"default": 4}', "must be a string"),
        ('{"default": "Q4_K", "sizes": {}}', "keys"),
        ('{"layers": {"1.2": "Q8_0"}}', "must not name an expert"),
        ('{"experts": {"1": "Q8_0"}}', "LAYER.EXPERT"),
        ("{not json", "not valid JSON"),
        ("missing.json", "cannot read SPEC file"),
    ],
)
def test_spec_errors(bad, match):
    with pytest.raises(OptionError, match=match):
        parse_spec(bad)


# ------------------------------------------------------------------ pack --


def test_each_expert_has_the_type_spec_asked_for(model, packed):
    out = read_gguf(packed)
    sources = {k: read_gguf(p) for k, p in model.items()}
    assert out.expert_layout == "per_expert"
    for L in range(N_LAYERS):
        assert out.expert_count(L) == N_EXPERT
        for e in range(N_EXPERT):
            src = sources[expected_label(L, e)]
            assert out.expert_types(L)[e] == src.expert_types(L)[e]
    assert out.expert_types(2)[0] == ("Q4_K", "Q4_K", "Q6_K")  # Q4_K_M's down type is kept
    assert out.expert_types(1)[0] == ("Q8_0",) * 3
    assert out.expert_types(2)[3] == ("F16",) * 3


def test_expert_bytes_equal_source_slices(model, packed):
    out = read_gguf(packed)
    sources = {k: read_gguf(p) for k, p in model.items()}
    for L in range(N_LAYERS):
        for e in range(N_EXPERT):
            src = sources[expected_label(L, e)]
            for kind in KINDS:
                stack = src.tensor(stacked_name(L, kind))
                got = out.expert_tensor(L, kind, e)
                assert got.raw.tobytes() == stack.raw[e].tobytes()
                assert got.shape == stack.shape[1:]
                np.testing.assert_array_equal(
                    got.dequantize(), gguf_dequantize(stack.raw[e], stack.ggml_type)
                )


def test_non_expert_tensors_and_metadata_unchanged(model, packed):
    out, src = read_gguf(packed), read_gguf(model["Q4_K_M"])
    assert non_expert_names(out) == non_expert_names(src)
    for name in non_expert_names(src):
        a, b = src.tensor(name), out.tensor(name)
        assert (a.qtype, a.shape) == (b.qtype, b.shape) and a.raw.tobytes() == b.raw.tobytes()
    added = {"meldlite.expert_layout", "meldlite.expert_order", "meldlite.expert_order_policy"}
    assert set(out.metadata) == set(src.metadata) | added
    for key, value in src.metadata.items():
        assert out.metadata[key] == value and out.metadata_types[key] == src.metadata_types[key]
    assert out.metadata["meldlite.expert_order_policy"] == "layer-major"


def test_layout_experts_contiguous_in_order(packed):
    out = read_gguf(packed)
    assert out.expert_order() == [(L, e) for L in range(N_LAYERS) for e in range(N_EXPERT)]
    end = None
    for L, e in out.expert_order():
        ((off, n),) = out.expert_ranges(L, e)
        gate, down = out.expert_tensor(L, "gate", e), out.expert_tensor(L, "down", e)
        assert off == gate.offset and off + n == down.offset + down.nbytes
        assert end is None or off - end < out.alignment
        end = off + n
    names = out.tensor_names()
    assert names[-3:] == [f"blk.2.ffn_{k}_exps.3.weight" for k in KINDS]


def test_gguf_py_reads_the_output(packed):
    r = GGUFReader(packed)
    names = [t.name for t in r.tensors]
    assert "blk.0.ffn_up_exps.2.weight" in names and "blk.0.ffn_up_exps.weight" not in names
    t = next(t for t in r.tensors if t.name == "blk.2.ffn_down_exps.0.weight")
    assert t.tensor_type.name == "Q6_K" and list(t.shape) == [256, 256]


def test_custom_order_and_repack(model, packed, tmp_path):
    order = [(L, e) for L in reversed(range(N_LAYERS)) for e in reversed(range(N_EXPERT))]
    out = tmp_path / "repacked.gguf"
    pack(
        packed,
        out,
        "SRC,0.0=Q8_0",
        {"Q8_0": model["Q8_0"]},
        order=order,
        order_policy="test-reversed",
    )
    f, prev, q8 = read_gguf(out), read_gguf(packed), read_gguf(model["Q8_0"])
    assert f.expert_order() == order
    assert f.metadata["meldlite.expert_order_policy"] == "test-reversed"
    assert f.metadata["meldlite.expert_order"][:4] == [2, 3, 2, 2]
    assert f.expert_types(0)[0] == ("Q8_0",) * 3
    assert f.expert_tensor(0, "up", 0).raw.tobytes() == q8.expert_tensor(0, "up", 0).raw.tobytes()
    for L, e in order[:-1]:
        for kind in KINDS:
            assert (
                f.expert_tensor(L, kind, e).raw.tobytes()
                == prev.expert_tensor(L, kind, e).raw.tobytes()
            )


def test_bad_order_rejected(model, tmp_path):
    with pytest.raises(OptionError, match="exactly once"):
        pack(model["Q8_0"], tmp_path / "o.gguf", "Q8_0", order=[(0, 0), (0, 0)])
    assert not (tmp_path / "o.gguf").exists()


def test_missing_source_label(model, tmp_path):
    with pytest.raises(OptionError, match="--from Q6_K=FILE"):
        pack(model["Q4_K_M"], tmp_path / "o.gguf", "Q4_K,1=Q6_K")


def test_source_label_must_match_its_type(model, tmp_path):
    with pytest.raises(OptionError, match="does not hold Q6_K"):
        pack(model["Q4_K_M"], tmp_path / "o.gguf", "Q4_K,1=Q6_K", {"Q6_K": model["Q8_0"]})


def test_free_form_label_allowed(model, tmp_path):
    pack(model["Q4_K_M"], tmp_path / "o.gguf", "SRC,0=hot", {"hot": model["Q8_0"]})
    assert read_gguf(tmp_path / "o.gguf").expert_types(0)[1] == ("Q8_0",) * 3


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(n_expert=2), "2 experts, expected 4"),
        (dict(n_ff=128), "shape"),
        (dict(n_layers=2), "layers"),
    ],
)
def test_mismatched_model_rejected(model, tmp_path, change, match):
    kw = dict(n_layers=N_LAYERS, n_expert=N_EXPERT, n_embd=256, n_ff=256) | change
    other = write_moe_gguf(tmp_path / "other.gguf", **kw)
    with pytest.raises(OptionError, match=match):
        pack(model["Q4_K_M"], tmp_path / "o.gguf", "Q4_K,0.0=F16", {"F16": other})


# ------------------------------------------------------------------- CLI --


def run_cli(*args):
    from meldlite.cli import main

    return CliRunner().invoke(main, ["pack", *map(str, args)])


def test_cli_pack(model, tmp_path):
    out = tmp_path / "cli.gguf"
    r = run_cli(
        model["Q4_K_M"], out, "--expert-types", "Q4_K,2.*=Q8_0", "--from", f"q8_0={model['Q8_0']}"
    )
    assert r.exit_code == 0, r.output
    assert "12 experts" in r.output and "Q8_0 x4" in r.output
    assert read_gguf(out).expert_types(2) == [("Q8_0",) * 3] * 4


def test_cli_help_documents_spec():
    r = run_cli("--help")
    assert r.exit_code == 0 and "3.*=Q8_0" in r.output and "LABEL=FILE" in r.output


@pytest.mark.parametrize(
    "args, match",
    [
        (["--expert-types", "Q4_K,x=Q8_0"], "selector"),
        (["--expert-types", "Q4_K,1=Q8_0"], "--from Q8_0=FILE"),
        (["--expert-types", "Q4_K", "--from", "Q8_0"], "LABEL=FILE"),
        (["--expert-types", "Q4_K,1=Q8_0", "--from", "Q8_0=/nonexistent.gguf"], "nonexistent"),
    ],
)
def test_cli_errors_one_line_exit_2(model, tmp_path, args, match):
    r = run_cli(model["Q4_K_M"], tmp_path / "o.gguf", *args)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("meldlite: error:") and match in lines[0]


def test_cli_mismatched_model_exit_2(model, tmp_path):
    other = write_moe_gguf(tmp_path / "other.gguf", n_layers=N_LAYERS, n_expert=2)
    r = run_cli(
        model["Q4_K_M"],
        tmp_path / "o.gguf",
        "--expert-types",
        "Q4_K,1=F16",
        "--from",
        f"F16={other}",
    )
    assert (
        r.exit_code == 2
        and "not the same model" in r.output
        and len(r.output.strip().splitlines()) == 1
    )
