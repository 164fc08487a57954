"""docs/spec.md transcribed line by line, with no speed tricks: the kernels of the
contract on ``[tokens, head_dim]`` NumPy arrays, written from the spec alone.

The independent check on the reference: where backends/numpy/kernels.py uses bit
manipulation or skips a step by proof, this file does the written operation
(ml_dtypes' cast, np.rint, np.clip, an explicit flush at every step). The tests use
it as their oracle, the conformance report as the judge of a disagreement with the
reference, and examples/kvquant-example-backend installs it as a third-party backend.
"""
import ml_dtypes
import numpy as np

F32 = np.float32
OUT = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def c(bits):
    return np.array(bits, np.uint32).view(F32)[()]


R448, R127, R15 = c(0x3B124925), c(0x3C010204), c(0x3D888889)
S_MIN, TINY, NAN = c(0x0D800000), c(0x00800000), c(0x7FC00000)
PRODUCT_TINY = c(0x01000000)  # 2^-125: stored and returned products flush below it
NAN_OUT = {"float32": (np.uint32, 0x7FC00000), "float16": (np.uint16, 0x7E00), "bfloat16": (np.uint16, 0x7FC0)}


def flush(v, below=TINY):
    v = np.asarray(v, F32)
    return np.where(np.abs(v) < below, np.copysign(F32(0), v), v).astype(F32)


def flush_product(v):
    return flush(v, PRODUCT_TINY)


def _read(x):
    return flush(np.asarray(x).astype(F32))  # every subnormal read counts as zero


def _row_max_abs(t):
    with np.errstate(invalid="ignore"):
        return np.max(np.abs(t), axis=-1) if t.shape[-1] else np.zeros(t.shape[:-1], F32)


def _sym_scale(amax, r):
    amax = flush(amax)
    poisoned = ~np.isfinite(amax)
    with np.errstate(invalid="ignore"):
        scale = np.where(amax == 0, F32(1), np.maximum(flush(amax * r), S_MIN)).astype(F32)
    return np.where(poisoned, NAN, scale).astype(F32), poisoned


def _out(v, out_dtype):
    """Round once to out_dtype; every NaN is the canonical one."""
    with np.errstate(over="ignore"):
        out = v.astype(OUT[out_dtype])
    carrier, bits = NAN_OUT[out_dtype]
    nan = np.array(bits, carrier).view(OUT[out_dtype])
    return np.where(np.isnan(v), nan, out)


def _fp8(t, scale, poisoned):
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = flush(F32(1) / scale)
        y = np.clip(flush(t * inv), F32(-448), F32(448))
        code = y.astype(ml_dtypes.float8_e4m3fn)
    zero = np.zeros((), ml_dtypes.float8_e4m3fn)
    return np.where(poisoned, zero, code)


def fp8_quantize_per_token(x):
    t = _read(x)
    scale, poisoned = _sym_scale(_row_max_abs(t), R448)
    return _fp8(t, scale[:, None], poisoned[:, None]), scale


def fp8_quantize_per_tensor(x, static_scale):
    t = _read(x)
    if static_scale is None:
        amax = np.max(_row_max_abs(t)) if t.shape[0] else F32(0)
        scale, poisoned = _sym_scale(np.array(amax, F32), R448)
    else:
        poisoned = np.array(not np.isfinite(t).all())
        scale = np.where(poisoned, NAN, F32(static_scale)).astype(F32)
    return _fp8(t, F32(1) if poisoned else scale, poisoned), np.asarray(scale, F32)


def fp8_dequantize(codes, scales, out_dtype):
    s = flush(scales)
    with np.errstate(invalid="ignore", over="ignore"):
        v = flush_product(codes.astype(F32) * s)
    return _out(v, out_dtype)


def int8_quantize(x):
    t = _read(x)
    scale, poisoned = _sym_scale(_row_max_abs(t), R127)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = F32(1) / scale
        q = np.clip(np.rint(flush(t * inv[:, None])), -127, 127)
    return np.where(poisoned[:, None], 0, q).astype(np.int8), scale


def int8_dequantize(codes, scales, out_dtype):
    s = flush(scales)
    with np.errstate(invalid="ignore"):
        v = flush(codes.astype(F32) * s)
    return _out(v, out_dtype)


