"""Spec v1.1 constants as exact float32 bit patterns (docs/spec.md, section "Constants").

Backends build their float32 constants from these bits, never from Python floats,
so that no framework can round a float64 literal differently or promote it to
float64 under ``jax_enable_x64``.
"""

SPEC_VERSION = "1.1"
# Each version's formats; v1's text, formulas and golden vectors are unchanged by v1.1.
SPEC_VERSIONS = ("1", "1.1")

R448_BITS = 0x3B124925  # float32(1/448), round to nearest even
R127_BITS = 0x3C010204  # float32(1/127)
R15_BITS = 0x3D888889  # float32(1/15)
R3_BITS = 0x3EAAAAAB  # float32(1/3), spec v1.1 (2-bit codes)
S_MIN_BITS = 0x0D800000  # 2^-100, the floor of every dynamic scale
ONE_BITS = 0x3F800000  # 1.0, the scale of an all-zero token or constant group
FP8_MAX_BITS = 0x43E00000  # 448.0, largest finite e4m3fn value
INT8_MAX_BITS = 0x42FE0000  # 127.0
INT4_MAX_BITS = 0x41700000  # 15.0
INT2_MAX_BITS = 0x40400000  # 3.0
MIN_NORMAL_BITS = 0x00800000  # 2^-126: anything smaller in magnitude is flushed to zero
# A product is flushed below 2^-125, the whole lowest normal binade: just under 2^-126,
# IEEE rounding, x86 flush-to-zero and ARM flush-to-zero each give their own answer, and
# above 2^-125 all agree (docs/spec.md, section 8, "the lowest normal binade").
PRODUCT_FLUSH_BITS = 0x01000000  # 2^-125
NAN_BITS = 0x7FC00000  # the one quiet NaN stored as the scale (and zero) of a poisoned token
# Canonical NaN of each dequantization output dtype: what a poisoned token dequantizes to.
NAN_BITS_BY_DTYPE = {"float32": 0x7FC00000, "float16": 0x7E00, "bfloat16": 0x7FC0}

INPUT_DTYPES = ("float32", "float16", "bfloat16")
OUTPUT_DTYPES = INPUT_DTYPES
CODE_DTYPES = {"fp8": "float8_e4m3fn", "int8": "int8", "int4": "uint8", "int2": "uint8"}

# Magic numbers of the integer methods the backends share. Adding them rounds to an
# integer step, ties to even, because the sum's ulp is that step: 1.5*2^23 and 2^23 for
# integers (|y| < 2^22, and 0 <= y < 2^23), 2^14 for the e4m3 subnormal step 2^-9.
ROUND_MAGIC_SIGNED_BITS = 0x4B400000  # 1.5 * 2^23
ROUND_MAGIC_UNSIGNED_BITS = 0x4B000000  # 2^23
E4M3_SUBNORMAL_SHIFTER_BITS = 0x46800000  # 2^14

# Bit patterns of the NumPy reference's integer and splitting methods (backends/numpy/kernels.py
# says why each agrees with the float operation it replaces).
INF_BITS = 0x7F800000  # +inf; every NaN's magnitude bits lie above it
ABS_MASK_BITS = 0x7FFFFFFF  # clears the sign bit
VELTKAMP_SPLITTER_BITS = 0x49800008  # 2^20 + 1: rounds a float32 to 4 significant bits (e4m3)
E4M3_MIN_NORMAL_BITS = 0x3C800000  # 2^-6, the smallest normal e4m3 magnitude
E4M3_SUBNORMAL_STEPS_BITS = 0x44000000  # 512 = 1 / 2^-9, subnormal e4m3 steps per unit
E4M3_DECODE_BIAS_BITS = 0x7B800000  # 2^120: the exponent bias gap 127 - 7 of the e4m3 decoder
# A static scale above 2^126 has a subnormal reciprocal, which spec v1 flushes to zero.
RECIPROCAL_FLUSH_SCALE_BITS = 0x7E800000  # 2^126

# Above this static scale 1/scale is subnormal, so spec v1 flushes the reciprocal to zero;
# below STATIC_SCALE_DAZ_BITS a subnormal input times 1/scale can reach an FP8 code, so
# inputs are flushed first (docs/spec.md, "Static-scale FP8").
STATIC_SCALE_DAZ_BITS = 0x05800000  # 2^-116

# Dequantization needs no product flush where these bounds hold (docs/spec.md, section 8,
# items 7 and 8): an FP8 scale of at least 2^-116 times any nonzero e4m3 magnitude (>= 2^-9)
# is at least 2^-125; an INT4 group with a scale of at least 2^-99, and a zero of 0 or with
# |zero * scale| >= 2^-124, has every nonzero value at least 2^-124. Backends use them to
# skip the element-wise flush after a look at the parameters.
FP8_PLAIN_SCALE_BITS = 0x05800000  # 2^-116
INT4_PLAIN_SCALE_BITS = 0x0E000000  # 2^-99
INT4_PLAIN_ZERO_PRODUCT_BITS = 0x01800000  # 2^-124


def f32_from_bits(bits: int) -> float:
    """The float32 with these bits, as a Python float (exact: float64 holds every float32)."""
    import struct

    return struct.unpack("<f", struct.pack("<I", bits))[0]


