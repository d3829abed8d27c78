"""The wire protocol, encodings, exact-mode arithmetic, link model and keys (no processes)."""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from meldlite import kernels
from meldlite.errors import OptionError
from meldlite.kernels.actquant import round_activations_reference
from meldlite.transports import protocol as P
from meldlite.transports import security
from meldlite.transports.compute import fuse_rows, pair_outputs
from meldlite.transports.link import Link, parse_link


def rng(seed=0):
    return np.random.default_rng(seed)


# -- headers and framing ------------------------------------------------------------


def test_header_round_trip_and_size():
    h = P.Header(P.Msg.COMPUTE, req_id=7, layer=3, enc=P.Enc.Q8 | P.EXACT, k=4, rows=9, aux=11)
    buf = h.pack()
    assert len(buf) == P.HEADER.size == 20
    back = P.parse_header(buf)
    assert (back.type, back.req_id, back.layer, back.k, back.rows, back.aux) == (
        P.Msg.COMPUTE,
        7,
        3,
        4,
        9,
        11,
    )
    assert back.encoding == P.Enc.Q8 and back.exact


@pytest.mark.parametrize(
    "buf, code",
    [
        (b"", "TRUNCATED"),
        (b"ML\x01", "TRUNCATED"),
        (b"XX" + bytes(18), "MALFORMED"),
        (b"XXXX", "MALFORMED"),
        (P.Header(P.Msg.HELLO).pack() + b"\0", "MALFORMED"),
        (P.Header(P.Msg.HELLO, version=P.PROTOCOL_VERSION + 1).pack(), "VERSION"),
        (P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, 99, 5, 0, 0, 0, 0, 0), "UNKNOWN_TYPE"),
    ],
)
def test_bad_headers_have_named_codes(buf, code):
    with pytest.raises(P.WireError) as e:
        P.parse_header(buf)
    assert e.value.code == code


def test_version_error_keeps_request_id():
    buf = P.Header(P.Msg.HELLO, req_id=42, version=9).pack()
    with pytest.raises(P.WireError) as e:
        P.parse_header(buf)
    assert e.value.req_id == 42


def test_too_many_frames_is_oversized():
    with pytest.raises(P.WireError, match="OVERSIZED"):
        P.parse([P.Header(P.Msg.HELLO).pack()] + [b"x"] * 20)


def test_json_frames_checked():
    assert P.parse_json(P.pack_json({"a": 1})) == {"a": 1}
    for bad in (b"[1, 2]", b"{", b"\xff\xfe", b'{"a": NaN}'):
        with pytest.raises(P.WireError, match="MALFORMED"):
            P.parse_json(bad)
    with pytest.raises(P.WireError, match="OVERSIZED"):
        P.parse_json(b'{"a": "' + b"x" * (1 << 20) + b'"}', P.Limits(json=1000))
    obj = {"n": 5, "b": True, "s": "x"}
    assert P.field(obj, "n", int, lo=0, hi=10) == 5
    with pytest.raises(P.WireError, match="OVERSIZED"):
        P.field(obj, "n", int, lo=0, hi=4)
    with pytest.raises(P.WireError, match="MALFORMED"):
        P.field(obj, "b", int)  # bool is not an int here
    with pytest.raises(P.WireError, match="MALFORMED"):
        P.field(obj, "missing", str)


# -- encodings ----------------------------------------------------------------------


def test_f32_is_lossless_and_zero_copy():
    x = rng().standard_normal((3, 64)).astype(np.float32)
    wire = P.encode(x, P.Enc.F32)
    assert wire is x or np.shares_memory(wire, x)
    back = P.decode(memoryview(wire).cast("B"), P.Enc.F32, 3, 64)
    assert np.array_equal(back, x)


def test_f16_is_float16_rounding():
    x = rng(1).standard_normal((2, 64)).astype(np.float32) * 10
    back = P.decode(P.encode(x, P.Enc.F16).tobytes(), P.Enc.F16, 2, 64)
    assert np.array_equal(back, x.astype(np.float16).astype(np.float32))