def int4_quantize(x, g):
    t = _read(x)
    n, d = t.shape
    ng = -(-d // g)
    q = np.zeros((n, d), np.uint8)
    scales = np.zeros((n, ng), F32)
    zeros = np.zeros((n, ng), F32)
    for j in range(ng):
        blk = t[:, j * g:(j + 1) * g]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            mn = flush(np.min(blk, axis=-1))
            mn = np.where(mn == 0, F32(0), mn)  # +0, whatever sign the reduction gave
            mx = flush(np.max(blk, axis=-1))
            rng = flush(mx - mn)
            bad = ~np.isfinite(rng)
            scale = np.where(rng == 0, F32(1), np.maximum(flush(rng * R15), S_MIN)).astype(F32)
            inv = F32(1) / scale
            zero = -flush_product(mn * inv)
            qq = np.clip(np.rint(flush(flush(blk - mn[:, None]) * inv[:, None])), 0, 15)
        q[:, j * g:(j + 1) * g] = np.where(bad[:, None], 0, qq)
        scales[:, j] = np.where(bad, NAN, scale)
        zeros[:, j] = np.where(bad, NAN, zero)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    return packed, scales, zeros


def int4_dequantize(packed, scales, zeros, g, out_dtype):
    n, half = packed.shape
    d = half * 2
    q = np.empty((n, d), F32)
    q[:, 0::2] = packed & 0xF
    q[:, 1::2] = packed >> 4
    s, z = flush(scales), flush(zeros)
    idx = np.arange(d) // g
    with np.errstate(invalid="ignore", over="ignore"):
        v = flush_product(flush(q - z[:, idx]) * s[:, idx])
    return _out(v, out_dtype)


# ------------------------------------------------------ spec v1.1 (section 12)
R3 = c(0x3EAAAAAB)


def _asymmetric(blk, r, levels, axis):
    """Section 12's rules for groups lying along ``axis`` of blk: (q, scale, zero)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mn = flush(np.min(blk, axis=axis, keepdims=True))
        mn = np.where(mn == 0, F32(0), mn)
        mx = flush(np.max(blk, axis=axis, keepdims=True))
        rng = flush(mx - mn)
        bad = ~np.isfinite(rng)
        scale = np.where(rng == 0, F32(1), np.maximum(flush(rng * r), S_MIN)).astype(F32)
        inv = flush(F32(1) / scale)  # subnormal for 2-bit scales above 2^126: counts as zero
        zero = -flush_product(mn * inv)
        q = np.clip(np.rint(flush(flush(blk - mn) * inv)), 0, levels)
    q = np.where(bad, 0, q).astype(np.uint8)
    return q, np.where(bad, NAN, scale).astype(F32), np.where(bad, NAN, zero).astype(F32)


def _pack(q, per):
    bits = 8 // per
    out = np.zeros(q.shape[:-1] + (q.shape[-1] // per,), np.uint8)
    for k in range(per):
        out |= (q[..., k::per] << (bits * k)).astype(np.uint8)
    return out


def _unpack(packed, per):
    bits = 8 // per
    q = np.empty(packed.shape[:-1] + (packed.shape[-1] * per,), F32)
    for k in range(per):
        q[..., k::per] = (packed >> (bits * k)) & ((1 << bits) - 1)
    return q


def int2_quantize(x, g):
    t = _read(x)
    n, d = t.shape
    ng = -(-d // g)
    q = np.zeros((n, d), np.uint8)
    scales = np.zeros((n, ng), F32)
    zeros = np.zeros((n, ng), F32)
    for j in range(ng):
        qq, s, z = _asymmetric(t[:, j * g:(j + 1) * g], R3, 3, axis=1)
        q[:, j * g:(j + 1) * g] = qq
        scales[:, j], zeros[:, j] = s[:, 0], z[:, 0]
    return _pack(q, 4), scales, zeros


def int2_dequantize(packed, scales, zeros, g, out_dtype):
    q = _unpack(packed, 4)
    s, z = flush(scales), flush(zeros)
    idx = np.arange(q.shape[1]) // g
    with np.errstate(invalid="ignore", over="ignore"):
        v = flush_product(flush(q - z[:, idx]) * s[:, idx])
    return _out(v, out_dtype)


def _channel_quantize(x, g, r, levels, per):
    t = _read(x)  # [tokens, head_dim], tokens a multiple of g
    n, d = t.shape
    q = np.zeros((n, d), np.uint8)
    scales = np.zeros((n // g, d), F32)
    zeros = np.zeros((n // g, d), F32)
    for b in range(n // g):
        qq, s, z = _asymmetric(t[b * g:(b + 1) * g], r, levels, axis=0)
        q[b * g:(b + 1) * g] = qq
        scales[b], zeros[b] = s[0], z[0]
    return _pack(q, per), scales, zeros


def _channel_dequantize(packed, scales, zeros, g, out_dtype, per):
    q = _unpack(packed, per)
    s, z = flush(scales), flush(zeros)
    block = np.arange(q.shape[0]) // g
    with np.errstate(invalid="ignore", over="ignore"):
        v = flush_product(flush(q - z[block]) * s[block])
    return _out(v, out_dtype)


def int4_channel_quantize(x, g):
    return _channel_quantize(x, g, R15, 15, 2)


def int4_channel_dequantize(packed, scales, zeros, g, out_dtype):
    return _channel_dequantize(packed, scales, zeros, g, out_dtype, 2)


def int2_channel_quantize(x, g):
    return _channel_quantize(x, g, R3, 3, 4)


def int2_channel_dequantize(packed, scales, zeros, g, out_dtype):
    return _channel_dequantize(packed, scales, zeros, g, out_dtype, 4)
