"""Integer block sums written as LLVM vector code (Numba intrinsics) for qdot's row kernels.

Numba's loop vectorizer does not find the instruction sequence these sums want: 8-bit
weight codes times 8-bit activation codes, summed in pairs to int16 and then, times a
per-sub-block scale, in pairs to int32 (x86: vpmaddubsw then vpmaddwd, which LLVM turns
into vpdpwssd where AVX-VNNI exists). So each function below builds that sequence as LLVM
IR on 32-byte vectors, one quantized block per call, and returns exact int32 sums:

    q4k_sums(row, o, qa, oa, bs, ob) -> (isum, msum)   Q4_K super-block at row[o:]
        isum = sum_j sc_j * sum_l q_jl * qa[oa + 32j + l],  msum = sum_j m_j * bs[ob + j]
    q6k_sum(row, o, qa, oa) -> isum                    Q6_K super-block at row[o:]
        isum = sum_i sc_i * sum_l (q_il - 32) * qa[oa + 16i + l]
    q5k_sums (as q4k_sums), q2k_sums (isum, msum; the per-16 code sums taken here),
    q3k_sum, iq4xs_sum (isum)                          the other Q8_K types' super-blocks
    iq4nl_sums4, q4_1_sums4, q5_1_sums4, mxfp4_sums4   four 32-value blocks (or one:
        (and *_sum1)                                   *_sum1)
        -> int32 per block: the codes . qa, no scales (qdot scales each block)
        (IQ4 codes are int8 values from a 16-entry table: vpshufb, then int8 x int8 pairs
        as vpmaddubsw(|a|, q * sign(a)), exact as q > -128)
    q8_0_sum1(row, o, qa, oa) -> s                     one Q8_0 block's codes . qa
    q8_0_acc4(row, o, qa, oa, da, od, acc) -> float32  four Q8_0 blocks' float terms added
        to acc in block order (their f16 scales converted together: vcvtph2ps)
    q4k_tile, q6k_tile, q8_0_tile                      one block against several tokens
        (the block unpacked once; qdot's float steps per token; see "token tiles")
    f16_hw(row, o) -> float32                          the float16 at byte o (F16C, fcvt)
    u16_at(row, o) -> uint16                           the uint16 at byte o

Offsets count elements from the start of C-contiguous arrays of any number of dimensions
(row o of a 2-D array is at o * shape[1]), so callers never slice inside their loops.

Integer sums are exact, so the float steps around them (in qdot) decide the result bits,
and they do not depend on which instructions computed the integers. On x86 with AVX2 the
code calls the vpmaddubsw/vpmaddwd intrinsics; elsewhere it emits the same
arithmetic as plain vector IR (widen, multiply, add even and odd lanes; table lookups as
compare-and-select chains) that LLVM lowers for any target. No value can saturate the
int16 pairs: |code x int8| pairs stay below 2 * 127 * 128 (IQ4's -127 is the largest code).

NumPy references: `reference.q4k_sums_ref`, `q6k_sum_ref`, `int_sums_ref`.
"""

import llvmlite.binding as llb
from gguf import quants as gguf_quants
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic

_FEATURES = (
    config.CPU_FEATURES
    if config.CPU_FEATURES is not None
    else llb.get_host_cpu_features().flatten()
)
_AARCH64 = llb.get_process_triple().startswith(("aarch64", "arm64"))
AVX2 = "+avx2" in _FEATURES.split(",")  # x86 with AVX2: call the x86 intrinsics
# float16 -> float32 in one instruction: x86's F16C, or AArch64's fcvt (in the base
# ISA); without them LLVM lowers f16_hw to a runtime-library call, and qdot converts
# the bits in code instead
F16C = "+f16c" in _FEATURES.split(",") or _AARCH64

KVALUES_IQ4 = [int(v) for v in gguf_quants.IQ4_NL.kvalues]  # (16,) int8 code values
KVALUES_MXFP4 = [int(v) for v in gguf_quants.MXFP4.kvalues]  # (16,) E2M1 values times 2

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
V32I8, V16I8, V8I8 = ir.VectorType(I8, 32), ir.VectorType(I8, 16), ir.VectorType(I8, 8)
V16I16, V8I16, V8I32 = ir.VectorType(I16, 16), ir.VectorType(I16, 8), ir.VectorType(I32, 8)


# ---------------------------------------------------------------- IR helpers


def _typed(*pairs):
    """Typing guard: (array type, dtype) pairs; the sums read raw memory at element
    offsets, so each array must be C-contiguous with exactly that dtype."""
    return all(isinstance(a, types.Array) and a.layout == "C" and a.dtype == d for a, d in pairs)


def _offsets(context, builder, sig, args):
    """args with every integer argument cast to int64 (offsets index with i64)."""
    return [
        context.cast(builder, v, t, types.int64) if isinstance(t, types.Integer) else v
        for v, t in zip(args, sig.args)
    ]


def _block_args(context, builder, sig, args):
    """(ctx, rowty, row, o, qaty, qa, oa) of a (row, o, qa, oa) block-sum intrinsic."""
    rowty, _, qaty, _ = sig.args
    row, o, qa, oa = _offsets(context, builder, sig, args)
    return _Ctx(context, builder, AVX2), rowty, row, o, qaty, qa, oa


