"""The wire protocol between a coordinator and its expert peers (the one module
that defines it).

Every message is a ZeroMQ multipart message `[header, frame, ...]`. The header
is 20 bytes, little-endian (`HEADER`):

    offset size field    meaning
    0      2    magic    b"ML"
    2      1    version  PROTOCOL_VERSION; a peer answers another version with ERROR "VERSION"
    3      1    type     a `Msg` value
    4      4    req_id   request id, echoed by the reply (0 for HEARTBEAT)
    8      2    layer    COMPUTE/RESULT: the layer
    10     1    enc      COMPUTE/RESULT: wire encoding (low 4 bits, `Enc`) | IDS16 | EXACT
    11     1    k        COMPUTE: slots per token (top-k)
    12     4    rows     COMPUTE/RESULT: rows of the hidden-state frame
    16     4    aux      RESULT: the peer's service time in microseconds; else 0

Frames after the header, by type (shapes in numpy order; E = n_embd):

    HELLO, WELCOME, ASSIGN, ASSIGNED, LOADED, ERROR, STATS, STATS_REPLY, BYE:
                one JSON frame: a UTF-8 object of at most `Limits.json` bytes
    LOAD        JSON {"layer", "expert"}, then three raw uint8 frames: the gate,
                up and down matrices exactly as the GGUF file stores them; when
                ASSIGN said "bias": true, a fourth, the expert's biases float32
                (2 n_ff + E,) = [gate | up | down]
    COMPUTE     x (rows, E) encoded per `enc`; ids (rows, k) int8, or int16 with
                IDS16 (-1 = slot not for this peer); compact mode only: weights
                (rows, k) float32
    RESULT      compact: (rows, E) encoded per `enc`, the weighted sum of this
                peer's slots per row; exact (EXACT, always F32): (pairs, E), each
                chosen expert's own output, pairs in row-major (row, slot) order
    HEARTBEAT   no frames (a peer sends one to each client every interval)

Encodings of hidden states: F32 (lossless), F16, Q8 (Q8_0-style blocks of 32
values: an f16 scale d = max|x|/127 and 32 int8 q = round(x/d), ties to even,
34 bytes per block, the same rounding as llama.cpp's Q8_0 activations).

Nothing that arrives is unpickled or evaluated: headers are `struct`-unpacked,
JSON is parsed into plain values and checked field by field, and arrays are
`np.frombuffer` views of the received frames whose byte sizes are checked
against the header before any array is built. Size limits (`Limits`) are
checked before anything is allocated from a message's numbers; libzmq itself
drops frames larger than `Limits.frame` (ZMQ_MAXMSGSIZE) before they reach us.
A bad message raises `WireError` with one of the `CODES`; a peer answers it
with an ERROR message naming the code and keeps serving.
"""

import enum
import hashlib
import json
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from meldlite.errors import OptionError, ProtocolError

PROTOCOL_VERSION = 3  # 3: ASSIGN says "act" and "bias" (the experts' activation and
# biases, gpt-oss); 2: ASSIGN says "llama_numerics" (1 said "round_acts")
MAGIC = b"ML"
HEADER = struct.Struct("<2sBBIHBBII")  # magic version type req_id layer enc k rows aux
assert HEADER.size == 20


class Msg(enum.IntEnum):
    HELLO = 1  # coordinator -> peer: {"protocol", "model_hash", "client"}
    WELCOME = 2  # peer -> coordinator: {"protocol", "model_hash"|null, "has_model", "budget", ...}
    ASSIGN = 3  # coordinator -> peer: config, experts to serve and their types
    ASSIGNED = 4  # peer -> coordinator: {"need": [[layer, e], ...], "bytes"}
    LOAD = 5  # coordinator -> peer: one expert's three matrices
    LOADED = 6  # peer -> coordinator: {"layer", "expert", "remaining"}
    COMPUTE = 7  # coordinator -> peer: one layer's hidden states for this peer
    RESULT = 8  # peer -> coordinator
    HEARTBEAT = 9  # peer -> coordinator, every heartbeat interval
    ERROR = 10  # peer -> coordinator: {"code", "message", "protocol"}
    BYE = 11  # coordinator -> peer: end of session (no reply)
    STATS = 12  # coordinator -> peer: counters please
    STATS_REPLY = 13  # peer -> coordinator: {"requests", "errors", ...}


