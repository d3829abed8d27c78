"""Integer block sums written as LLVM vector code (Numba intrinsics) for qdot's row kernels.

Numba's loop vectorizer does not find the instruction sequence these sums want: 8-bit
weight codes times 8-bit activation codes, summed in pairs to int16 and then, times a
per-sub-block scale, in pairs to int32 (x86: vpmaddubsw then vpmaddwd, which LLVM turns
into vpdpwssd where AVX-VNNI exists). So each function below builds that sequence as LLVM
IR on 32-byte vectors, one quantized block per call, and returns exact int32 sums
(Q8_0, plain int8 x int8, vectorizes well enough as a Numba loop: qdot.dot_q8_0):

    q4k_sums(row, o, qa, oa, bs, ob) -> (isum, msum)   Q4_K super-block at row[o:]
        isum = sum_j sc_j * sum_l q_jl * qa[oa + 32j + l],  msum = sum_j m_j * bs[ob + j]
    q6k_sum(row, o, qa, oa) -> isum                    Q6_K super-block at row[o:]
        isum = sum_i sc_i * sum_l (q_il - 32) * qa[oa + 16i + l]
    q4k_tile, q6k_tile, q8_0_tile                      one block against several tokens
        (the block unpacked once; qdot's float steps per token; see "token tiles")
    f16_hw(row, o) -> float32                          the float16 at byte o (F16C, fcvt)
    u16_at(row, o) -> uint16                           the uint16 at byte o

Offsets count elements from the start of C-contiguous arrays of any number of dimensions
(row o of a 2-D array is at o * shape[1]), so callers never slice inside their loops.

Integer sums are exact, so the float steps around them (in qdot) decide the result bits,
and they do not depend on which instructions computed the integers. On x86 with AVX2 the
code calls the vpmaddubsw/vpmaddwd intrinsics; elsewhere it emits the same
arithmetic as plain vector IR (widen, multiply, add even and odd lanes) that LLVM lowers
for any target. No value can saturate the int16 pairs: |4-bit or 6-bit code x int8| pairs
stay below 2 * 63 * 128.

NumPy references: `reference.q4k_sums_ref`, `q6k_sum_ref`.
"""

import llvmlite.binding as llb
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


def _q4k_codegen(context, builder, sig, args):
    rowty, _, qaty, _, bsty, _ = sig.args
    row, o, qa, oa, bs, ob = _offsets(context, builder, sig, args)
    c = _Ctx(context, builder, AVX2)
    b = c.b
    sc, mn = _q4k_scales(c, rowty, row, o)
    acc = None
    for k in range(4):  # 64 values: 32 bytes, low nibbles = sub-block 2k, high = 2k+1
        w = c.load(rowty, row, o, V32I8, 16 + 32 * k)
        lo, hi = b.and_(w, c.const8(15)), b.lshr(w, c.const8(4))
        al, ah = c.load(qaty, qa, oa, V32I8, 64 * k), c.load(qaty, qa, oa, V32I8, 64 * k + 32)
        s = b.add(
            c.madd(c.maddubs(lo, al), c.splat(sc, [2 * k] * 16)),
            c.madd(c.maddubs(hi, ah), c.splat(sc, [2 * k + 1] * 16)),
        )
        acc = s if acc is None else b.add(acc, s)
    msum = c.reduce(b.mul(b.sext(mn, V8I32), c.load(bsty, bs, ob, V8I32)))
    return context.make_tuple(builder, sig.return_type, [c.reduce(acc), msum])


@intrinsic
def q4k_sums(typingctx, row, o, qa, oa, bs, ob):
    """(isum, msum) int32 of the Q4_K super-block at row[o:] (144 bytes) against the Q8_K
    codes qa[oa:oa+256] and their per-32 sums bs[ob:ob+8]."""
    if _typed((row, types.uint8), (qa, types.int8), (bs, types.int32)):
        return types.UniTuple(types.int32, 2)(row, o, qa, oa, bs, ob), _q4k_codegen


def _q6k_codegen(context, builder, sig, args):
    rowty, _, qaty, _ = sig.args
    row, o, qa, oa = _offsets(context, builder, sig, args)
    c = _Ctx(context, builder, AVX2)
    b = c.b
    sc = b.sext(c.load(rowty, row, o, V16I8, 192), V16I16)  # (16,) int8 scales
    m15, m3 = c.const8(15), c.const8(3)
    acc = None
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
            a = c.load(qaty, qa, oa, V32I8, 128 * h + 32 * k)
            p = b.sub(c.maddubs(q, a), c.maddubs(c.const8(32), a))  # (q - 32) * a pairs
            s = c.madd(p, c.splat(sc, [8 * h + 2 * k] * 8 + [8 * h + 2 * k + 1] * 8))
            acc = s if acc is None else b.add(acc, s)
    return c.reduce(acc)


@intrinsic
def q6k_sum(typingctx, row, o, qa, oa):
    """isum int32 of the Q6_K super-block at row[o:] (210 bytes) . Q8_K codes qa[oa:oa+256]."""
    if _typed((row, types.uint8), (qa, types.int8)):
        return types.int32(row, o, qa, oa), _q6k_codegen


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
    rowty, row, o = t.ty["row"], v["row"], v["o"]
    sc = b.sext(c.load(rowty, row, o, V16I8, 192), V16I16)  # (16,) int8 scales
    m15, m3 = c.const8(15), c.const8(3)
    lanes = []  # per 32 values: 6-bit codes and their two sub-blocks' scales
    for h in range(2):
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


def _lane_sums(c, vs):
    """[sum of the lanes of v for v in vs] for 1, 2, 4 or 8 vectors <8 x i32>: lane pairs
    added across the vectors, then within the one left (shuffles and adds, exact)."""
    g = len(vs)
    while len(vs) > 1:
        vs = [_halve(c, vs[i], vs[i + 1]) for i in range(0, len(vs), 2)]
    v = vs[0]  # 8 / g lanes per input vector, in order
    while v.type.count > g:
        v = _halve(c, v, v)
    return [c.b.extract_element(v, ir.Constant(I32, i)) for i in range(g)]


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
