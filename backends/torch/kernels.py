"""The PyTorch kernels: docs/spec.md on torch.Tensor, on the tensor's own device.

Same function names as backends/numpy/kernels.py. Every kernel is a straight line of
tensor operations with no data-dependent Python branch in the traced path, so
the same code runs eagerly and under ``torch.compile(fullgraph=True)``. The
few host checks that save a full pass in eager mode on the CPU (is any token
poisoned? is any scale tiny enough to need a flush?) are skipped while
compiling and on accelerators, where the masked form is used instead; compiled
dequantizations on the CPU get the same look from their host-side wrapper, which
passes the kernel a flag (``scales_checked``, ``params_checked``), as JAX does.

Why the arithmetic is safe here (docs/spec.md, "Why compilers cannot change the
bits"): every float32 step is a single multiply, subtract, max or min; the
reciprocal is computed once per token and multiplied, never divided per element;
no product is ever added to anything, so there is nothing to contract into an FMA
(the compiled e4m3 encoder's one float add takes a bitcast magnitude).
PyTorch keeps subnormals on the CPU and CUDA (no FTZ), so the spec's flushes are
written out explicitly exactly where the spec lists them.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from kvquant import _formulas, _spec

NAME = "torch"

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int8": torch.int8,
    "uint8": torch.uint8,
}


# A Python float holding the float32 value exactly; torch multiplies a float32 tensor
# by a Python scalar in float32 (the scalar is exactly representable).
_f32 = _spec.f32_from_bits


R448 = _f32(_spec.R448_BITS)
R127 = _f32(_spec.R127_BITS)
R15 = _f32(_spec.R15_BITS)
R3 = _f32(_spec.R3_BITS)
S_MIN = _f32(_spec.S_MIN_BITS)
FP8_MAX = _f32(_spec.FP8_MAX_BITS)
MIN_NORMAL = _f32(_spec.MIN_NORMAL_BITS)
PRODUCT_FLUSH = _f32(_spec.PRODUCT_FLUSH_BITS)
STATIC_SCALE_DAZ = _f32(_spec.STATIC_SCALE_DAZ_BITS)
FP8_PLAIN_SCALE = _f32(_spec.FP8_PLAIN_SCALE_BITS)
INT4_PLAIN_SCALE = _f32(_spec.INT4_PLAIN_SCALE_BITS)
INT4_PLAIN_ZERO_PRODUCT = _f32(_spec.INT4_PLAIN_ZERO_PRODUCT_BITS)


def _nan_like(ref: torch.Tensor, dtype_name: str = "float32") -> torch.Tensor:
    """The spec's canonical NaN as a 0-d tensor on ref's device (built from bits,
    so no framework can pick another payload)."""
    bits = _spec.NAN_BITS_BY_DTYPE[dtype_name]
    if dtype_name == "float32":
        return torch.tensor(bits - (1 << 32) if bits >= 1 << 31 else bits, dtype=torch.int32, device=ref.device).view(torch.float32)
    return torch.tensor(bits - (1 << 16) if bits >= 1 << 15 else bits, dtype=torch.int16, device=ref.device).view(DTYPES[dtype_name])


class _TorchMath:
    """The array namespace kvquant/_formulas.py computes with."""

    where = staticmethod(torch.where)
    isfinite = staticmethod(torch.isfinite)
    abs = staticmethod(torch.abs)
    copysign = staticmethod(torch.copysign)
    zeros_like = staticmethod(torch.zeros_like)
    maximum = staticmethod(torch.clamp_min)  # with a Python float bound
    nan = staticmethod(lambda ref: _nan_like(ref))

    @staticmethod
    def concat(parts, axis=-1):
        return torch.cat(parts, dim=axis)

    @staticmethod
    def reciprocal_rn(s):
        return reciprocal_rn(s)

    ONE, ZERO = 1.0, 0.0
    S_MIN, MIN_NORMAL, PRODUCT_FLUSH = S_MIN, MIN_NORMAL, PRODUCT_FLUSH

    amin = staticmethod(lambda v, axis: v.amin(axis))
    amax = staticmethod(lambda v, axis: v.amax(axis))
    poisoned_max = staticmethod(lambda blocks, reduced, axis: reduced)  # torch's max keeps NaN
    stack = staticmethod(lambda parts, axis: torch.stack(parts, dim=axis))
    as_float32 = staticmethod(lambda v: v.to(torch.float32))

    @staticmethod
    def codes(y, levels):
        if torch.compiler.is_compiling():
            return y.round().clamp(0.0, float(levels))  # float32 codes: pack_codes packs them so
        # Eagerly in place, and through int8 (the same bytes): ATen's float32 -> uint8
        # conversion is slower on the CPU.
        return _clamp_proven(y.round_(), 0.0, float(levels)).to(torch.int8).view(torch.uint8)

    @staticmethod
    def scaled_offsets(x, mn, inv):
        return (x - mn) * inv if torch.compiler.is_compiling() else (x - mn).mul_(inv)

    pack_codes = staticmethod(lambda q, codes_per_byte: pack_codes(q, codes_per_byte))
    pack_group_codes = staticmethod(lambda q, codes_per_byte: pack_group_codes(q, codes_per_byte))
    unpack_codes = staticmethod(lambda packed, codes_per_byte: unpack_codes(packed, codes_per_byte))

    ZERO_POISONED_BYTES = False  # Inductor vectorises the select on floats (_zero_poisoned)

    @staticmethod
    def zero_poisoned(y, poisoned):
        return _zero_poisoned(y, poisoned)

    @staticmethod
    def dequantized(b, z, s):
        # Eagerly in place (a second full-size buffer cost more than the arithmetic);
        # compiled, in place on views made Inductor's kernel slower.
        if torch.compiler.is_compiling():
            return (b - z) * s
        return b.sub_(z).mul_(s)

    @staticmethod
    def flush_products(v, scales, zeros):
        if host_checks_allowed(v) and not bool(_asymmetric_at_risk(scales, zeros).any()):
            return v
        return flush_product(v)

    @staticmethod
    def canonical(p):
        return _canonical_params(p.to(torch.float32))

    @staticmethod
    def materialized(*params):
        out = _materialized(*params)
        out = out if len(params) > 1 else (out,)
        # Compiled, a bool flag comes back as float32 0/1.
        return tuple(o if o.dtype == p.dtype else o != 0 for p, o in zip(params, out))


M = _TorchMath


def host_checks_allowed(t: torch.Tensor) -> bool:
    """A cheap host-side test may replace a full masked pass only in eager mode on the
    CPU, where reading one flag costs no device synchronisation (on CUDA it would be
    one per call; meta tensors have no values to read)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def flush(v: torch.Tensor, below: float = MIN_NORMAL) -> torch.Tensor:
    """Spec flush() (kvquant/_formulas.py)."""
    return _formulas.flush(M, v, below)