def test_q8_matches_llamacpp_q8_0_activation_rounding():
    x = rng(2).standard_normal((5, 256)).astype(np.float32)
    x[1, :32] = 0  # an all-zero block
    wire = P.encode(x, P.Enc.Q8)
    assert wire.nbytes == P.encoded_nbytes(P.Enc.Q8, 5, 256) == 5 * 8 * 34
    back = P.decode(wire.tobytes(), P.Enc.Q8, 5, 256)
    assert np.array_equal(back, round_activations_reference(x, T.Q8_0))
    assert np.abs(back - x).max() <= np.abs(x).max() / 127


def test_q8_needs_whole_blocks():
    with pytest.raises(OptionError, match="divisible"):
        P.check_encoding(P.Enc.Q8, 100)
    assert P.parse_encoding("F16") == P.Enc.F16
    with pytest.raises(OptionError, match="f32, f16, q8"):
        P.parse_encoding("bf16")


@pytest.mark.parametrize("enc", list(P.Enc))
def test_decode_checks_size_first(enc):
    good = P.encode(np.ones((2, 64), np.float32), enc).tobytes()
    with pytest.raises(P.WireError, match="TRUNCATED"):
        P.decode(good[:-1], enc, 2, 64)
    with pytest.raises(P.WireError, match="MALFORMED"):
        P.decode(good + b"\0", enc, 2, 64)
    with pytest.raises(P.WireError, match="TRUNCATED"):
        P.decode(good, enc, 1 << 30, 64)  # huge claim: rejected, nothing allocated


# -- COMPUTE / RESULT ---------------------------------------------------------------


def test_compute_round_trip_compact_and_exact():
    x = rng(3).standard_normal((4, 64)).astype(np.float32)
    ids = np.array([[0, -1], [3, 5], [-1, 7], [2, 2]], np.int32)
    w = rng(4).random((4, 2)).astype(np.float32)
    frames = P.compute_message(9, 1, P.encode(x, P.Enc.F16), ids, w, P.Enc.F16, False)
    h, payload = P.parse(
        [bytes(memoryview(f).cast("B")) if isinstance(f, np.ndarray) else f for f in frames]
    )
    x2, ids2, w2 = P.parse_compute(h, payload, 64)
    assert h.layer == 1 and h.req_id == 9 and not h.exact
    assert np.array_equal(ids2, ids) and np.array_equal(w2, w)
    assert np.array_equal(x2, x.astype(np.float16).astype(np.float32))
    frames = P.compute_message(10, 0, x, ids + 200 * (ids >= 0), None, P.Enc.F32, True)
    h, payload = P.parse(frames)
    assert len(payload) == 2 and h.exact and h.enc & P.IDS16
    _, ids3, w3 = P.parse_compute(h, payload, 64)
    assert w3 is None and ids3.max() == 207


@pytest.mark.parametrize(
    "mutate, code",
    [
        (lambda f: f[:2], "TRUNCATED"),  # weights frame missing
        (lambda f: f + [b"extra"], "MALFORMED"),
        (lambda f: [f[0], f[1][:-4], f[2], f[3]], "TRUNCATED"),  # short x
        (lambda f: [f[0], f[1], f[2][:-1], f[3]], "TRUNCATED"),  # short ids
        (
            lambda f: (
                [P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.Msg.COMPUTE, 1, 0, 0, 2, 1 << 31, 0)]
                + f[1:]
            ),
            "OVERSIZED",
        ),  # 2^31 rows claimed
        (
            lambda f: (
                [P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.Msg.COMPUTE, 1, 0, 9, 2, 3, 0)]
                + f[1:]
            ),
            "MALFORMED",
        ),  # encoding 9
        (
            lambda f: (
                [
                    P.HEADER.pack(
                        P.MAGIC,
                        P.PROTOCOL_VERSION,
                        P.Msg.COMPUTE,
                        1,
                        0,
                        P.Enc.F16 | P.EXACT,
                        2,
                        3,
                        0,
                    )
                ]
                + f[1:3]
            ),
            "BAD_REQUEST",
        ),
    ],
)
def test_bad_compute_messages(mutate, code):
    x = np.ones((3, 64), np.float32)
    ids = np.zeros((3, 2), np.int32)
    frames = [
        bytes(memoryview(f).cast("B")) if isinstance(f, np.ndarray) else f
        for f in P.compute_message(1, 0, x, ids, np.ones((3, 2), np.float32), P.Enc.F32, False)
    ]
    with pytest.raises(P.WireError) as e:
        h, payload = P.parse(mutate(frames))
        P.parse_compute(h, payload, 64)
    assert e.value.code == code