JSON_TYPES = frozenset(
    {
        Msg.HELLO,
        Msg.WELCOME,
        Msg.ASSIGN,
        Msg.ASSIGNED,
        Msg.LOADED,
        Msg.ERROR,
        Msg.BYE,
        Msg.STATS,
        Msg.STATS_REPLY,
    }
)


class Enc(enum.IntEnum):
    F32 = 0
    F16 = 1
    Q8 = 2


ENC_MASK, IDS16, EXACT = 0x0F, 0x10, 0x80
Q8_BLOCK, Q8_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]  # f16 scale + 32 int8

# Error codes a peer replies with (ERROR {"code": ...}).
CODES = {
    "MALFORMED": "the message does not follow the protocol layout",
    "TRUNCATED": "a frame is shorter than its header says, or frames are missing",
    "OVERSIZED": "the message asks for more than the peer's size limits",
    "VERSION": "the protocol versions differ",
    "UNKNOWN_TYPE": "the message type is not one this side accepts",
    "MODEL_MISMATCH": "coordinator and peer do not serve the same model",
    "NO_SESSION": "no handshake (HELLO/ASSIGN) from this client yet, or the peer restarted",
    "NOT_HERE": "a requested expert is not held by this peer",
    "BUDGET": "the assigned experts do not fit the peer's memory budget",
    "BAD_REQUEST": "the request's values are out of range",
    "INTERNAL": "the peer failed while serving a valid request (see its log)",
}


class WireError(ProtocolError):
    """A message broke the protocol; `code` is one of CODES."""

    def __init__(self, code, message, req_id=0):
        assert code in CODES, code
        super().__init__(f"{code}: {message}")
        self.code = code
        self.detail = message
        self.req_id = req_id


@dataclass(frozen=True)
class Limits:
    """Sizes a side accepts; checked before anything is allocated from a message."""

    json: int = 1 << 16  # bytes of a JSON frame
    rows: int = 1 << 16  # rows of a hidden-state frame (tokens, or pairs in exact mode)
    frame: int = 1 << 30  # bytes of any frame (an expert matrix in LOAD); ZMQ_MAXMSGSIZE
    frames: int = 8  # frames per message, header included
    layers: int = 1 << 12  # layers and experts a config may name
    experts: int = 1 << 12
    n_embd: int = 1 << 16
    n_ff: int = 1 << 18


# -- headers -------------------------------------------------------------------


@dataclass
class Header:
    type: int
    req_id: int = 0
    layer: int = 0
    enc: int = 0
    k: int = 0
    rows: int = 0
    aux: int = 0
    version: int = PROTOCOL_VERSION

    def pack(self):
        return HEADER.pack(
            MAGIC,
            self.version,
            int(self.type),
            self.req_id & 0xFFFFFFFF,
            self.layer,
            self.enc,
            self.k,
            self.rows,
            min(self.aux, 0xFFFFFFFF),
        )

    @property
    def encoding(self):
        return Enc(self.enc & ENC_MASK)

    @property
    def exact(self):
        return bool(self.enc & EXACT)


def parse_header(buf):
    """Header of a message from its first frame's bytes; WireError if malformed."""
    if len(buf) < HEADER.size:
        if len(buf) >= 2 and bytes(buf[:2]) != MAGIC:
            raise WireError("MALFORMED", "bad magic")
        raise WireError("TRUNCATED", f"header has {len(buf)} bytes, expected {HEADER.size}")
    if len(buf) > HEADER.size:
        raise WireError("MALFORMED", f"header has {len(buf)} bytes, expected {HEADER.size}")
    magic, version, mtype, req_id, layer, enc, k, rows, aux = HEADER.unpack(buf)
    if magic != MAGIC:
        raise WireError("MALFORMED", f"bad magic {magic!r}")
    if version != PROTOCOL_VERSION:
        raise WireError(
            "VERSION", f"protocol version {version}, this side speaks {PROTOCOL_VERSION}", req_id
        )
    try:
        mtype = Msg(mtype)
    except ValueError:
        raise WireError("UNKNOWN_TYPE", f"message type {mtype}", req_id) from None
    return Header(mtype, req_id, layer, enc, k, rows, aux)