def flush_product(v: torch.Tensor) -> torch.Tensor:
    return _formulas.flush_product(M, v)


def _widen(x: torch.Tensor) -> torch.Tensor:
    return x.detach().to(torch.float32)


def _absmax(t: torch.Tensor, dim) -> torch.Tensor:
    """max |x| along dim without materialising |x|; NaN if the slice holds a NaN.

    amax and amin separately: on the CPU torch.aminmax along a short axis is much
    slower. Compiled, |x| costs nothing (fused), and a whole-tensor maximum by rows
    first then over the rows beat Inductor's single full reduction (docs/performance.md).
    """
    if torch.compiler.is_compiling():
        rows = t.abs().amax(-1)  # kernels hand in [rows, head_dim]; dim is -1 or None
        return rows if dim is not None else rows.amax()
    if dim is None:
        return torch.maximum(t.amax(), -t.amin())
    return torch.maximum(t.amax(dim), -t.amin(dim))


def reciprocal_rn(s: torch.Tensor) -> torch.Tensor:
    """float32(1 / s), correctly rounded and flushed, for positive normal float32 s
    (docs/spec.md, "Reciprocals").

    On the CPU a plain division: IEEE in eager mode and in Inductor's C++, which is
    built without -freciprocal-math (tests/test_reciprocal.py checks it compiled).
    Elsewhere by integer long division on the significand: Triton (torch.compile on
    CUDA) divides float32 approximately (1 ulp off on an H100, which moved INT4 zeros
    and FP8 codes). Its digits are exact integer quotients, not the float guesses JAX
    corrects: Inductor inlines each digit's remainder into the next, and with a guess
    (five uses per digit) the generated kernel exploded (docs/performance.md); integer
    division costs O(tokens or groups).
    """
    if s.device.type == "cpu":
        return flush(1.0 / s)
    return reciprocal_by_long_division(s)