def test_result_rows_checked():
    y = np.ones((2, 64), np.float32)
    h, payload = P.parse(P.result_message(3, 0, y, P.Enc.F32, False, 5))
    assert h.aux == 5
    assert np.array_equal(P.parse_result(h, payload, 2, 64), y)
    with pytest.raises(P.WireError, match="MALFORMED"):
        P.parse_result(h, payload, 3, 64)


def test_wire_size_counts_zmtp_framing():
    assert P.wire_size([b"x" * 10]) == 12
    assert P.wire_size([np.zeros(300, np.uint8)]) == 309


def test_decode_of_a_zmq_frame_is_a_view():
    zmq = pytest.importorskip("zmq")
    x = rng(5).standard_normal((2, 32)).astype(np.float32)
    frame = zmq.Frame(x.tobytes())
    back = P.decode(frame, P.Enc.F32, 2, 32)
    assert np.array_equal(back, x) and not back.flags.owndata


# -- exact mode arithmetic ------------------------------------------------------------


def random_experts(n_expert, n_embd, n_ff, seed):
    g = rng(seed)
    arrays, types = [], np.zeros((n_expert, 3), np.int32)
    for e in range(n_expert):
        for shape in ((n_ff, n_embd), (n_ff, n_embd), (n_embd, n_ff)):
            a = (g.standard_normal(shape) * shape[1] ** -0.5).astype(np.float16)
            arrays.append(a.view(np.uint8).reshape(shape[0], -1))
        types[e] = int(T.F16)
    return kernels.expert_list(arrays), types


@pytest.mark.parametrize("llama_numerics", [False, True])
def test_pair_outputs_summed_in_slot_order_are_bit_identical(llama_numerics):
    mats, types = random_experts(6, 64, 64, 0)
    g = rng(7)
    x = g.standard_normal((9, 64)).astype(np.float32)
    ids = np.array([g.choice(6, 3, replace=False) for _ in range(9)], np.int32)
    ids[2, 1] = -1
    w = g.random((9, 3)).astype(np.float32)

    def moe(a, b, c):
        return kernels.moe_ffn(a, b, c, mats, types, llama_numerics=llama_numerics)

    ref = moe(x, ids, w)
    # split the pairs over two "nodes", compute each node's pairs alone, combine
    node = (ids % 2).astype(np.int64)
    y_of_pair = np.zeros(ids.shape, np.int64)
    Ys, off = [], 0
    for n in (1, 0):
        sub = np.where((node == n) & (ids >= 0), ids, -1)
        rows = np.flatnonzero((sub >= 0).any(axis=1))
        Y = pair_outputs(moe, x[rows], sub[rows])
        r, s = np.nonzero(sub[rows] >= 0)
        y_of_pair[rows[r], s] = off + np.arange(len(r))
        off += len(r)
        Ys.append(Y)
    got = kernels.sum_slots(ids, w, np.concatenate(Ys), y_of_pair)
    assert np.array_equal(got, ref)


def test_fuse_rows_merges_near_duplicates_with_same_experts_only():
    g = rng(8)
    base = g.standard_normal((3, 32)).astype(np.float32)
    x = np.concatenate([base, base + 1e-4, base[:1]]).astype(np.float32)  # rows 3-5 near 0-2
    ids = np.array([[0, 1], [2, 3], [0, 1], [0, 1], [2, 3], [0, 2], [0, 1]], np.int32)
    reps, inverse = fuse_rows(x, ids, 0.01)
    assert np.array_equal(x[reps][inverse][[0, 1, 3, 4, 6]], x[[0, 1, 0, 1, 0]])  # merged into 0, 1
    assert len({inverse[0], inverse[2], inverse[5]}) == 3  # 2: far from 0; 5: other experts
    assert len(reps) == 4
    r, inv = fuse_rows(x, ids, 0.0)
    assert len(r) == len(x) and np.array_equal(inv, np.arange(len(x)))


