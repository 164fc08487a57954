"""docs/spec.md transcribed line by line, with no speed tricks.

An independent check on the reference backend: where backends/numpy_backend.py
uses bit manipulation or skips a step by proof, this file does the written
operation (ml_dtypes' cast, np.rint, np.clip, an explicit flush). Slow; used on
small arrays only.
"""
import ml_dtypes
import numpy as np

F32 = np.float32


def c(bits):
    return np.array(bits, np.uint32).view(F32)[()]


R448, R127, R15 = c(0x3B124925), c(0x3C010204), c(0x3D888889)
S_MIN, TINY, NAN = c(0x0D800000), c(0x00800000), c(0x7FC00000)


def flush(v):
    v = np.asarray(v, F32)
    return np.where(np.abs(v) < TINY, np.copysign(F32(0), v), v).astype(F32)


def _tokens(x):
    x = flush(np.asarray(x).astype(F32))  # every subnormal read counts as zero
    return x.reshape(-1, x.shape[-1])


def _poisoned_max(t):
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(np.max(np.abs(t), axis=-1))


def _sym_scale(amax, r):
    amax = flush(amax)
    scale = np.where(amax == 0, F32(1), np.maximum(flush(amax * r), S_MIN)).astype(F32)
    return scale


def fp8_quantize(x, per_tensor=False, static_scale=None):
    t = _tokens(x)
    if static_scale is not None:
        scale = np.full((1,), F32(static_scale))
        bad = np.array([not np.isfinite(t).all()])
    elif per_tensor:
        with np.errstate(invalid="ignore"):
            amax = np.max(np.abs(t)) if t.size else F32(0)
        bad = np.array([not np.isfinite(amax)])
        scale = _sym_scale(np.array([amax], F32), R448)
    else:
        amax = np.max(np.abs(t), axis=-1) if t.size else np.zeros(t.shape[0], F32)
        bad = _poisoned_max(t) if t.size else np.zeros(t.shape[0], bool)
        scale = _sym_scale(amax, R448)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv = flush(F32(1) / scale)
        y = flush(t * inv[:, None])
        y = np.clip(y, F32(-448), F32(448))
        code = y.astype(ml_dtypes.float8_e4m3fn)
    code = np.where(bad[:, None], np.zeros((), ml_dtypes.float8_e4m3fn), code)
    scale = np.where(bad, NAN, scale).astype(F32)
    if per_tensor or static_scale is not None:
        return code.reshape(np.shape(x)), scale.reshape(())
    return code.reshape(np.shape(x)), scale.reshape(np.shape(x)[:-1])


def fp8_dequantize(code, scale, out_dtype=np.float32):
    v = code.astype(F32)
    s = flush(np.asarray(scale, F32))
    s = s.reshape(s.shape + (1,)) if s.ndim else s
    with np.errstate(invalid="ignore", over="ignore"):
        out = flush(v * s)
    out = np.where(np.isnan(s), NAN, out)
    with np.errstate(over='ignore'):
        return out.astype(out_dtype)


def int8_quantize(x):
    t = _tokens(x)
    amax = np.max(np.abs(t), axis=-1) if t.size else np.zeros(t.shape[0], F32)
    bad = _poisoned_max(t) if t.size else np.zeros(t.shape[0], bool)
    scale = _sym_scale(amax, R127)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = F32(1) / scale
        q = np.clip(np.rint(flush(t * inv[:, None])), -127, 127)
    q = np.where(bad[:, None], 0, q).astype(np.int8)
    return q.reshape(np.shape(x)), np.where(bad, NAN, scale).astype(F32).reshape(np.shape(x)[:-1])


def int8_dequantize(q, scale, out_dtype=np.float32):
    s = flush(np.asarray(scale, F32))[..., None]
    with np.errstate(invalid="ignore"):
        out = flush(q.astype(F32) * s)
    with np.errstate(over='ignore'):
        return np.where(np.isnan(s), NAN, out).astype(out_dtype)


def int4_quantize(x, g):
    t = _tokens(x)
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
            zero = flush(-(flush(mn * inv)))
            qq = np.clip(np.rint(flush(flush(blk - mn[:, None]) * inv[:, None])), 0, 15)
        q[:, j * g:(j + 1) * g] = np.where(bad[:, None], 0, qq)
        scales[:, j] = np.where(bad, NAN, scale)
        zeros[:, j] = np.where(bad, NAN, zero)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)
    lead = np.shape(x)[:-1]
    return packed.reshape(lead + (d // 2,)), scales.reshape(lead + (ng,)), zeros.reshape(lead + (ng,))


def int4_dequantize(packed, scales, zeros, g, out_dtype=np.float32):
    p = packed.reshape(-1, packed.shape[-1])
    n = p.shape[0]
    d = p.shape[1] * 2
    q = np.empty((n, d), F32)
    q[:, 0::2] = p & 0xF
    q[:, 1::2] = p >> 4
    ng = -(-d // g)
    s = flush(np.asarray(scales, F32).reshape(n, ng))
    z = flush(np.asarray(zeros, F32).reshape(n, ng))
    idx = np.arange(d) // g
    with np.errstate(invalid="ignore", over="ignore"):
        out = flush(flush(q - z[:, idx]) * s[:, idx])
    out = np.where(np.isnan(s[:, idx]) | np.isnan(z[:, idx]), NAN, out)
    with np.errstate(over='ignore'):
        return out.astype(out_dtype).reshape(packed.shape[:-1] + (d,))