def _materialized(*params: torch.Tensor):
    """The same per-token or per-group tensors (one shape), computed once into a buffer
    before the element loops that read them; a bool tensor comes back as float32 0/1.

    Speed only, no bits change; the counterpart of backends/jax/kernels.py's _materialize. Compiled,
    Inductor otherwise inlines the cheap per-token values (1 / scale, the poisoned flag,
    INT4's flushed minimum) into the element loop and redoes them for every 16 elements
    or every group (docs/performance.md). An opaque custom op is a buffer Inductor
    cannot see through; one call for all of them."""
    if not torch.compiler.is_compiling():
        return params if len(params) > 1 else params[0]
    stacked = torch.ops.kvquant.materialize(torch.stack([p.to(torch.float32) for p in params]))
    return tuple(stacked.unbind(0)) if len(params) > 1 else stacked[0]


if not hasattr(torch.ops.kvquant, "materialize"):  # a re-imported module keeps the first
    @torch.library.custom_op("kvquant::materialize", mutates_args=())
    def _materialize_op(t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    @_materialize_op.register_fake
    def _(t):
        return torch.empty_like(t)


def reciprocal_by_long_division(s: torch.Tensor) -> torch.Tensor:
    """reciprocal_rn off the CPU, on any device (tests run it compiled on the CPU)."""
    return _spec.reciprocal_rn_bits(s.view(torch.int32), torch.where).view(torch.float32)


def _symmetric_scale(amax: torch.Tensor, reciprocal: float):
    """The spec's symmetric scale (kvquant/_formulas.py), with 1 / scale and the poisoned
    flags materialised for the element loop."""
    scale, inv, poisoned = _formulas.symmetric_scale(M, amax, reciprocal)
    inv, poisoned = M.materialized(inv, poisoned)
    return scale, inv, poisoned


def _zero_poisoned(y: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
    """Scaled values of poisoned tokens or groups become +0.0, hence code 0, before the
    cast. ``poisoned`` broadcasts against y. Masking float32 here, rather than the
    integer codes after the cast, keeps Inductor's loop vectorised."""
    if host_checks_allowed(y) and not bool(poisoned.any()):
        return y
    return torch.where(poisoned, torch.zeros((), dtype=y.dtype, device=y.device), y)


def _to_output(v: torch.Tensor, out_dtype: str, suspects: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round once to out_dtype; every NaN (a NaN code, scale or zero, or 0 x inf from a
    caller's infinite scale) becomes the canonical NaN.

    Which NaN x * NaN gives is the hardware's choice (x86 keeps the operand's payload,
    CUDA returns 0x7FFFFFFF), and ATen's and Inductor's vectorised float32 -> bfloat16
    casts turn every NaN into 0xFFFF, so the NaN bits are written as integers.
    ``suspects`` (non-finite scales or zeros) lets eager mode on the CPU skip the NaN
    search when no parameter could have made one.
    """
    if host_checks_allowed(v) and suspects is not None and not bool(suspects.any()):
        return _rounded(v, out_dtype)
    # v != v: isnan, but vectorised by Inductor on the CPU (torch.isnan is not)
    return _to_output_nan_where(v, v != v, out_dtype)


def _rounded(v: torch.Tensor, out_dtype: str) -> torch.Tensor:
    """float32 values rounded once to out_dtype (no copy for float32)."""
    return v if out_dtype == "float32" else v.to(DTYPES[out_dtype])


def _to_output_nan_where(v: torch.Tensor, nan: torch.Tensor, out_dtype: str) -> torch.Tensor:
    """_to_output for values known to be NaN exactly where ``nan`` holds."""
    out = _rounded(v, out_dtype)
    carrier = torch.int32 if out_dtype == "float32" else torch.int16
    return torch.where(nan, _nan_like(out, out_dtype).view(carrier), out.view(carrier)).view(out.dtype)


def _canonical_params(*params: torch.Tensor):
    """Read scales/zeros as the spec does: subnormals flushed, any NaN made canonical.
    (Materialising them for the compiled element loop is no faster.)"""
    canonical = [torch.where(torch.isnan(p), _nan_like(p), flush(p)) for p in params]
    return tuple(canonical) if len(canonical) > 1 else canonical[0]


# --------------------------------------------------------------------- FP8
def _fp8_codes(x: torch.Tensor, inv: torch.Tensor, poisoned: torch.Tensor, static: bool = False) -> torch.Tensor:
    # torch's cast saturates where ml_dtypes and JAX give NaN: the clamp keeps every
    # backend's cast away from out-of-range values. The compiled integer encoder is not
    # a cast: with a dynamic scale |x * inv| < 448.0002 (docs/spec.md, section 10), which
    # it rounds to 448 as the clamp would, so only a static scale clamps there.
    if torch.compiler.is_compiling():
        y = x * inv
        words = encode_e4m3_words(y.clamp(-FP8_MAX, FP8_MAX) if static else y)
        return _narrow_zeroing_poisoned(words, poisoned, torch.uint8).view(torch.float8_e4m3fn)
    # Eagerly, torch's own cast is one pass where the bit method takes eight. In-place
    # steps spare eager mode a fresh full-size buffer (and its page faults) per operation.
    y = _zero_poisoned(x * inv, poisoned)
    return y.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


SUBNORMAL_E4M3_SHIFTER = _f32(_spec.E4M3_SUBNORMAL_SHIFTER_BITS)


def encode_e4m3_words(y: torch.Tensor) -> torch.Tensor:
    """int32 words whose low byte is the e4m3fn code of float32 values of magnitude below
    464 (clamped to 448, or bounded by section 10): _spec.e4m3_code_words, the integer
    method JAX uses, here when compiling: faster than Inductor's float8 conversion
    (docs/performance.md)."""
    return _spec.e4m3_code_words(y.view(torch.int32), _add_subnormal_shifter, torch.where)


def _add_subnormal_shifter(magnitude_bits: torch.Tensor) -> torch.Tensor:
    return (magnitude_bits.view(torch.float32) + SUBNORMAL_E4M3_SHIFTER).view(torch.int32)


def _narrow_zeroing_poisoned(words: torch.Tensor, poisoned: torch.Tensor, dtype) -> torch.Tensor:
    """int32 codes narrowed to dtype, 0 where ``poisoned`` (broadcast) holds: compiled, a
    select on int32 words kept Inductor's loop vectorised and cost less than the float
    select of _zero_poisoned."""
    return torch.where(poisoned, torch.zeros((), dtype=words.dtype, device=words.device), words).to(dtype)


def fp8_quantize_per_token(x: torch.Tensor):
    xf = _widen(x)
    scale, inv, poisoned = _symmetric_scale(_absmax(xf, -1), R448)
    return _fp8_codes(xf, inv[:, None], poisoned[:, None]), scale


def fp8_quantize_per_tensor(x: torch.Tensor, static_scale: Optional[float]):
    if static_scale is None:
        return _fp8_per_tensor_dynamic(x)
    return _fp8_per_tensor_static(x, *static_scale_args(static_scale, x.device))


def static_scale_args(static_scale: float, device):
    """_spec.static_scale_parts as tensors on the input's device. Divided in the
    compiled kernel, Inductor redid the division and flush for every 16 elements."""
    scale, inv, flush_input = _spec.static_scale_parts(static_scale)
    tensor = functools.partial(torch.tensor, dtype=torch.float32, device=device)
    return tensor(scale), tensor(inv), flush_input


def _fp8_per_tensor_dynamic(x: torch.Tensor):
    xf = _widen(x)
    amax = _absmax(xf, None) if xf.numel() else torch.zeros((), device=xf.device)
    scale, inv, poisoned = _symmetric_scale(amax, R448)
    return _fp8_codes(xf, inv, poisoned), scale


def _fp8_per_tensor_static(x: torch.Tensor, scale: torch.Tensor, inv: torch.Tensor, flush_input: bool):
    xf = _widen(x)
    if flush_input:
        xf = flush(xf)
    if xf.numel():
        poisoned = ~torch.isfinite(_absmax(xf, None))
    else:
        poisoned = torch.zeros((), dtype=torch.bool, device=xf.device)
    scale = torch.where(poisoned, _nan_like(scale), scale)
    return _fp8_codes(xf, inv, poisoned, static=True), scale


_E4M3_SIGN_AND_MAGNITUDE = -0x78100000  # 0x87F00000 as an int32: the sign bit and bits 20-26
_E4M3_NAN_MAGNITUDE = 0x7F << 20
_TWO_TO_120 = 2.0**120
_TINIEST = {}


def keeps_subnormals(device: torch.device) -> bool:
    """Whether float32 subnormals survive arithmetic here: not under
    torch.set_flush_denormal(True) (or another library's flush-to-zero mode); only the
    CPU is asked, other devices say no."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if "cpu" not in _TINIEST:
        _TINIEST["cpu"] = torch.tensor(2.0 ** -140, dtype=torch.float32)
    return bool(_TINIEST["cpu"] * 2.0 != 0)


def decode_e4m3(codes: torch.Tensor, subnormal_floats: bool):
    """(v, factor, nan): float32 v with v * factor the value of each e4m3fn code, exactly
    (torch's own float8 -> float32 conversion is scalar code on the CPU, eager and
    compiled), and which codes are NaN (0x7F, 0xFF, read as 480 in v); eagerly ``nan``
    is None when no code is NaN.

    subnormal_floats (keeps_subnormals): the code sign-extended from int8 to int32,
    shifted left by 20 and masked, has its sign in bit 31 and its 7 magnitude bits at
    float32 bits 20-26, which reads as 2^(e-127)(1 + m/8) for e > 0 and the subnormal
    m * 2^-129 for e = 0: the value times 2^-120, three integer steps. Otherwise the
    exponent is rebiased by 120 for normal codes, m * 2^-9 for subnormal ones, then the
    sign: the value itself, with no float32 subnormal for a flushing CPU to zero.
    Compiled, NaN codes are flagged from the same int32 words (a test on the uint8 codes
    kept Inductor's loop from vectorising); eagerly, from the bytes, a quarter of the
    traffic."""
    compiling = not host_checks_allowed(codes)
    if subnormal_floats:
        w = codes.view(torch.int8).to(torch.int32)
        w = (w << 20) & _E4M3_SIGN_AND_MAGNITUDE if compiling else w.bitwise_left_shift_(20).bitwise_and_(_E4M3_SIGN_AND_MAGNITUDE)
        v, factor = w.view(torch.float32), _TWO_TO_120
        magnitude, nan_magnitude = w & 0x7FFFFFFF, _E4M3_NAN_MAGNITUDE
    else:
        c = codes.view(torch.uint8).to(torch.int32)
        magnitude, nan_magnitude = c & 0x7F, 0x7F
        normal = ((magnitude << 20) + (120 << 23)).view(torch.float32)
        v = torch.where(magnitude < 8, magnitude.to(torch.float32) * (2.0 ** -9), normal)
        v, factor = torch.where((c & 0x80) != 0, -v, v), 1.0
    if compiling:
        return v, factor, magnitude == nan_magnitude
    magnitudes = codes.view(torch.uint8) & 0x7F
    has_nan_code = magnitudes.numel() > 0 and bool(magnitudes.amax() == 0x7F)
    return v, factor, (magnitudes == 0x7F) if has_nan_code else None


def e4m3_values(codes: torch.Tensor, subnormal_floats: bool) -> torch.Tensor:
    """float32 values of e4m3fn codes (decode_e4m3), NaN codes read as 480."""
    v, factor, _ = decode_e4m3(codes, subnormal_floats)
    return v * factor if factor != 1.0 else v


def fp8_dequantize(codes: torch.Tensor, scales: torch.Tensor, out_dtype: str, scales_checked: bool = False,
                   subnormal_floats: bool = False):
    """value = flush_product(float32(code) * scale); scales is [rows, 1] or [1, 1]. A NaN code
    (0x7F, 0xFF) or a NaN scale gives the canonical NaN.

    scales_checked: every scale is known to be finite and >= 2^-116 (fp8_scales_checked),
    as the JAX fp8_dequantize: then no product falls below 2^-125 or is NaN, so only
    NaN codes need the canonical NaN, and such scales are already canonical. The
    compiled kernels take it on the CPU; eager mode makes the same checks inside.
    subnormal_floats: keeps_subnormals() holds (decode_e4m3)."""
    scaled, factor, nan_codes = decode_e4m3(codes, subnormal_floats)
    if scales_checked:
        v = scaled * factor * scales.to(torch.float32) if factor != 1.0 else scaled * scales.to(torch.float32)
        if nan_codes is None:  # eager, and no NaN code
            return _rounded(v, out_dtype)
        return _to_output_nan_where(v, nan_codes, out_dtype)
    scales = _canonical_params(scales)
    if host_checks_allowed(codes):
        # scale * 2^120 is exact below 2^8 (NaN and inf stay so): one product then.
        finite = torch.isfinite(scales)
        if factor == 1.0 or not bool((finite & (scales.abs() >= 256.0)).any()):
            v = scaled.mul_(scales * factor)
        else:
            v = scaled.mul_(factor).mul_(scales)
        if nan_codes is not None:
            v[nan_codes] = float("nan")
        suspects = ~finite | (nan_codes is not None)
    else:
        v = torch.where(nan_codes, float("nan"), (scaled * factor if factor != 1.0 else scaled) * scales)
        suspects = None
    if not host_checks_allowed(v) or bool((scales < FP8_PLAIN_SCALE).any()):
        v = flush_product(v)
    return _to_output(v, out_dtype, suspects)


def fp8_scales_checked(scales: torch.Tensor) -> torch.Tensor:
    """Whether fp8_dequantize may take scales_checked=True for these scales (a bool tensor)."""
    s = scales.to(torch.float32)
    return ((s >= FP8_PLAIN_SCALE) & (s < float("inf"))).all()


# -------------------------------------------------------------------- INT8
def _clamp_proven(q: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """The spec's clamp of rounded INT8/INT4 values, which can never act (docs/spec.md,
    section 10: |x * inv| <= 127.00003, 0 <= (x - mn) * inv <= 15.000004). Compiled, it is
    free (fused) and stays as a guard; eager mode on the CPU skips the full pass, as the
    NumPy reference does."""
    return q if host_checks_allowed(q) else q.clamp_(lo, hi)


def int8_quantize(x: torch.Tensor):
    xf = _widen(x)
    scale, inv, poisoned = _symmetric_scale(_absmax(xf, -1), R127)
    if torch.compiler.is_compiling():
        q = (xf * inv[:, None]).round().clamp(-127.0, 127.0).to(torch.int32)
        return _narrow_zeroing_poisoned(q, poisoned[:, None], torch.int8), scale
    y = _zero_poisoned(xf * inv[:, None], poisoned[:, None])
    return _clamp_proven(y.round_(), -127.0, 127.0).to(torch.int8), scale


def int8_dequantize(codes: torch.Tensor, scales: torch.Tensor, out_dtype: str):
    """value = float32(q) * scale: never subnormal for a normal scale and |q| >= 1."""
    scales = _canonical_params(scales)
    v = codes.to(torch.float32).mul_(scales)
    return _to_output(v, out_dtype, ~torch.isfinite(scales))


# ------------------------------------------------- INT4, INT2, per channel
# Written once in kvquant/_formulas.py for PyTorch and JAX; the namespace M above holds
# what is torch's own (in-place eager steps, the packing Inductor vectorises).
def int4_quantize(x: torch.Tensor, group_size: int):
    return _formulas.quantize_token_groups(M, _widen(x), group_size, R15, 15, 2)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [rows, 2n] (each below 16) to bytes [rows, n], element 2j in the low
    nibble. Each pair read as one little-endian int16 w = lo + 256 hi gives the byte as
    the low 8 bits of w | w >> 4: two eager passes, where slicing the pairs apart is
    several times slower."""
    pairs = q.contiguous().view(torch.int16)
    return ((pairs | (pairs >> 4)) & 0xFF).to(torch.uint8)


def pack_codes(q: torch.Tensor, codes_per_byte: int) -> torch.Tensor:
    """_formulas.pack_codes (the spec's packing, 2 or 4 codes per byte), the fastest
    way measured here. Eagerly, nibbles as pack_nibbles. Compiled (float32 codes from
    M.codes), by 32-bit words: four uint8 codes read as one little-endian int32 w give
    their bytes as ORs of shifts of w, and Inductor vectorises int32 loops where it left
    the ORs of shifted uint8 codes scalar (docs/performance.md). The codes are below 16,
    so w is positive and every shift brings in zeros."""
    if not torch.compiler.is_compiling():
        return pack_nibbles(q) if codes_per_byte == 2 else _formulas.pack_codes(M, q, codes_per_byte)
    q = q.to(torch.uint8)
    if q.shape[-1] % 4:
        return _formulas.pack_codes(M, q, codes_per_byte)
    w = q.contiguous().view(torch.int32)
    if codes_per_byte == 4:
        return ((w | (w >> 6) | (w >> 12) | (w >> 18)) & 0xFF).to(torch.uint8)
    pairs = (w | (w >> 4)) & 0x00FF00FF  # bytes 0 and 2: codes 0-1 and 2-3
    # As int16, the two bytes in order; a value above 0x7FFF wraps, keeping its bits.
    return ((pairs | (pairs >> 8)) & 0xFFFF).to(torch.int16).view(torch.uint8)


def pack_group_codes(q: torch.Tensor, codes_per_byte: int) -> torch.Tensor:
    """pack_codes for one block of groups [..., groups, G]. Compiled, nibbles from float32
    codes (integers 0 to 15): byte j is the weighted sum q[2j] + 16 q[2j+1], exact in
    float32 (at most 255), which Inductor vectorises inside the loop computing
    the codes; packing uint8 codes there took a scalar kernel of its own, as did slicing
    the codes apart. For crumbs, and over a whole row (per channel), the words were faster."""
    if not torch.compiler.is_compiling() or codes_per_byte != 2:
        return pack_codes(q, codes_per_byte)
    lead, width = tuple(q.shape[:-1]), q.shape[-1]
    weights = torch.tensor([1.0, 16.0], dtype=torch.float32, device=q.device)
    return (q.reshape(lead + (width // 2, 2)) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, codes_per_byte: int) -> torch.Tensor:
    """_formulas.unpack_codes: nibbles as INT4's unpack_nibbles; crumbs, compiled, each
    byte spread into one int32 word holding its four codes, little-endian (Inductor
    vectorises it, and not the uint8 shifts and stack, which are faster eagerly)."""
    lead, width = tuple(packed.shape[:-1]), packed.shape[-1]
    if codes_per_byte == 2:
        return unpack_nibbles(packed.reshape(-1, width)).reshape(lead + (2 * width,))
    if not torch.compiler.is_compiling():
        return _formulas.unpack_codes(M, packed, codes_per_byte)
    b = packed.to(torch.int32)
    return ((b | (b << 6) | (b << 12) | (b << 18)) & 0x03030303).view(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_nibbles: bytes [rows, n] to uint8 codes [rows, 2n].

    Compiled, four bytes at a time: Inductor left the int16 loop below scalar (as long
    as the float arithmetic after it), and spreading each int32 word's two halves into
    two words of four codes (_spread_nibbles) vectorises. Eagerly its seven small
    passes cost more."""
    rows, width = packed.shape
    if torch.compiler.is_compiling() and width % 4 == 0:
        words = packed.contiguous().view(torch.int32)
        halves = torch.stack([_spread_nibbles(words & 0xFFFF), _spread_nibbles((words >> 16) & 0xFFFF)], dim=-1)
        return halves.reshape(rows, width // 2).view(torch.uint8)
    w = packed.to(torch.int16)
    return ((w & 0x0F) | ((w >> 4) << 8)).view(torch.uint8)


def _spread_nibbles(half: torch.Tensor) -> torch.Tensor:
    """int32 holding two packed bytes (four nibbles) in bits 0-15 -> one code per byte,
    little-endian: nibble k to bits 8k..8k+3."""
    half = (half | (half << 8)) & 0x00FF00FF
    return (half | (half << 4)) & 0x0F0F0F0F


def int4_dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, out_dtype: str,
                    params_checked: bool = False):
    """params_checked: int4_params_checked holds (compiled kernels take it on the CPU)."""
    v = _formulas.dequantize_token_groups(M, packed, scales, zeros, group_size, 2, params_checked)
    return _rounded(v, out_dtype) if params_checked else _to_output(v, out_dtype, _suspects(scales, zeros))


def _suspects(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Groups whose parameters can make a NaN (_to_output's ``suspects``)."""
    return ~(torch.isfinite(scales) & torch.isfinite(zeros))


def _asymmetric_at_risk(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Groups whose dequantized values can fall below 2^-125, whatever their codes' width:
    a scale below 2^-99, or 0 < |zero * scale| < 2^-124 (docs/spec.md, section 8, item 7);
    canonical params."""
    return (scales < INT4_PLAIN_SCALE) | ((zeros.abs() * scales < INT4_PLAIN_ZERO_PRODUCT) & (zeros != 0))


def int4_params_checked(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Whether int4_dequantize may take params_checked=True (a bool tensor). On the
    parameters as given: a subnormal zero that canonicalisation would make 0 can only
    make the look stricter."""
    s, z = scales.to(torch.float32), zeros.to(torch.float32)
    # A NaN scale is not at risk (its comparisons are false) but fails s < inf.
    return ((s < float("inf")) & (z.abs() < float("inf")) & ~_asymmetric_at_risk(s, z)).all()


def int2_quantize(x: torch.Tensor, group_size: int):
    return _formulas.quantize_token_groups(M, _widen(x), group_size, R3, 3, 4)


def int2_dequantize(packed, scales, zeros, group_size: int, out_dtype: str):
    return _to_output(_formulas.dequantize_token_groups(M, packed, scales, zeros, group_size, 4), out_dtype, _suspects(scales, zeros))


def int4_channel_quantize(x: torch.Tensor, group_size: int):
    return _formulas.quantize_channel_blocks(M, _widen(x), group_size, R15, 15, 2)


def int4_channel_dequantize(packed, scales, zeros, group_size: int, out_dtype: str):
    return _to_output(_formulas.dequantize_channel_blocks(M, packed, scales, zeros, group_size, 2), out_dtype, _suspects(scales, zeros))


def int2_channel_quantize(x: torch.Tensor, group_size: int):
    return _formulas.quantize_channel_blocks(M, _widen(x), group_size, R3, 3, 4)


def int2_channel_dequantize(packed, scales, zeros, group_size: int, out_dtype: str):
    return _to_output(_formulas.dequantize_channel_blocks(M, packed, scales, zeros, group_size, 4), out_dtype, _suspects(scales, zeros))