# -- model hash, link, keys ---------------------------------------------------------------


def test_model_hash_covers_header_not_data(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers_models import Shape, write_random_model

    from meldlite.formats import read_gguf

    s = Shape(n_vocab=4096, n_embd=64, n_layer=1, n_expert=4, n_ff_exp=64, head_dim=16)
    a = write_random_model(tmp_path / "a.gguf", "qwen3moe", s, np.float16, seed=0)
    b = write_random_model(tmp_path / "b.gguf", "qwen3moe", s, np.float16, seed=1)
    c = write_random_model(tmp_path / "c.gguf", "qwen3moe", s, np.float32, seed=0)
    ha, hb, hc = (P.model_hash(read_gguf(p)) for p in (a, b, c))
    assert ha == hb  # same header, other weights: the hash is of the header only
    assert ha != hc  # other tensor types
    assert len(ha) == 64


def test_link_parse_and_queueing():
    link = parse_link("100Mbit/5ms")
    assert link.bandwidth == 12.5e6 and link.latency == 0.005
    assert str(link) == "100Mbit/5ms"
    assert parse_link("20mbps/20ms").latency == 0.02
    for bad in ("100Mbit", "fast/5ms", "100Mbit/5parsecs", "0Mbit/1ms"):
        with pytest.raises(OptionError):
            parse_link(bad)
    link = Link(1000.0, 0.01)
    a1 = link.send(0.0, 100)  # 0.1 s on the wire + 10 ms
    a2 = link.send(0.0, 100)  # queues behind the first
    assert a1 == pytest.approx(0.11) and a2 == pytest.approx(0.21)
    assert link.reply(a1 + 0.05, 10) == pytest.approx(0.16 + 0.01 + 0.01)
    assert link.bound(2, 1000) == pytest.approx(0.04 + 1.0)


def test_keygen_layout_and_loading(tmp_path):
    d = tmp_path / "keys"
    security.keygen(d)
    server = security.ServerKeys.load(d)
    client = security.ClientKeys.load(d)
    assert client.server_public == server.public
    assert (d / "authorized" / "coordinator.key").read_bytes() == (
        d / "coordinator.key"
    ).read_bytes()
    with pytest.raises(OptionError, match="exists"):
        security.keygen(d)
    security.keygen(d, name="other")
    assert (d / "other.key_secret").exists()
    with pytest.raises(OptionError, match="does not exist"):
        security.ClientKeys.load(tmp_path / "nowhere")
    (tmp_path / "bad.key_secret").write_text("not a certificate")
    with pytest.raises(OptionError):
        security.ClientKeys.load(d, secret_file=tmp_path / "bad.key_secret")


@pytest.mark.parametrize(
    "endpoint, loopback",
    [
        ("tcp://127.0.0.1:5555", True),
        ("tcp://localhost:1", True),
        ("tcp://[::1]:5", True),
        ("tcp://0.0.0.0:5555", False),
        ("tcp://10.1.2.3:5555", False),
        ("tcp://*:5555", False),
    ],
)
def test_loopback_detection(endpoint, loopback):
    assert security.is_loopback(endpoint) is loopback
    if not loopback:
        with pytest.raises(OptionError, match="--insecure"):
            security.check_exposure(endpoint, None, False, "--listen")
        security.check_exposure(endpoint, None, True, "--listen")


def test_bad_endpoints():
    for bad in ("127.0.0.1:5555", "ipc:///tmp/x", "tcp://host", "tcp://h:99999"):
        with pytest.raises(OptionError):
            security.split_endpoint(bad)


def test_error_codes_documented():
    assert set(P.CODES) >= {"MALFORMED", "TRUNCATED", "OVERSIZED", "VERSION", "MODEL_MISMATCH"}
    frames = P.error_message("BUDGET", "too big", 4)
    h, payload = P.parse(frames)
    assert h.type == P.Msg.ERROR and h.req_id == 4
    assert json.loads(payload[0]) == {
        "code": "BUDGET",
        "message": "too big",
        "protocol": P.PROTOCOL_VERSION,
    }