def f32_bits(value: float) -> int:
    """Bits of float32(value), rounding a Python float to nearest even."""
    import struct

    return struct.unpack("<I", struct.pack("<f", value))[0]


def host_reciprocal_rn(value: float) -> float:
    """float32(1 / s) for s = float32(value), correctly rounded and flushed, as a Python
    float: for a static scale known on the host. The float64 quotient rounded once to
    float32 is the correctly rounded float32 quotient (53 >= 2 * 24 + 2 bits, so the
    double rounding is innocuous); a subnormal result is flushed to +0."""
    scale = f32_from_bits(f32_bits(value))
    inv = f32_from_bits(f32_bits(1.0 / scale))
    return inv if inv >= f32_from_bits(MIN_NORMAL_BITS) else 0.0


def static_scale_parts(static_scale: float):
    """(scale, 1 / scale, flush_input) of a caller's static FP8 scale, as Python floats
    holding float32 values and a flag, all made on the host, so that no device divides
    (compiled, a traced division was redone per element). Backends pass scale and
    reciprocal as arrays, so a compiled kernel is not specialised on every scale a
    checkpoint holds. 1/scale > 2^116 lifts a subnormal input past half the smallest
    e4m3 step, so only below STATIC_SCALE_DAZ must inputs be flushed."""
    scale = f32_from_bits(f32_bits(static_scale))
    return scale, host_reciprocal_rn(scale), scale < f32_from_bits(STATIC_SCALE_DAZ_BITS)


def reciprocal_rn_bits(bits, where, floor_div_estimate=None):
    """Bits of float32(1 / s), correctly rounded and flushed, from the int32 bits of a
    positive normal float32 s (docs/spec.md, "Reciprocals").

    Integer long division on the significand, for devices whose float32 division is
    approximate. Written with operators only, so the same code runs on torch and JAX
    int32 arrays; ``where(cond, a, b)`` is the framework's select.

    ``floor_div_estimate(n, m)``, if given, returns an int32 guess of floor(n / m)
    that may be off by one either way (a float32 division, however approximate or
    rewritten, is: the quotient is below 2^8 and its relative error below 2^-20);
    one exact integer correction step then makes each digit exact. Integer division
    does not vectorise on CPUs (docs/performance.md).
    """
    exp = (bits >> 23) & 0xFF
    m = (bits & 0x7FFFFF) | 0x800000

    def digit(n):
        if floor_div_estimate is None:
            return n // m, n % m
        q = floor_div_estimate(n, m)
        r = n - q * m  # exact: |q * m| < 2^31
        low, high = r < 0, r >= m
        q = where(low, q - 1, where(high, q + 1, q))
        r = where(low, r + m, where(high, r - m, r))
        return q, r

    # Q = floor(2^48 / m) in 7-bit steps, so every intermediate fits in int32.
    q, r = digit(m * 0 + (1 << 30))
    for k in (7, 7, 4):
        d, r = digit(r << k)
        q = (q << k) + d
    guard, lsb = q & 1, (q >> 1) & 1
    sig = (q >> 1) + (guard & ((r != 0) | lsb))  # round half to even; r is the sticky part
    carry = sig >> 24
    power_of_two = m == (1 << 23)
    out_exp = where(power_of_two, 254 - exp, 253 - exp + carry)
    mantissa = where(power_of_two | (carry == 1), 0, sig - (1 << 23))
    # A result below 2^-126 is subnormal in IEEE arithmetic and flushed by the spec.
    return where(out_exp >= 1, (out_exp << 23) | mantissa, 0)


def e4m3_code_words(bits, add_shifter_bits, where):
    """int32 words whose low byte is the e4m3fn code of float32 values of magnitude below
    464 (clamped to 448, or a dynamic-scale product, below 448.0002 by docs/spec.md
    section 10), from their int32 bits, in integer operations (docs/spec.md, "Rounding
    to e4m3"). Operators only, like reciprocal_rn_bits, so torch and JAX share it.

    Normal e4m3 range: round to nearest even at bit 20 (add 2^19 - 1 plus the bit that
    will become the last mantissa bit), shift, and rebias the exponent from 127 to 7.
    Subnormal e4m3 range (|y| < 2^-6): rint(|y| * 2^9), read off the low bits of the
    float sum |y| + 2^14, which ``add_shifter_bits(magnitude_bits)`` returns as int32
    bits; its operand is a bitcast, never a product, so no FMA can form, and a flushed
    subnormal input gives code 0 as IEEE rounding would.
    """
    magnitude = bits & 0x7FFFFFFF
    # The rebias is folded into the rounding add: magnitude >= 2^-6 has bits >= 121 << 23,
    # so the sum stays positive and (a - (960 << 20)) >> 20 == (a >> 20) - 960.
    normal = (magnitude + (0x7FFFF - ((120 << 3) << 20)) + ((magnitude >> 20) & 1)) >> 20
    small = add_shifter_bits(magnitude) - E4M3_SUBNORMAL_SHIFTER_BITS
    return where(magnitude < 0x3C800000, small, normal) | ((bits >> 24) & 0x80)