class _Ctx:
    """An IR builder plus the Numba context, with the few operations the sums need."""

    def __init__(self, context, builder, use_x86):
        self.context, self.b, self.x86 = context, builder, use_x86

    def load(self, aryty, ary, off, ty, extra=0):
        """ty loaded (unaligned) from the array's element off + extra."""
        data = self.context.make_array(aryty)(self.context, self.b, ary).data
        p = self.b.gep(data, [self.b.add(off, ir.Constant(I64, extra))])
        return self.b.load(self.b.bitcast(p, ty.as_pointer()), align=1, typ=ty)

    def call(self, name, ret, args):
        fnty = ir.FunctionType(ret, [a.type for a in args])
        return self.b.call(cgutils.get_or_insert_function(self.b.module, fnty, name), args)

    def _pairs(self, a, b, ext_a, wide):
        """(a_even * b_even + a_odd * b_odd) widened to `wide` (the generic form)."""
        n = a.type.count
        ev = ir.Constant(ir.VectorType(I32, n // 2), list(range(0, n, 2)))
        od = ir.Constant(ir.VectorType(I32, n // 2), list(range(1, n, 2)))
        ae, ao = (ext_a(self.b.shuffle_vector(a, a, m), wide) for m in (ev, od))
        be, bo = (self.b.sext(self.b.shuffle_vector(b, b, m), wide) for m in (ev, od))
        return self.b.add(self.b.mul(ae, be), self.b.mul(ao, bo))

    def maddubs(self, a, b):
        """u8 a (32,) x s8 b (32,) -> int16 pair sums (16,)."""
        if self.x86:
            return self.call("llvm.x86.avx2.pmadd.ub.sw", V16I16, [a, b])
        return self._pairs(a, b, self.b.zext, V16I16)

    def madd(self, a, b):
        """int16 a (16,) x int16 b (16,) -> int32 pair sums (8,)."""
        if self.x86:
            return self.call("llvm.x86.avx2.pmadd.wd", V8I32, [a, b])
        return self._pairs(a, b, self.b.sext, V8I32)

    def maddss(self, q, a):
        """s8 q (32,) x s8 a (32,) -> int16 pair sums (16,), exact for q > -128 (any a).
        x86: vpmaddubsw(|a|, q * sign(a)) - |-128| is 128 as u8, and q * sign(a) fits."""
        if self.x86:
            sign = lambda x, y: self.call("llvm.x86.avx2.psign.b", V32I8, [x, y])  # noqa: E731
            return self.call("llvm.x86.avx2.pmadd.ub.sw", V16I16, [sign(a, a), sign(q, a)])
        return self._pairs(q, a, self.b.sext, V16I16)

    def lookup16(self, idx, table):
        """table[idx] per lane for idx <32 x i8> in 0..15 and a table of 16 int8 values
        (x86: vpshufb; elsewhere a chain of compares and selects)."""
        if self.x86:
            return self.call("llvm.x86.avx2.pshuf.b", V32I8, [ir.Constant(V32I8, table * 2), idx])
        v = self.const8(table[0])
        for i in range(1, 16):
            v = self.b.select(
                self.b.icmp_unsigned("==", idx, self.const8(i)), self.const8(table[i]), v
            )
        return v

    def reduce(self, v):
        return self.call(f"llvm.vector.reduce.add.v{v.type.count}i32", I32, [v])

    def splat(self, v, lanes):
        """The vector of v's lanes `lanes` (indices), e.g. one scale repeated."""
        return self.b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, len(lanes)), list(lanes)))

    def const8(self, value):
        return ir.Constant(V32I8, [value] * 32)


def _words_to_i16(c, lo, hi):
    """Two i32 words -> their 8 bytes zero-extended to <8 x i16>."""
    v2 = ir.VectorType(I32, 2)
    v = c.b.insert_element(ir.Constant(v2, ir.Undefined), lo, ir.Constant(I32, 0))
    v = c.b.insert_element(v, hi, ir.Constant(I32, 1))
    return c.b.zext(c.b.bitcast(v, V8I8), V8I16)


def _q4k_scales(c, rowty, row, o):
    """(sc, m) <8 x i16> from the 12 packed bytes at row[o+4:] (ggml's Q4_K/Q5_K
    scale packing, its get_scale_min_k4: sub-blocks 0-3 keep the low 6 bits of bytes 0-3 / 4-7; sub-blocks 4-7
    take 4 bits from bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7)."""
    b = c.b
    w0, w1, w2 = (c.load(rowty, row, o, I32, 4 + 4 * i) for i in range(3))
    k6, k4, k2 = (ir.Constant(I32, k) for k in (0x3F3F3F3F, 0x0F0F0F0F, 0x03030303))
    top2 = lambda w: b.shl(b.and_(b.lshr(w, ir.Constant(I32, 6)), k2), ir.Constant(I32, 4))  # noqa: E731
    sc_hi = b.or_(b.and_(w2, k4), top2(w0))
    m_hi = b.or_(b.and_(b.lshr(w2, ir.Constant(I32, 4)), k4), top2(w1))
    return _words_to_i16(c, b.and_(w0, k6), sc_hi), _words_to_i16(c, b.and_(w1, k6), m_hi)


# ---------------------------------------------------------------- block sums


def _k_affine_codegen(high):
    """Codegen of q4k_sums (high=False) or q5k_sums (high: the 5th bits in qh[32] at byte
    16, the nibbles at 48 instead of 16)."""

    def codegen(context, builder, sig, args):
        rowty, _, qaty, _, bsty, _ = sig.args
        row, o, qa, oa, bs, ob = _offsets(context, builder, sig, args)
        c = _Ctx(context, builder, AVX2)
        b = c.b
        sc, mn = _q4k_scales(c, rowty, row, o)
        qh = c.load(rowty, row, o, V32I8, 16) if high else None
        acc = None
        for k in range(4):  # 64 values: 32 bytes, low nibbles = sub-block 2k, high = 2k+1
            w = c.load(rowty, row, o, V32I8, (48 if high else 16) + 32 * k)
            lo, hi = b.and_(w, c.const8(15)), b.lshr(w, c.const8(4))
            if high:  # bit 2k of qh[l] tops value l of sub-block 2k, bit 2k+1 of 2k+1
                lo, hi = (
                    b.or_(
                        v, b.shl(b.and_(b.lshr(qh, c.const8(2 * k + i)), c.const8(1)), c.const8(4))
                    )
                    for i, v in enumerate((lo, hi))
                )
            al, ah = c.load(qaty, qa, oa, V32I8, 64 * k), c.load(qaty, qa, oa, V32I8, 64 * k + 32)
            s = b.add(
                c.madd(c.maddubs(lo, al), c.splat(sc, [2 * k] * 16)),
                c.madd(c.maddubs(hi, ah), c.splat(sc, [2 * k + 1] * 16)),
            )
            acc = s if acc is None else b.add(acc, s)
        msum = c.reduce(b.mul(b.sext(mn, V8I32), c.load(bsty, bs, ob, V8I32)))
        return context.make_tuple(builder, sig.return_type, [c.reduce(acc), msum])

    return codegen


_q4k_codegen = _k_affine_codegen(False)


@intrinsic
def q4k_sums(typingctx, row, o, qa, oa, bs, ob):
    """(isum, msum) int32 of the Q4_K super-block at row[o:] (144 bytes) against the Q8_K
    codes qa[oa:oa+256] and their per-32 sums bs[ob:ob+8]."""
    if _typed((row, types.uint8), (qa, types.int8), (bs, types.int32)):
        return types.UniTuple(types.int32, 2)(row, o, qa, oa, bs, ob), _q4k_codegen


@intrinsic
def q5k_sums(typingctx, row, o, qa, oa, bs, ob):
    """(isum, msum) int32 of the Q5_K super-block at row[o:] (176 bytes: d, dmin,
    scales[12] as Q4_K, qh[32], qs[128]) against Q8_K codes and per-32 sums, as q4k_sums
    with 5-bit codes (nibble | bit j of qh[l] << 4 for value l of sub-block j)."""
    if _typed((row, types.uint8), (qa, types.int8), (bs, types.int32)):
        return types.UniTuple(types.int32, 2)(row, o, qa, oa, bs, ob), _k_affine_codegen(True)


def _crumbs(c, w, k):
    """The 2-bit fields (w >> 2k) & 3 of each byte of w <32 x i8>."""
    return c.b.and_(c.b.lshr(w, c.const8(2 * k)), c.const8(3))


def _q2k_codegen(context, builder, sig, args):
    c, rowty, row, o, qaty, qa, oa = _block_args(context, builder, sig, args)
    b = c.b
    sc8 = c.load(rowty, row, o, V16I8, 0)  # (16,) scale | min << 4 per 16 values
    sc = b.zext(b.and_(sc8, ir.Constant(V16I8, [15] * 16)), V16I16)
    mn = b.zext(b.lshr(sc8, ir.Constant(V16I8, [4] * 16)), V16I16)
    acc, macc = None, None
    for h in range(2):  # values 128h..: 2-bit fields of qs[32h:32h+32], shift 2j for 32j..
        w = c.load(rowty, row, o, V32I8, 16 + 32 * h)
        for j in range(4):
            a = c.load(qaty, qa, oa, V32I8, 128 * h + 32 * j)
            lanes = [8 * h + 2 * j] * 8 + [8 * h + 2 * j + 1] * 8
            s = c.madd(c.maddubs(_crumbs(c, w, j), a), c.splat(sc, lanes))
            m = c.madd(c.maddubs(c.const8(1), a), c.splat(mn, lanes))  # per-16 sums x mins
            acc = s if acc is None else b.add(acc, s)
            macc = m if macc is None else b.add(macc, m)
    return context.make_tuple(builder, sig.return_type, [c.reduce(acc), c.reduce(macc)])


@intrinsic
def q2k_sums(typingctx, row, o, qa, oa):
    """(isum, msum) int32 of the Q2_K super-block at row[o:] (84 bytes: scales[16], qs[64],
    d, dmin) against Q8_K codes qa[oa:oa+256]: isum = sum_i (sc_i & 15) * (q_i . qa_i),
    msum = sum_i (sc_i >> 4) * sum(qa_i) over the 16 groups i of 16 values (the per-16
    code sums are taken here: qdot's bs holds per-32 sums only)."""
    if _typed((row, types.uint8), (qa, types.int8)):
        return types.UniTuple(types.int32, 2)(row, o, qa, oa), _q2k_codegen


def _q3k_scales(c, rowty, row, o):
    """The 16 scales of a Q3_K block minus 32 as <16 x i16>, from the 12 bytes at row[o+96:]
    (ggml's packing: scale i has the nibble i % 8 >> 4 (i // 8) of bytes 0-7 and the 2 bits
    2 (i // 4) of byte 8 + i % 4 on top)."""
    b = c.b
    w0, w1, w2 = (c.load(rowty, row, o, I32, 96 + 4 * i) for i in range(3))
    k4, k2 = ir.Constant(I32, 0x0F0F0F0F), ir.Constant(I32, 0x03030303)
    top = lambda s: b.shl(b.and_(b.lshr(w2, ir.Constant(I32, s)), k2), ir.Constant(I32, 4))  # noqa: E731
    nib = lambda w, s: b.and_(b.lshr(w, ir.Constant(I32, s)), k4)  # noqa: E731
    words = [b.or_(nib(w0, 0), top(0)), b.or_(nib(w1, 0), top(2))]
    words += [b.or_(nib(w0, 4), top(4)), b.or_(nib(w1, 4), top(6))]
    v = ir.Constant(ir.VectorType(I32, 4), ir.Undefined)
    for i, word in enumerate(words):
        v = b.insert_element(v, word, ir.Constant(I32, i))
    v = b.zext(b.bitcast(v, V16I8), V16I16)
    return b.sub(v, ir.Constant(V16I16, [32] * 16))


def _q3k_codegen(context, builder, sig, args):
    c, rowty, row, o, qaty, qa, oa = _block_args(context, builder, sig, args)
    b = c.b
    sc = _q3k_scales(c, rowty, row, o)
    hm = c.load(rowty, row, o, V32I8, 0)  # hmask[32]: bit 4h+j of byte l for value 128h+32j+l
    acc = None
    for h in range(2):
        w = c.load(rowty, row, o, V32I8, 32 + 32 * h)
        for j in range(4):
            a = c.load(qaty, qa, oa, V32I8, 128 * h + 32 * j)
            hb = b.and_(b.lshr(hm, c.const8(4 * h + j)), c.const8(1))
            four = b.shl(b.xor(hb, c.const8(1)), c.const8(2))  # 4 where the bit is clear
            p = b.sub(c.maddubs(_crumbs(c, w, j), a), c.maddubs(four, a))  # (q - 4 + 4 hb) a
            s = c.madd(p, c.splat(sc, [8 * h + 2 * j] * 8 + [8 * h + 2 * j + 1] * 8))
            acc = s if acc is None else b.add(acc, s)
    return c.reduce(acc)


@intrinsic
def q3k_sum(typingctx, row, o, qa, oa):
    """isum int32 of the Q3_K super-block at row[o:] (110 bytes: hmask[32], qs[64],
    scales[12], d) . Q8_K codes qa[oa:oa+256]: sum_i (sc_i - 32) * (q_i . qa_i) over the
    16 groups of 16 values, q = 2-bit field - 4 + 4 * hmask bit (-4..3)."""
    if _typed((row, types.uint8), (qa, types.int8)):
        return types.int32(row, o, qa, oa), _q3k_codegen


def _q6k_codegen(context, builder, sig, args):
    c, rowty, row, o, qaty, qa, oa = _block_args(context, builder, sig, args)
    b = c.b
    acc = None
    for j, (q, s16) in enumerate(_q6k_lanes(c, rowty, row, o)):
        a = c.load(qaty, qa, oa, V32I8, 32 * j)
        p = b.sub(c.maddubs(q, a), c.maddubs(c.const8(32), a))  # (q - 32) * a pairs
        s = c.madd(p, s16)
        acc = s if acc is None else b.add(acc, s)
    return c.reduce(acc)


def _q6k_lanes(c, rowty, row, o):
    """The Q6_K super-block at row[o:] as 8 (codes, scales) pairs of 32 values each: the
    6-bit codes (<32 x i8>, 0..63) and their two 16-value sub-blocks' int8 scales splatted
    to <16 x i16>; pair j holds values 32j..32j+31."""
    b = c.b
    sc = b.sext(c.load(rowty, row, o, V16I8, 192), V16I16)  # (16,) int8 scales
    m15, m3 = c.const8(15), c.const8(3)
    lanes = []
    for h in range(2):  # half h: ql at 64h, qh at 128+32h, values 128h..128h+127
        l0, l1 = c.load(rowty, row, o, V32I8, 64 * h), c.load(rowty, row, o, V32I8, 64 * h + 32)
        hb = c.load(rowty, row, o, V32I8, 128 + 32 * h)
        top = [b.shl(b.and_(b.lshr(hb, c.const8(2 * i)), m3), c.const8(4)) for i in range(4)]
        codes = (
            b.or_(b.and_(l0, m15), top[0]),
            b.or_(b.and_(l1, m15), top[1]),
            b.or_(b.lshr(l0, c.const8(4)), top[2]),
            b.or_(b.lshr(l1, c.const8(4)), top[3]),
        )
        for k, q in enumerate(codes):  # values 128h+32k.., scales 8h+2k and 8h+2k+1
            lanes.append((q, c.splat(sc, [8 * h + 2 * k] * 8 + [8 * h + 2 * k + 1] * 8)))
    return lanes


@intrinsic
def q6k_sum(typingctx, row, o, qa, oa):
    """isum int32 of the Q6_K super-block at row[o:] (210 bytes) . Q8_K codes qa[oa:oa+256]."""
    if _typed((row, types.uint8), (qa, types.int8)):
        return types.int32(row, o, qa, oa), _q6k_codegen


def _iq4xs_scales(c, rowty, row, o):
    """The 8 sub-block scales of an IQ4_XS block minus 32 as <8 x i16>: 4 bits from the
    nibble i % 2 of scales_l[i // 2] (bytes 4-7), 2 bits 2i of scales_h (bytes 2-3) on top."""
    b = c.b
    v8 = ir.VectorType(I16, 8)
    lo = b.bitcast(c.load(rowty, row, o, I32, 4), ir.VectorType(I8, 4))
    lo = b.zext(c.splat(lo, [0, 0, 1, 1, 2, 2, 3, 3]), v8)
    lo = b.and_(b.lshr(lo, ir.Constant(v8, [0, 4] * 4)), ir.Constant(v8, [15] * 8))
    hi = b.insert_element(
        ir.Constant(v8, ir.Undefined), c.load(rowty, row, o, I16, 2), ir.Constant(I32, 0)
    )
    hi = b.lshr(c.splat(hi, [0] * 8), ir.Constant(v8, list(range(0, 16, 2))))
    hi = b.shl(b.and_(hi, ir.Constant(v8, [3] * 8)), ir.Constant(v8, [4] * 8))
    return b.sub(b.or_(lo, hi), ir.Constant(v8, [32] * 8))


def _nibble_codes(c, w, first):
    """Of 32 bytes w (two 16-byte runs), the 32 nibble indices of run 0 (first) or 1: its
    low nibbles then its high nibbles (the value order of IQ4_NL / IQ4_XS blocks)."""
    lo, hi = c.b.and_(w, c.const8(15)), c.b.lshr(w, c.const8(4))
    base = 0 if first else 16
    mask = list(range(base, base + 16)) + list(range(32 + base, 48 + base))
    return c.b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), mask))