def frame_bytes(frame):
    """A flat byte view of a frame (zmq.Frame, bytes or a contiguous array), without copying."""
    buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
    return buf if buf.ndim == 1 and buf.itemsize == 1 else buf.cast("B")


def parse(frames, limits=Limits()):
    """(Header, payload frames) of a received multipart message; WireError if bad."""
    if not frames:
        raise WireError("TRUNCATED", "empty message")
    if len(frames) > limits.frames:
        raise WireError("OVERSIZED", f"{len(frames)} frames, at most {limits.frames}")
    header = parse_header(frame_bytes(frames[0]))
    return header, list(frames[1:])


def expect_frames(header, payload, n):
    if len(payload) < n:
        raise WireError(
            "TRUNCATED",
            f"{Msg(header.type).name} needs {n} frames after the header, got {len(payload)}",
            header.req_id,
        )
    if len(payload) > n:
        raise WireError(
            "MALFORMED",
            f"{Msg(header.type).name} takes {n} frames after the header, got {len(payload)}",
            header.req_id,
        )


# -- JSON frames -----------------------------------------------------------------


def pack_json(obj):
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("utf-8")


def parse_json(frame, limits=Limits(), req_id=0):
    """A JSON object from a frame, size-checked first; WireError if not one."""
    buf = frame_bytes(frame)
    if len(buf) > limits.json:
        raise WireError(
            "OVERSIZED", f"JSON frame of {len(buf)} bytes, at most {limits.json}", req_id
        )
    try:
        obj = json.loads(bytes(buf).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise WireError("MALFORMED", f"JSON frame does not parse: {e}", req_id) from None
    if not isinstance(obj, dict):
        raise WireError("MALFORMED", "JSON frame is not an object", req_id)
    return obj


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def field(obj, name, kind, req_id=0, lo=None, hi=None, optional=False):
    """obj[name] checked to be of `kind` (int, bool, str, list, dict) and within [lo, hi]."""
    if name not in obj:
        if optional:
            return None
        raise WireError("MALFORMED", f"field {name!r} is missing", req_id)
    v = obj[name]
    if v is None and optional:
        return None
    ok = isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    if not ok:
        raise WireError("MALFORMED", f"field {name!r} is not a {kind.__name__}", req_id)
    if kind is int and ((lo is not None and v < lo) or (hi is not None and v > hi)):
        code = "OVERSIZED" if hi is not None and v > hi else "BAD_REQUEST"
        raise WireError(code, f"field {name!r} = {v} is outside [{lo}, {hi}]", req_id)
    return v


def message(mtype, obj=None, req_id=0, **header):
    """Frames of a JSON-carrying (or empty) message."""
    frames = [Header(mtype, req_id, **header).pack()]
    if obj is not None:
        frames.append(pack_json(obj))
    return frames


def error_message(code, text, req_id=0):
    return message(Msg.ERROR, {"code": code, "message": text, "protocol": PROTOCOL_VERSION}, req_id)


def raise_error_reply(obj, where):
    """Turn an ERROR message's JSON into a PeerError-worthy WireError."""
    code = obj.get("code") if isinstance(obj.get("code"), str) else "MALFORMED"
    if code not in CODES:
        code = "MALFORMED"
    raise WireError(code, f"{where}: {obj.get('message', '')}")


# -- hidden-state encodings --------------------------------------------------------

ENCODINGS = {"f32": Enc.F32, "f16": Enc.F16, "q8": Enc.Q8}


def parse_encoding(name):
    try:
        return ENCODINGS[str(name).lower()]
    except KeyError:
        raise OptionError(f"wire encoding {name!r} is not one of {', '.join(ENCODINGS)}") from None


def encoded_nbytes(enc, rows, n_embd):
    """Bytes of `rows` hidden states of width n_embd in encoding `enc`."""
    if enc == Enc.F32:
        return rows * n_embd * 4
    if enc == Enc.F16:
        return rows * n_embd * 2
    if enc == Enc.Q8:
        return rows * (n_embd // Q8_BLOCK) * Q8_BLOCK_BYTES
    raise WireError("MALFORMED", f"unknown encoding {int(enc)}")


def check_encoding(enc, n_embd):
    if enc == Enc.Q8 and n_embd % Q8_BLOCK:
        raise OptionError(
            f"q8 wire encoding needs n_embd divisible by {Q8_BLOCK}, model has {n_embd}"
        )


def encode(x, enc):
    """float32 (rows, E) -> a contiguous array holding its wire bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if enc == Enc.F32:
        return x
    if enc == Enc.F16:
        with np.errstate(over="ignore"):
            return x.astype(np.float16)
    if enc == Enc.Q8:
        rows, e = x.shape
        b = x.reshape(rows, e // Q8_BLOCK, Q8_BLOCK)  # (R, B, 32)
        amax = np.abs(b).max(axis=-1)  # (R, B)
        d = (amax / np.float32(127)).astype(np.float16)  # (R, B)
        with np.errstate(divide="ignore"):
            inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        q = np.rint(b * inv[..., None]).astype(np.int8)  # (R, B, 32)
        out = np.empty((rows, e // Q8_BLOCK, Q8_BLOCK_BYTES), np.uint8)  # (R, B, 34)
        out[..., :2] = d[..., None].view(np.uint8)
        out[..., 2:] = q.view(np.uint8)
        return out
    raise OptionError(f"unknown encoding {enc!r}")


def decode(buf, enc, rows, n_embd, req_id=0):
    """Wire bytes -> float32 (rows, E); the byte count is checked first.

    F32 gives a read-only view of `buf` (no copy); the others a new array."""
    buf = frame_bytes(buf)
    want = encoded_nbytes(enc, rows, n_embd)
    if len(buf) != want:
        code = "TRUNCATED" if len(buf) < want else "MALFORMED"
        raise WireError(
            code,
            f"hidden-state frame has {len(buf)} bytes, {rows} rows of "
            f"{n_embd} in {Enc(enc).name} need {want}",
            req_id,
        )
    raw = np.frombuffer(buf, np.uint8)
    if enc == Enc.F32:
        return raw.view(np.float32).reshape(rows, n_embd)
    if enc == Enc.F16:
        return raw.view(np.float16).reshape(rows, n_embd).astype(np.float32)
    blocks = raw.reshape(rows, n_embd // Q8_BLOCK, Q8_BLOCK_BYTES)  # (R, B, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # (R, B, 1)
    q = blocks[..., 2:].view(np.int8).astype(np.float32)  # (R, B, 32)
    return (q * d).reshape(rows, n_embd)


def array_frame(buf, dtype, shape, what, req_id=0):
    """np view of a frame checked to hold exactly `shape` of `dtype`."""
    buf = frame_bytes(buf)
    want = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if len(buf) != want:
        code = "TRUNCATED" if len(buf) < want else "MALFORMED"
        raise WireError(
            code,
            f"{what} frame has {len(buf)} bytes, expected {want} for "
            f"{np.dtype(dtype).name} {tuple(shape)}",
            req_id,
        )
    return np.frombuffer(buf, dtype).reshape(shape)


# -- COMPUTE / RESULT ------------------------------------------------------------------


def compute_message(req_id, layer, x_wire, ids, weights, enc, exact):
    """Frames of a COMPUTE request (x_wire already encoded; weights None in exact mode)."""
    rows, k = ids.shape
    wide = ids.size and (ids.max() > 127)
    ids_wire = ids.astype(np.int16 if wide else np.int8)
    flags = int(enc) | (IDS16 if wide else 0) | (EXACT if exact else 0)
    frames = [Header(Msg.COMPUTE, req_id, layer, flags, k, rows).pack(), x_wire, ids_wire]
    if not exact:
        frames.append(np.ascontiguousarray(weights, dtype=np.float32))
    return frames


def parse_compute(header, payload, n_embd, limits=Limits()):
    """(x float32 (rows, E), ids int32 (rows, k), weights float32 (rows, k) | None)."""
    r = header.req_id
    if header.rows > limits.rows:
        raise WireError("OVERSIZED", f"{header.rows} rows, at most {limits.rows}", r)
    if not 1 <= header.k <= 64:
        raise WireError("BAD_REQUEST", f"k = {header.k} slots per token", r)
    try:
        enc = header.encoding
    except ValueError:
        raise WireError("MALFORMED", f"unknown encoding {header.enc & ENC_MASK}", r) from None
    if header.exact and enc != Enc.F32:
        raise WireError("BAD_REQUEST", "exact mode needs the F32 encoding", r)
    if enc == Enc.Q8 and n_embd % Q8_BLOCK:
        raise WireError("BAD_REQUEST", f"Q8 needs n_embd divisible by {Q8_BLOCK}", r)
    expect_frames(header, payload, 2 if header.exact else 3)
    x = decode(payload[0], enc, header.rows, n_embd, r)
    ids = array_frame(
        payload[1], np.int16 if header.enc & IDS16 else np.int8, (header.rows, header.k), "ids", r
    ).astype(np.int32)
    weights = (
        None
        if header.exact
        else array_frame(payload[2], np.float32, (header.rows, header.k), "weights", r)
    )
    return x, ids, weights


def result_message(req_id, layer, y, enc, exact, service_us):
    y_wire = encode(y, Enc.F32 if exact else enc)
    flags = (int(Enc.F32) | EXACT) if exact else int(enc)
    return [Header(Msg.RESULT, req_id, layer, flags, 0, len(y), service_us).pack(), y_wire]


def parse_result(header, payload, rows, n_embd, limits=Limits()):
    """float32 (rows, E) of a RESULT that must have `rows` rows."""
    if header.rows != rows:
        raise WireError(
            "MALFORMED", f"result has {header.rows} rows, expected {rows}", header.req_id
        )
    expect_frames(header, payload, 1)
    try:
        enc = header.encoding
    except ValueError:
        raise WireError("MALFORMED", f"unknown encoding {header.enc & ENC_MASK}") from None
    return decode(payload[0], enc, rows, n_embd, header.req_id)


# -- sending -------------------------------------------------------------------------

ZERO_COPY_MIN = 1 << 16  # smaller frames are copied: cheaper than tracking a zero-copy frame


def send_frames(sock, frames, flags=0):
    """Send a multipart message; frames of ZERO_COPY_MIN bytes or more without copying
    (libzmq keeps a reference to the buffer until it is sent)."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        n = f.nbytes if isinstance(f, np.ndarray) else len(f)
        sock.send(f, flags | (0 if i == last else 0x2), copy=n < ZERO_COPY_MIN)  # 0x2: SNDMORE


# -- accounting and model identity ---------------------------------------------------


def wire_size(frames):
    """Bytes a multipart message takes in ZMTP frames: payload plus each frame's
    flag and length bytes (1 + 1 below 256 bytes, 1 + 8 above). TCP/IP headers
    are not counted."""
    total = 0
    for f in frames:
        n = f.nbytes if isinstance(f, np.ndarray) else len(frame_bytes(f))
        total += n + (2 if n < 256 else 9)
    return total


def model_hash(gguf):
    """sha256 (hex) of a GGUF file's header: magic, version, metadata and tensor
    table, i.e. every byte before the tensor data (`read_gguf` has checked them)."""
    h = hashlib.sha256()
    with open(gguf.path, "rb") as f:
        remaining = gguf.data_offset
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()
