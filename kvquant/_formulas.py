"""The spec's formulas (docs/spec.md, sections 3 to 5), written once over an array
namespace ``m`` (array-api-compat's pattern), for the backends whose arrays trace and
compile: PyTorch and JAX. Each backend hands in a small namespace object with the
operations below and the spec's constants; what really differs (casts, NaN
workarounds, compile plumbing) stays in the backend file.

The namespace ``m`` provides:
    where(cond, a, b), isfinite(v), abs(v), copysign(a, b), zeros_like(v),
    maximum(v, scalar), concat(list, axis=-1), nan(ref): the spec's NaN (0x7FC00000)
    as a scalar for where(); reciprocal_rn(s): float32(1 / s) correctly rounded and
    flushed for positive normal s; and the constants ONE, ZERO, S_MIN, MIN_NORMAL,
    PRODUCT_FLUSH as exact float32 values.

Why these bits are safe under any compiler (section 9): every step is one multiply,
subtract, max, min or select; the only division is reciprocal_rn's, per token or
group; no product feeds an add, so there is nothing to contract into an FMA; and each
subnormal the spec flushes is flushed here explicitly, so hardware that flushes and
hardware that does not agree.
"""
from __future__ import annotations


def flush(m, v, below=None):
    """Spec flush(): below 2^-126 (or ``below``) a value becomes a zero of its sign.

    copysign, not v * 0: torch.compile on CUDA folded the product into +0.0 and lost
    the sign (measured on an H100: INT4 zeros of groups whose minimum is zero came out
    +0.0 instead of -0.0)."""
    threshold = m.MIN_NORMAL if below is None else below
    return m.where(m.abs(v) < threshold, m.copysign(m.zeros_like(v), v), v)


def flush_product(m, v):
    """Spec flush_product(): below 2^-125, the lowest normal binade included, where
    IEEE rounding and flush-to-zero hardware round differently (section 8)."""
    return flush(m, v, m.PRODUCT_FLUSH)


def inverse(m, scale, poisoned):
    """1 / scale, or 0 for a poisoned token or group (whose scale is NaN)."""
    return m.where(poisoned, m.ZERO, m.reciprocal_rn(m.where(poisoned, m.ONE, scale)))


def symmetric_scale(m, amax, reciprocal):
    """FP8 and INT8: scale = ONE if flush(amax) == 0 else max(amax * R(n), S_MIN);
    inv = ONE / scale. A poisoned token (amax not finite) gets the NaN scale, inv = 0.
    Returns (scale, inv, poisoned)."""
    poisoned = ~m.isfinite(amax)
    amax = flush(m, amax)
    scale = m.maximum(amax * reciprocal, m.S_MIN)
    scale = m.where(amax == m.ZERO, m.ONE, scale)
    scale = m.where(poisoned, m.nan(scale), scale)
    return scale, inverse(m, scale, poisoned), poisoned


def int4_params(m, mn, mx, reciprocal):
    """INT4 per group, from the group's min and max: mn = flush(min) made +0.0 when
    zero, mx = flush(max), range = flush(mx - mn), scale = ONE if range == 0 else
    max(range * R(15), S_MIN), inv = ONE / scale, zero = flush_product(-(mn * inv)).
    A poisoned group (range not finite) gets NaN scale and zero, inv = 0 and mn = 0.
    Returns (scale, inv, zero, mn, poisoned)."""
    mn = flush(m, mn)
    mn = m.where(mn == m.ZERO, m.ZERO, mn)  # +0 whatever sign the reduction chose
    mx = flush(m, mx)
    rng = flush(m, mx - mn)
    poisoned = ~m.isfinite(rng)
    scale = m.maximum(rng * reciprocal, m.S_MIN)
    scale = m.where(rng == m.ZERO, m.ONE, scale)
    scale = m.where(poisoned, m.nan(scale), scale)
    inv = inverse(m, scale, poisoned)
    zero = flush_product(m, -(mn * inv))
    zero = m.where(poisoned, m.nan(zero), zero)
    mn = m.where(poisoned, m.ZERO, mn)
    return scale, inv, zero, mn, poisoned


def split_groups(t, group_size: int):
    """[..., head_dim] as [..., groups, size] blocks: the full groups, then the shorter
    last group when head_dim is not a multiple of group_size. Reshapes of slices only,
    so a sharded leading axis stays sharded (JAX) and no gather is needed; torch's
    repeat_interleave here was miscompiled by Inductor (tail elements read uninitialised
    memory)."""
    width = t.shape[-1]
    lead = tuple(t.shape[:-1])
    full = (width // group_size) * group_size
    parts = []
    if full:
        parts.append(t[..., :full].reshape(lead + (full // group_size, group_size)))
    if full < width:
        parts.append(t[..., full:].reshape(lead + (1, width - full)))
    return parts


def apply_groups(m, t, params, group_size: int, fn):
    """fn(block, *per-group params broadcast over the block) over split_groups(t), for
    [..., head_dim] data and [..., groups] params; the [..., groups, n] results joined
    into [..., groups * n]."""
    pieces, start = [], 0
    for block in split_groups(t, group_size):
        groups = block.shape[-2]
        out = fn(block, *[p[..., start:start + groups, None] for p in params])
        pieces.append(out.reshape(tuple(block.shape[:-2]) + (groups * out.shape[-1],)))
        start += groups
    return pieces[0] if len(pieces) == 1 else m.concat(pieces, axis=-1)