def _iq4xs_codegen(context, builder, sig, args):
    c, rowty, row, o, qaty, qa, oa = _block_args(context, builder, sig, args)
    b = c.b
    sc = _iq4xs_scales(c, rowty, row, o)
    acc = None
    for k in range(4):  # sub-blocks 2k and 2k+1: qs bytes 16 each at 8 + 32k
        w = c.load(rowty, row, o, V32I8, 8 + 32 * k)
        for i in range(2):
            q = c.lookup16(_nibble_codes(c, w, i == 0), KVALUES_IQ4)
            a = c.load(qaty, qa, oa, V32I8, 64 * k + 32 * i)
            s = c.madd(c.maddss(q, a), c.splat(sc, [2 * k + i] * 16))
            acc = s if acc is None else b.add(acc, s)
    return c.reduce(acc)


@intrinsic
def iq4xs_sum(typingctx, row, o, qa, oa):
    """isum int32 of the IQ4_XS super-block at row[o:] (136 bytes: d, scales_h u16,
    scales_l[4], qs[128]) . Q8_K codes qa[oa:oa+256]: sum_j (ls_j - 32) * (kv[q_j] . qa_j)
    over the 8 sub-blocks of 32 (kv: gguf-py's IQ4_NL values, int8)."""
    if _typed((row, types.uint8), (qa, types.int8)):
        return types.int32(row, o, qa, oa), _iq4xs_codegen


