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
    For the asymmetric formats written once here (spec v1.1's INT2 and per-channel
    formats): amin(v, axis), amax(v, axis) (NaN-propagating where the framework's
    reductions are), poisoned_max(blocks, reduced, axis): ``reduced`` (a maximum over
    ``axis``) made non-finite wherever that slice holds NaN or inf, for reductions that
    drop NaN; codes(y, levels): round-half-even of y in [-tiny, levels * 1.000001] as
    uint8, or in any dtype the namespace's pack_codes takes (y is a fresh array the
    namespace may overwrite); zero_poisoned(y, poisoned): y made
    +0.0 where ``poisoned`` (broadcast) holds; flush_products(v, scales, zeros):
    flush_product(v) for values dequantized with these canonical scales and zeros,
    which may skip the element-wise pass after a look at the parameters (docs/spec.md,
    section 8, item 7; the reference does); stack(list, axis), as_float32(v) and
    canonical(p), the spec's reading of caller scales and zeros (flushed, NaN
    canonical); pack_codes(q, codes_per_byte): pack_codes() below, or another way to
    the same bytes, pack_group_codes(q, codes_per_byte) the same for one block of
    groups [..., groups, G] inside the loop computing them (a compiler may fuse it
    differently), and unpack_codes(packed, codes_per_byte) likewise;
    ZERO_POISONED_BYTES: whether quantize_token_groups zeroes a poisoned group's packed
    bytes (True) or its scaled values before rounding (False): the same bits, and each
    compiler vectorises one of the two selects only (zero_poisoned then keeps y's dtype);
    scaled_offsets(x, mn, inv): (x - mn) * inv as a fresh array (x is the caller's);
    dequantized(b, z, s): (b - z) * s, which may overwrite b (fresh float32 codes);
    materialized(*params): the same arrays (one shape; bool flags stay bool, a tuple
    even for one), computed once before the element loop that reads them, which
    compilers otherwise fuse into it and redo per element (speed only: no bits change).

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
    """INT4 (and every asymmetric format, with its own R(L)) per group, from the group's min and max: mn = flush(min) made +0.0 when
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


# ----------------------------------------- asymmetric formats of spec v1.1
def pack_codes(m, q, codes_per_byte: int):
    """uint8 codes [..., n * k] (each below 2^(8/k)) to bytes [..., n]: element k*j + i
    in bits (8/k)*i and up. ORs of shifted codes, which are exact integer operations."""
    bits = 8 // codes_per_byte
    lead, width = tuple(q.shape[:-1]), q.shape[-1]
    parts = q.reshape(lead + (width // codes_per_byte, codes_per_byte))
    out = parts[..., 0]
    for i in range(1, codes_per_byte):
        out = out | (parts[..., i] << (bits * i))
    return out


def code_planes(packed, codes_per_byte: int):
    """The codes of packed bytes [..., n] as k planes [..., n]: plane i holds element
    k*j + i of each byte j (bits (8/k)*i and up)."""
    bits = 8 // codes_per_byte
    mask = (1 << bits) - 1
    return [(packed >> (bits * i)) & mask for i in range(codes_per_byte)]


def unpack_codes(m, packed, codes_per_byte: int):
    """The inverse of pack_codes: bytes [..., n] to uint8 codes [..., n * k]."""
    lead, width = tuple(packed.shape[:-1]), packed.shape[-1]
    return m.stack(code_planes(packed, codes_per_byte), -1).reshape(lead + (width * codes_per_byte,))


def _codes_of_groups(m, x, mn, inv, poisoned, levels):
    """q = clamp(round_half_even((x - mn) * inv), 0, L), 0 for a poisoned group. No
    product feeds an add (the subtraction comes first), so no FMA can form."""
    return m.codes(m.zero_poisoned(m.scaled_offsets(x, mn, inv), poisoned), levels)


def _packed_codes_of_group(m, x, mn, inv, poisoned, levels, codes_per_byte):
    """One block of groups' codes, packed; a poisoned group's bytes 0 (its codes all 0)."""
    if m.ZERO_POISONED_BYTES:
        return m.zero_poisoned(m.pack_group_codes(m.codes(m.scaled_offsets(x, mn, inv), levels), codes_per_byte), poisoned)
    return m.pack_group_codes(_codes_of_groups(m, x, mn, inv, poisoned, levels), codes_per_byte)


def quantize_token_groups(m, xf, group_size: int, reciprocal, levels: int, codes_per_byte: int):
    """Groups of G elements inside each token (INT4, INT2): float32 [..., head_dim]
    to (packed codes [..., head_dim / k], scales, zeros [..., groups])."""
    parts = split_groups(xf, group_size)
    mn = m.concat([m.amin(p, -1) for p in parts], axis=-1)
    mx = m.concat([m.poisoned_max(p, m.amax(p, -1), -1) for p in parts], axis=-1)
    scale, inv, zero, mn, poisoned = int4_params(m, mn, mx, reciprocal)
    mn, inv, poisoned = m.materialized(mn, inv, poisoned)
    # Packed inside each group (G and head_dim are multiples of the codes per byte): the
    # same bytes, and Inductor vectorises the loop, where packing the joined row read
    # each code's group parameters per element (docs/performance.md).
    packed = apply_groups(m, xf, (mn, inv, poisoned), group_size,
                          lambda b, mn_b, inv_b, bad_b: _packed_codes_of_group(m, b, mn_b, inv_b, bad_b, levels, codes_per_byte))
    return packed, scale, zero


def quantize_channel_blocks(m, xf, group_size: int, reciprocal, levels: int, codes_per_byte: int):
    """Per channel (spec v1.1): float32 [..., tokens, head_dim], tokens a multiple of G,
    to (packed codes [..., tokens, head_dim / k], scales, zeros [..., tokens / G, head_dim]).
    A reshape of the token axis into blocks: a sharded leading axis stays sharded."""
    lead, (tokens, width) = tuple(xf.shape[:-2]), tuple(xf.shape[-2:])
    blocks = xf.reshape(lead + (tokens // group_size, group_size, width))
    mn = m.amin(blocks, -2)
    mx = m.poisoned_max(blocks, m.amax(blocks, -2), -2)
    scale, inv, zero, mn, poisoned = int4_params(m, mn, mx, reciprocal)
    mn, inv, poisoned = m.materialized(mn, inv, poisoned)
    q = _codes_of_groups(m, blocks, mn[..., None, :], inv[..., None, :], poisoned[..., None, :], levels)
    return m.pack_codes(q.reshape(lead + (tokens, width)), codes_per_byte), scale, zero


def dequantize_token_groups(m, packed, scales, zeros, group_size: int, codes_per_byte: int, params_checked: bool = False):
    """float32 flush_product((q - zero) * scale) per group inside a token; NaN where a
    scale or zero is (the backend writes its canonical bits when rounding the output).

    params_checked: every scale and zero is known finite and no group at risk of a value
    below 2^-125 (docs/spec.md, section 8, item 7): then no product is flushed or NaN, and
    of the reading rules only the flush of subnormal zeros can act."""
    q = m.as_float32(m.unpack_codes(packed, codes_per_byte))
    if params_checked:
        zeros, scales = flush(m, m.as_float32(zeros)), m.as_float32(scales)
        return apply_groups(m, q, (zeros, scales), group_size, m.dequantized)
    scales, zeros = m.canonical(scales), m.canonical(zeros)
    return m.flush_products(apply_groups(m, q, (zeros, scales), group_size, m.dequantized), scales, zeros)


def dequantize_channel_blocks(m, packed, scales, zeros, group_size: int, codes_per_byte: int):
    """The same per channel: packed [..., tokens, head_dim / k], params [..., tokens / G, head_dim]."""
    q = m.as_float32(m.unpack_codes(packed, codes_per_byte))
    lead, (tokens, width) = tuple(q.shape[:-2]), tuple(q.shape[-2:])
    blocks = q.reshape(lead + (tokens // group_size, group_size, width))
    scales, zeros = m.canonical(scales), m.canonical(zeros)
    v = m.flush_products((blocks - zeros[..., None, :]) * scales[..., None, :], scales, zeros)
    return v.reshape(lead + (tokens, width))