def _blocks32_codegen(g, nbytes, qs, qh, table, offset):
    """Sums of g blocks of 32 values, nbytes each, 16 nibble bytes at qs (value j: low
    nibble of byte j, 16 + j: its high nibble); qh: offset of a u32 whose bit j is value
    j's 5th bit (or None); table: 16 int8 values the codes index (or None: unsigned codes,
    minus `offset`)."""

    def codegen(context, builder, sig, args):
        c, rowty, row, o, qaty, qa, oa = _block_args(context, builder, sig, args)
        b = c.b
        ones = ir.Constant(V16I16, [1] * 16)
        parts = []
        for j in range(g):
            w = c.load(rowty, row, o, V16I8, qs + nbytes * j)
            w = b.shuffle_vector(w, w, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
            q = _nibble_codes(c, w, True)
            if qh is not None:  # u32 -> 32 lanes of its bits (lane j = bit j), times 16
                bits = b.bitcast(
                    c.load(rowty, row, o, I32, qh + nbytes * j), ir.VectorType(ir.IntType(1), 32)
                )
                q = b.or_(q, b.shl(b.zext(bits, V32I8), c.const8(4)))
            a = c.load(qaty, qa, oa, V32I8, 32 * j)
            if table:
                p = c.maddss(c.lookup16(q, table), a)
            else:  # (q - offset) * a pairs
                p = c.maddubs(q, a)
                p = b.sub(p, c.maddubs(c.const8(offset), a)) if offset else p
            parts.append(c.madd(p, ones))
        sums = _lane_sums(c, parts)
        return context.make_tuple(builder, sig.return_type, sums) if g > 1 else sums[0]

    return codegen


def _blocks32(g, *layout):
    """An intrinsic (row, o, qa, oa) -> g int32 sums (a tuple, or one int32 for g = 1) of
    the g blocks at row[o:] against the codes qa[oa:oa + 32 g], block by block."""

    def typer(typingctx, row, o, qa, oa):
        if _typed((row, types.uint8), (qa, types.int8)):
            ret = types.UniTuple(types.int32, g) if g > 1 else types.int32
            return ret(row, o, qa, oa), _blocks32_codegen(g, *layout)

    return intrinsic(typer)


# (block bytes, offset of qs, of qh or None, code table or None, code offset), from
# ggml's block structs
IQ4_NL_LAYOUT = (18, 2, None, KVALUES_IQ4, 0)  # d, qs[16]
MXFP4_LAYOUT = (17, 1, None, KVALUES_MXFP4, 0)  # e (E8M0), qs[16]
Q4_0_LAYOUT = (18, 2, None, None, 8)  # d, qs[16]; q - 8
Q5_0_LAYOUT = (22, 6, 2, None, 16)  # d, qh u32, qs[16]; q - 16
Q4_1_LAYOUT = (20, 4, None, None, 0)  # d, m, qs[16]
Q5_1_LAYOUT = (24, 8, 4, None, 0)  # d, m, qh u32, qs[16]
# (s0, s1, s2, s3) int32 of the four blocks at row[o:] . Q8_0/Q8_1 codes qa[oa:oa+128]
# (s_j = codes of block j . qa[oa + 32 j:][:32]), and the one-block forms
iq4nl_sums4, iq4nl_sum1 = _blocks32(4, *IQ4_NL_LAYOUT), _blocks32(1, *IQ4_NL_LAYOUT)
q4_1_sums4, q4_1_sum1 = _blocks32(4, *Q4_1_LAYOUT), _blocks32(1, *Q4_1_LAYOUT)
q5_1_sums4, q5_1_sum1 = _blocks32(4, *Q5_1_LAYOUT), _blocks32(1, *Q5_1_LAYOUT)
mxfp4_sums4, mxfp4_sum1 = _blocks32(4, *MXFP4_LAYOUT), _blocks32(1, *MXFP4_LAYOUT)
q4_0_sums4, q4_0_sum1 = _blocks32(4, *Q4_0_LAYOUT), _blocks32(1, *Q4_0_LAYOUT)
q5_0_sums4, q5_0_sum1 = _blocks32(4, *Q5_0_LAYOUT), _blocks32(1, *Q5_0_LAYOUT)


def _q8_0_vector(c, rowty, row, o, qaty, qa, oa, g):
    """<g x i32>: the sums of g Q8_0 blocks (34 bytes: d, qs[32] int8) at row[o:] against
    Q8_0 codes qa[oa:], block by block: |w| (u8) x a * sign(w) pairs (ggml's
    mul_sum_i8_pairs; exact for a > -128, which Q8_0 activations are), int16 pairs to
    int32, one reduction for the g blocks."""
    ones = ir.Constant(V16I16, [1] * 16)
    vs = []
    for j in range(g):
        w = c.load(rowty, row, o, V32I8, 2 + 34 * j)
        a = c.load(qaty, qa, oa, V32I8, 32 * j)
        vs.append(c.madd(c.maddss(a, w), ones))
    return _lane_vector(c, vs)


def _q8_0_sum_codegen(context, builder, sig, args):
    v = _q8_0_vector(*_block_args(context, builder, sig, args), 1)
    return builder.extract_element(v, ir.Constant(I32, 0))


def _q8_0_acc4_codegen(context, builder, sig, args):
    rowty, _, qaty, _, daty, _, _ = sig.args
    row, o, qa, oa, da, od, acc = _offsets(context, builder, sig, args)
    c = _Ctx(context, builder, AVX2)
    b, v4f = builder, ir.VectorType(ir.FloatType(), 4)
    s = b.sitofp(_q8_0_vector(c, rowty, row, o, qaty, qa, oa, 4), v4f)
    dw = ir.Constant(ir.VectorType(ir.HalfType(), 4), ir.Undefined)
    for j in range(4):  # the four f16 scales, converted together (vcvtph2ps with F16C)
        dw = b.insert_element(dw, c.load(rowty, row, o, ir.HalfType(), 34 * j), ir.Constant(I32, j))
    t = b.fmul(b.fmul(b.fpext(dw, v4f), c.load(daty, da, od, v4f)), s)
    for j in range(4):
        acc = b.fadd(acc, b.extract_element(t, ir.Constant(I32, j)))
    return acc


@intrinsic
def q8_0_sum1(typingctx, row, o, qa, oa):
    """int32 sum of the Q8_0 block at row[o:] (34 bytes) . Q8_0 codes qa[oa:oa+32]."""
    if _typed((row, types.uint8), (qa, types.int8)):
        return types.int32(row, o, qa, oa), _q8_0_sum_codegen


@intrinsic
def q8_0_acc4(typingctx, row, o, qa, oa, da, od, acc):
    """acc + t0 + t1 + t2 + t3 (in that order) for the four Q8_0 blocks j at row[o:]:
    t_j = d_j * da[od + j] * s_j, d_j the block's f16 scale, s_j its codes . qa[oa + 32 j:]
    (float steps of qdot.dot_q8_0 one block at a time; da float32, flat offset od)."""
    if _typed((row, types.uint8), (qa, types.int8), (da, types.float32)):
        return types.float32(row, o, qa, oa, da, od, acc), _q8_0_acc4_codegen


def _f16_codegen(context, builder, sig, args):
    c = _Ctx(context, builder, AVX2)
    row, o = _offsets(context, builder, sig, args)
    return builder.fpext(c.load(sig.args[0], row, o, ir.HalfType()), ir.FloatType())


@intrinsic
def f16_hw(typingctx, row, o):
    """The little-endian float16 at row[o:o+2] as float32 (one F16C or AArch64 fcvt
    instruction; only used when F16C is set, see qdot)."""
    if _typed((row, types.uint8)):
        return types.float32(row, o), _f16_codegen


def _u16_codegen(context, builder, sig, args):
    row, o = _offsets(context, builder, sig, args)
    return _Ctx(context, builder, AVX2).load(sig.args[0], row, o, I16)


@intrinsic
def u16_at(typingctx, row, o):
    """The little-endian uint16 at byte o of the uint8 array `row`."""
    if _typed((row, types.uint8)):
        return types.uint16(row, o), _u16_codegen


# ---------------------------------------------------------------- token tiles
# The same sums for several tokens against one block, with the float step of qdot's row
# kernels: the block is unpacked once (codes, scales; kept in registers), then a loop in
# the IR takes each token k = toks[i0 + i], i < n: its codes qa[k, 256 b:], its sums
# bs[k, 8 b:], its scale da[k, b], and adds the block's term to out[i0 + i, r] with the
# float operations, in the order, of qdot.dot_q4_k / dot_q6_k / dot_q8_0 (no fast-math
# flags: LLVM keeps them as written). So a row's outputs, accumulated block by block from
# 0.0, carry the one-token kernels' bits. (q8_0_tile: b counts groups of len(dws) blocks.)


def _dims(c, aryty, ary):
    """The shape of an array argument as i64 values."""
    return cgutils.unpack_tuple(c.b, c.context.make_array(aryty)(c.context, c.b, ary).shape)


def _at(c, aryty, ary, off):
    """Pointer to element `off` (flat, C order) of an array argument."""
    return c.b.gep(c.context.make_array(aryty)(c.context, c.b, ary).data, [off])


class _Tile:
    """Per-token addressing of a tile intrinsic: the token's row k, the row offsets of its
    codes and sums, and the float term added to out[i0 + i, r]."""

    def __init__(self, c, sig, args, names):
        self.c, self.ty, self.v = c, dict(zip(names, sig.args)), dict(zip(names, args))

    def loop(self, body):
        c, v = self.c, self.v
        with cgutils.for_range(c.b, v["n"]) as loop:
            i = loop.index
            k = c.load(self.ty["toks"], v["toks"], c.b.add(v["i0"], i), I64)
            body(i, k)

    def row_off(self, name, k, per_block):
        """Element offset of token k's block b in array `name` (C-contiguous 2-D)."""
        c = self.c
        width = _dims(c, self.ty[name], self.v[name])[1]
        return c.b.add(c.b.mul(k, width), c.b.mul(self.v["b"], ir.Constant(I64, per_block)))

    def scale(self, k):
        c = self.c
        return c.b.load(_at(c, self.ty["da"], self.v["da"], self.row_off("da", k, 1)))

    def out_at(self, i):
        """Pointer to out[i0 + i, r]."""
        c, v = self.c, self.v
        width = _dims(c, self.ty["out"], v["out"])[1]
        return _at(
            c, self.ty["out"], v["out"], c.b.add(c.b.mul(c.b.add(v["i0"], i), width), v["r"])
        )

    def add_out(self, i, term):
        p = self.out_at(i)
        self.c.b.store(self.c.b.fadd(self.c.b.load(p), term), p)


def _f32(c, v):
    return c.b.sitofp(v, ir.FloatType())


def _tree_sum(b, vs):
    """Sum of the vectors vs as a balanced tree (short dependency chains; integers: exact)."""
    while len(vs) > 1:
        vs = [b.add(vs[i], vs[i + 1]) if i + 1 < len(vs) else vs[i] for i in range(0, len(vs), 2)]
    return vs[0]


def _q4k_tile_codegen(context, builder, sig, args):
    names = ("row", "o", "dw", "mw", "qa", "bs", "da", "toks", "i0", "n", "b", "out", "r")
    t = _Tile(_Ctx(context, builder, AVX2), sig, _offsets(context, builder, sig, args), names)
    c, b, v = t.c, builder, t.v
    sc, mn = _q4k_scales(c, t.ty["row"], v["row"], v["o"])
    mn32 = b.sext(mn, V8I32)
    lanes = []  # per 64 values: low / high nibble codes and their sub-blocks' scales
    for k in range(4):
        w = c.load(t.ty["row"], v["row"], v["o"], V32I8, 16 + 32 * k)
        lo, hi = b.and_(w, c.const8(15)), b.lshr(w, c.const8(4))
        lanes.append((lo, hi, c.splat(sc, [2 * k] * 16), c.splat(sc, [2 * k + 1] * 16)))

    def token(i, k):
        oa = t.row_off("qa", k, 256)
        parts = []
        for j, (lo, hi, sl, sh) in enumerate(lanes):
            al = c.load(t.ty["qa"], v["qa"], oa, V32I8, 64 * j)
            ah = c.load(t.ty["qa"], v["qa"], oa, V32I8, 64 * j + 32)
            parts += [c.madd(c.maddubs(lo, al), sl), c.madd(c.maddubs(hi, ah), sh)]
        acc = _tree_sum(b, parts)
        bsv = c.load(t.ty["bs"], v["bs"], t.row_off("bs", k, 8), V8I32)
        isum, msum = c.reduce(acc), c.reduce(b.mul(mn32, bsv))
        d = t.scale(k)  # dw * d * isum - mw * d * msum, as dot_q4_k
        term = b.fsub(
            b.fmul(b.fmul(v["dw"], d), _f32(c, isum)), b.fmul(b.fmul(v["mw"], d), _f32(c, msum))
        )
        t.add_out(i, term)

    t.loop(token)
    return context.get_dummy_value()


def _tile_typed(row, qa, da, toks, out, *more):
    return _typed(
        (row, types.uint8),
        (qa, types.int8),
        (da, types.float32),
        (toks, types.int64),
        (out, types.float32),
        *more,
    ) and all(a.ndim == 2 for a in (qa, da, out))


@intrinsic
def q4k_tile(typingctx, row, o, dw, mw, qa, bs, da, toks, i0, n, b, out, r):
    """out[i0 + i, r] += dw * d * isum - mw * d * msum for i < n: the Q4_K super-block at
    row[o:] (d = dw, dmin = mw as float32) against token k = toks[i0 + i]'s block b,
    d = da[k, b] and (isum, msum) = q4k_sums(row, o, qa[k], 256 b, bs[k], 8 b)."""
    floats = dw == types.float32 and mw == types.float32
    if floats and _tile_typed(row, qa, da, toks, out, (bs, types.int32)) and bs.ndim == 2:
        return types.void(row, o, dw, mw, qa, bs, da, toks, i0, n, b, out, r), _q4k_tile_codegen


def _q6k_tile_codegen(context, builder, sig, args):
    names = ("row", "o", "dw", "qa", "da", "toks", "i0", "n", "b", "out", "r")
    t = _Tile(_Ctx(context, builder, AVX2), sig, _offsets(context, builder, sig, args), names)
    c, b, v = t.c, builder, t.v
    lanes = _q6k_lanes(c, t.ty["row"], v["row"], v["o"])  # per 32 values: codes, scales

    def token(i, k):
        oa = t.row_off("qa", k, 256)
        parts = []
        for j, (q, s16) in enumerate(lanes):
            a = c.load(t.ty["qa"], v["qa"], oa, V32I8, 32 * j)
            p = b.sub(c.maddubs(q, a), c.maddubs(c.const8(32), a))  # (q - 32) * a pairs
            parts.append(c.madd(p, s16))
        acc = _tree_sum(b, parts)
        t.add_out(i, b.fmul(b.fmul(v["dw"], t.scale(k)), _f32(c, c.reduce(acc))))

    t.loop(token)
    return context.get_dummy_value()


@intrinsic
def q6k_tile(typingctx, row, o, dw, qa, da, toks, i0, n, b, out, r):
    """out[i0 + i, r] += dw * da[k, b] * isum for i < n: the Q6_K super-block at row[o:]
    (d = dw as float32) against token k = toks[i0 + i]'s block b, isum = q6k_sum(row, o,
    qa[k], 256 b)."""
    if _tile_typed(row, qa, da, toks, out) and dw == types.float32:
        return types.void(row, o, dw, qa, da, toks, i0, n, b, out, r), _q6k_tile_codegen


def _halve(c, a, z):
    """The pair sums of a's lanes then z's (a, z <n x i32>), or of a's alone when z is a."""
    n = a.type.count if a is not z else a.type.count // 2
    ev = ir.Constant(ir.VectorType(I32, n), [2 * i for i in range(n)])
    od = ir.Constant(ir.VectorType(I32, n), [2 * i + 1 for i in range(n)])
    return c.b.add(c.b.shuffle_vector(a, z, ev), c.b.shuffle_vector(a, z, od))


def _lane_vector(c, vs):
    """<g x i32> whose lane i is the sum of the lanes of vs[i], for g = 1, 2, 4 or 8
    vectors <8 x i32>: lane pairs added across the vectors, then within the one left
    (shuffles and adds, exact)."""
    g = len(vs)
    while len(vs) > 1:
        vs = [_halve(c, vs[i], vs[i + 1]) for i in range(0, len(vs), 2)]
    v = vs[0]  # 8 / g lanes per input vector, in order
    while v.type.count > g:
        v = _halve(c, v, v)
    return v


def _lane_sums(c, vs):
    """[sum of the lanes of v for v in vs] (_lane_vector's lanes as scalars)."""
    v = _lane_vector(c, vs)
    return [c.b.extract_element(v, ir.Constant(I32, i)) for i in range(len(vs))]


def _q8_0_tile_codegen(context, builder, sig, args):
    names = ("row", "o", "dws", "qa", "da", "toks", "i0", "n", "b", "out", "r")
    t = _Tile(_Ctx(context, builder, AVX2), sig, _offsets(context, builder, sig, args), names)
    c, b, v = t.c, builder, t.v
    g = sig.args[2].count  # blocks per call
    lo, hi = (ir.Constant(ir.VectorType(I32, 16), list(r)) for r in (range(16), range(16, 32)))
    half = lambda x, m: b.sext(b.shuffle_vector(x, x, m), V16I16)  # noqa: E731
    ws = []  # per block: its 32 codes widened to int16, in two halves
    for j in range(g):
        w = c.load(t.ty["row"], v["row"], v["o"], V32I8, 2 + 34 * j)
        ws.append((half(w, lo), half(w, hi)))
    dws = [b.extract_value(v["dws"], j) for j in range(g)]

    def token(i, k):
        oa = t.row_off("qa", k, 32 * g)
        parts = []
        for j, (wl, wh) in enumerate(ws):
            a = c.load(t.ty["qa"], v["qa"], oa, V32I8, 32 * j)
            parts.append(b.add(c.madd(wl, half(a, lo)), c.madd(wh, half(a, hi))))
        sums = _lane_sums(c, parts)
        da = t.ty["da"]
        od = t.row_off("da", k, g)
        p = t.out_at(i)
        acc = b.load(p)
        for j in range(g):  # sumf += d_w * d_a * s per block, as dot_q8_0
            d = b.load(_at(c, da, v["da"], b.add(od, ir.Constant(I64, j))))
            acc = b.fadd(acc, b.fmul(b.fmul(dws[j], d), _f32(c, sums[j])))
        b.store(acc, p)

    t.loop(token)
    return context.get_dummy_value()


@intrinsic
def q8_0_tile(typingctx, row, o, dws, qa, da, toks, i0, n, b, out, r):
    """out[i0 + i, r] += sum over the g = len(dws) Q8_0 blocks at row[o:] (34 bytes each,
    scales dws as float32) of dws[j] * da[k, g b + j] * (codes . qa[k, 32 (g b + j):][:32]),
    block by block, for token k = toks[i0 + i], i < n (dot_q8_0's float steps)."""
    ok = isinstance(dws, types.UniTuple) and dws.dtype == types.float32 and dws.count in (1, 4)
    if ok and _tile_typed(row, qa, da, toks, out):
        return types.void(row, o, dws, qa, da, toks, i0, n, b, out, r), _q8_0_tile_codegen
