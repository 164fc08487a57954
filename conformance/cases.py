"""The case families of the conformance suite, as framework-neutral NumPy inputs.

A case is one input plus the format parameters to quantize it with; expected
outputs come from the reference backend (or, for golden vectors, from the
checked-in file). Every case has an id of the form
``family/format/dtype/name`` that names what it covers.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

import ml_dtypes
import numpy as np

from kvquant import _spec
from kvquant._formats import FORMATS
from kvquant._types import Format

DTYPES = _spec.INPUT_DTYPES
NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
GROUP_SIZES = (32, 64, 128)
HEAD_DIMS = (64, 80, 96, 128, 256)
# The widest head_dim above: the row width of bundles (conformance/bundles.py) and of
# the invariance checks' inputs, so that a variant compiling per shape compiles one
# kernel for both.
WIDTH = max(HEAD_DIMS)
NARROW_HEAD_DIMS = (6, 34)



@dataclass(frozen=True)
class Spec:
    """A format with its parameters: what one quantize call is asked to do."""

    format: Format
    group_size: Optional[int] = None
    static_scale: Optional[float] = None

    @property
    def info(self):
        return FORMATS[self.format]

    @property
    def label(self) -> str:
        if self.group_size is not None:
            return f"{self.format.value}-g{self.group_size}"
        if self.static_scale is not None:
            return f"fp8_per_tensor-static={_scale_label(self.static_scale)}"
        return self.format.value


def _scale_label(scale: float) -> str:
    mantissa, exponent = np.frexp(scale)
    return f"2^{exponent - 1}" if mantissa == 0.5 else f"{scale:g}"


V11_FORMATS = tuple(info.format for info in FORMATS.values() if info.spec_version == "1.1")


# Most families check spec v1.1's formats at one group size each, the one that
# exercises the most: INT2 at 64 (a short last group on head_dim 96), per channel at 32
# (the most blocks). Group size only decides where groups start, which the golden
# vectors and the rounding ties sweep over every G; every compiled variant compiles
# each (format, group size, shape) anew, which with every G took too long for CI.
V11_SAMPLED_GROUPS = {Format.INT2: 64, Format.INT4_PER_CHANNEL: 32, Format.INT2_PER_CHANNEL: 32}


def all_specs(static_scales: Tuple[float, ...] = (), v11: str = "all") -> List[Spec]:
    """Every format and group size of spec v1, then spec v1.1's (INT2, INT4 and INT2 per
    channel) with every group size (``v11="all"``) or one (``"sampled"``)."""
    specs = [Spec(Format.FP8_PER_TOKEN), Spec(Format.FP8_PER_TENSOR), Spec(Format.INT8)]
    specs += [Spec(Format.INT4, g) for g in GROUP_SIZES]
    specs += [Spec(Format.FP8_PER_TENSOR, static_scale=s) for s in static_scales]
    if v11 == "all":
        specs += [Spec(f, g) for f in V11_FORMATS for g in GROUP_SIZES]
    else:
        specs += [Spec(f, V11_SAMPLED_GROUPS[f]) for f in V11_FORMATS]
    return specs


def fit_input(x: np.ndarray, spec: Spec, token_axis: int = -2) -> Optional[np.ndarray]:
    """x shaped for spec's format, or None where the format cannot take its head_dim
    (INT2 packs four codes per byte). Per-channel formats quantize whole blocks of G
    tokens: a token axis that is not a multiple of G is extended by repeating its
    tokens cyclically, so each case's values (and edge cases) are all still there."""
    info = spec.info
    if x.shape[-1] % info.codes_per_byte:
        return None
    if info.per_channel:
        tokens, g = x.shape[token_axis], spec.group_size
        if tokens % g:
            x = np.take(x, np.arange(-(-tokens // g) * g) % tokens, axis=token_axis)
    return x


@dataclass(frozen=True)
class Case:
    id: str
    family: str
    spec: Spec
    dtype: str
    x: np.ndarray = field(repr=False, compare=False)
    flags: Tuple[str, ...] = ()
    on_nonfinite: str = "raise"
    # "swapaxes": x is stored [B, S, H, D] and handed to the backend as the
    # non-contiguous view x.swapaxes(1, 2), i.e. [B, H, S, D].
    layout: str = "contiguous"
    expected: Optional[Dict[str, np.ndarray]] = field(default=None, repr=False, compare=False)

    @property
    def logical_input(self) -> np.ndarray:
        return self.x.swapaxes(1, 2) if self.layout == "swapaxes" else self.x


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(NP_DTYPES[dtype])


def _has_nonfinite(x: np.ndarray) -> bool:
    with np.errstate(invalid="ignore"):
        return not np.isfinite(x.astype(np.float32)).all()


def _make(family, spec, dtype, name, x, flags, layout="contiguous") -> Optional[Case]:
    """The case, or None where the format cannot take x's head_dim (all_cases drops it)."""
    x = fit_input(np.asarray(x), spec, 1 if layout == "swapaxes" else -2)
    if x is None:
        return None
    x = _cast(x, dtype)
    on_nonfinite = "propagate" if _has_nonfinite(x) or "RangeOverflow" in flags else "raise"
    return Case(
        id=f"{family}/{spec.label}/{dtype}/{name}",
        family=family,
        spec=spec,
        dtype=dtype,
        x=x,
        flags=tuple(flags),
        on_nonfinite=on_nonfinite,
        layout=layout,
    )


# ------------------------------------------------------------- exhaustive16
def exhaustive16_cases() -> Iterator[Case]:
    """Every float16 and every bfloat16 bit pattern, 128 patterns per token in bit
    order, so the non-finite patterns (exponent all ones) fill whole tokens of their own."""
    for dtype, carrier in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
        x = bits.view(carrier).reshape(512, 128)
        finite = np.isfinite(x.astype(np.float32)).all(axis=1)
        for spec in all_specs(v11="sampled"):
            if spec.format is Format.FP8_PER_TENSOR:
                data, name = x[finite], "all-finite-patterns"
            else:
                data, name = x, "all-patterns"  # 512 tokens: whole blocks of every G
            yield Case(
                id=f"exhaustive16/{spec.label}/{dtype}/{name}",
                family="exhaustive16",
                spec=spec,
                dtype=dtype,
                x=np.ascontiguousarray(data),
                flags=("AllBitPatterns",),
                on_nonfinite="propagate" if not finite.all() and spec.format is not Format.FP8_PER_TENSOR else "raise",
            )


# ------------------------------------------------------------- fp8-boundary
@functools.lru_cache(maxsize=None)
def e4m3_values() -> np.ndarray:
    """The 127 non-negative finite e4m3fn values, ascending, as float32."""
    return np.arange(127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def e4m3_midpoints() -> np.ndarray:
    """The 126 midpoints between adjacent non-negative finite e4m3 values, as float32."""
    v = e4m3_values()
    return (v[:-1] + v[1:]) / np.float32(2)  # exact: adjacent e4m3 values share an exponent or differ by one


def fp8_boundary_values() -> np.ndarray:
    """Each midpoint between adjacent e4m3 values and its neighbours at +-1 and +-2
    float32 ulp, both signs."""
    mids = e4m3_midpoints()
    out = [mids]
    for steps in (1, 2):
        up, down = mids.copy(), mids.copy()
        for _ in range(steps):
            up = np.nextafter(up, np.float32(np.inf))
            down = np.nextafter(down, np.float32(0))
        out += [up, down]
    allv = np.concatenate(out).astype(np.float32)
    allv = allv[allv <= np.float32(448)]
    return np.concatenate([allv, -allv])


def fp8_boundary_cases() -> Iterator[Case]:
    """Values that land exactly on e4m3 rounding boundaries after scaling: each token
    holds 448 * 2^k, so its scale is exactly 2^k and x * inv is the boundary value."""
    vals = fp8_boundary_values()
    per_token = 127
    pad = (-len(vals)) % per_token
    vals = np.concatenate([vals, np.zeros(pad, np.float32)]).reshape(-1, per_token)
    tokens = np.concatenate([vals, np.full((vals.shape[0], 1), 448, np.float32)], axis=1)
    for k in (0, -20, 7):
        x = tokens * np.float32(2.0**k)
        for spec in (Spec(Format.FP8_PER_TOKEN), Spec(Format.FP8_PER_TENSOR), Spec(Format.FP8_PER_TENSOR, static_scale=2.0**k)):
            yield _make("fp8-boundary", spec, "float32", f"midpoints-scale-2^{k}", x, ("Fp8Midpoint",))


# ------------------------------------------------------------ rounding-ties
def rounding_tie_cases() -> Iterator[Case]:
    """INT8 and INT4 values exactly halfway between integers after scaling, and +-1 ulp."""
    halves = np.arange(-127, 127, dtype=np.float32) + np.float32(0.5)
    cols = [halves, np.nextafter(halves, np.float32(np.inf)), np.nextafter(halves, np.float32(-np.inf))]
    v = np.concatenate(cols)
    pad = (-len(v)) % 127
    v = np.concatenate([v, np.zeros(pad, np.float32)]).reshape(-1, 127)
    x = np.concatenate([v, np.full((v.shape[0], 1), 127, np.float32)], axis=1)  # scale exactly 1
    yield _make("rounding-ties", Spec(Format.INT8), "float32", "half-integers", x, ("RoundingTie",))
    h4 = np.arange(0, 15, dtype=np.float32) + np.float32(0.5)
    t4 = np.concatenate([h4, np.nextafter(h4, np.float32(np.inf)), np.nextafter(h4, np.float32(0))])
    for g in GROUP_SIZES:
        reps = -(-g // len(t4)) + 1
        body = np.tile(t4, reps)[: g - 2]
        group = np.concatenate([[0.0], body, [15.0]]).astype(np.float32)  # mn 0, mx 15: scale 1
        x = np.tile(group, (4, 128 // g if g <= 128 else 1))
        yield _make("rounding-ties", Spec(Format.INT4, g), "float32", "half-integers", x, ("RoundingTie",))
    for spec in all_specs():
        if spec.format not in V11_FORMATS:
            continue
        levels, g = spec.info.levels, spec.group_size
        h = np.arange(0, levels, dtype=np.float32) + np.float32(0.5)
        ties = np.concatenate([h, np.nextafter(h, np.float32(np.inf)), np.nextafter(h, np.float32(0))])
        group = np.concatenate([[0.0], np.resize(ties, g - 2), [levels]]).astype(np.float32)  # scale 1
        yield _make("rounding-ties", spec, "float32", "half-integers", lay_groups(np.stack([group] * 4), spec),
                    ("RoundingTie",))
    yield from product_tie_cases()


def lay_groups(groups: np.ndarray, spec: Spec, head_dim: int = 128) -> np.ndarray:
    """Groups [n, G] (each one group's values) laid out as spec's format groups them:
    side by side inside tokens of head_dim for formats grouped inside a token, or as
    channels of one block of G tokens (group i in channel i, rolled one step per channel
    so no two channels are equal) for per-channel formats."""
    n, g = groups.shape
    if spec.info.per_channel:
        columns = [np.roll(groups[c % n], c) for c in range(head_dim)]
        return np.stack(columns, axis=1)
    per_token = max(1, head_dim // g)
    rows = -(-n // per_token)
    return np.resize(groups, (rows * per_token, g)).reshape(rows, per_token * g)


def inexact_products_on(targets: np.ndarray, inv: np.float32, limit: np.float32) -> np.ndarray:
    """For each target t, a float32 x with |x| <= limit and float32(x * inv) == t while the
    exact product x * inv is not t, where one lies within 3 ulp of t / inv.

    The spec rounds the product, then rounds again (to an integer or an e4m3 value). A
    product rounded onto a tie breaks it to even; the exact product, as a fused
    multiply-add would see it, lies off the tie and rounds the other way half the time.
    A float64 product of two float32 values is exact, so the test is exact.
    """
    targets = np.asarray(targets, np.float32)
    start = (targets.astype(np.float64) / np.float64(inv)).astype(np.float32)
    candidates = [start]
    for direction in (np.inf, -np.inf):
        step = start
        for _ in range(3):
            step = np.nextafter(step, np.float32(direction))
            candidates.append(step)
    found = np.full(targets.shape, np.nan, np.float32)
    for x in candidates:
        exact = x.astype(np.float64) * np.float64(inv)
        hit = (exact.astype(np.float32) == targets) & (exact != targets) & (np.abs(x) <= limit) & np.isnan(found)
        found[hit] = x[hit]
    return found[~np.isnan(found)]


def _tokens_with_amax(amax: np.float32, values: np.ndarray, width: int) -> np.ndarray:
    """Tokens of `width` holding amax first, then `values` (zero padding): each token's
    scale comes from amax alone."""
    per_token = width - 1
    pad = (-len(values)) % per_token
    body = np.concatenate([values, np.zeros(pad, np.float32)]).reshape(-1, per_token)
    return np.concatenate([np.full((body.shape[0], 1), amax, np.float32), body], axis=1)


def product_tie_cases() -> Iterator[Case]:
    """Inputs whose scaled value x * inv, rounded to float32, lands exactly on a rounding
    tie (an e4m3 midpoint, subnormal ones included, or a half-integer) while the exact
    product does not: a backend that fuses the multiply into the rounding's add (XLA on
    the CPU contracts x * inv + magic into an FMA) breaks these ties the wrong way. Scales
    are not powers of two, so the products are inexact."""
    amaxes = [np.float32(v) for v in (3.7, 0.0123, 1234.5, 1.1, 77.7)]
    fp8_ties = np.concatenate([e4m3_midpoints(), -e4m3_midpoints()])
    int8_ties = np.arange(-127, 127, dtype=np.float32) + np.float32(0.5)
    fp8_tokens, int8_tokens = [], []
    for amax in amaxes:
        fp8_tokens.append(_tokens_with_amax(amax, inexact_products_on(fp8_ties, _dynamic_inverse(amax, 448), amax), 128))
        int8_tokens.append(_tokens_with_amax(amax, inexact_products_on(int8_ties, _dynamic_inverse(amax, 127), amax), 128))
    yield _make("rounding-ties", Spec(Format.FP8_PER_TOKEN), "float32", "products-on-ties", np.concatenate(fp8_tokens), ("RoundingTie", "ProductTie"))
    yield _make("rounding-ties", Spec(Format.INT8), "float32", "products-on-ties", np.concatenate(int8_tokens), ("RoundingTie", "ProductTie"))
    int4_ties = np.arange(0, 15, dtype=np.float32) + np.float32(0.5)
    for g in GROUP_SIZES:
        groups = []
        for mx in amaxes:
            # mn = 0, so x - mn is exact and (x - mn) * inv is the product under test.
            body = inexact_products_on(int4_ties, _dynamic_inverse(mx, 15), mx)
            groups.append(np.concatenate([[0, mx], body, np.zeros(g - 2 - len(body))]).astype(np.float32))
        x = np.stack(groups)
        yield _make("rounding-ties", Spec(Format.INT4, g), "float32", "products-on-ties", np.tile(x, (1, 128 // g)), ("RoundingTie", "ProductTie"))
    for spec in all_specs():
        if spec.format not in V11_FORMATS:
            continue
        levels, g = spec.info.levels, spec.group_size
        ties = np.arange(0, levels, dtype=np.float32) + np.float32(0.5)
        groups = []
        for mx in amaxes:
            body = inexact_products_on(ties, _dynamic_inverse(mx, levels), mx)
            groups.append(np.concatenate([[0, mx], np.resize(body, g - 2)]).astype(np.float32))
        yield _make("rounding-ties", spec, "float32", "products-on-ties", lay_groups(np.stack(groups), spec),
                    ("RoundingTie", "ProductTie"))


def _dynamic_scale(amax: np.float32, n: int) -> np.float32:
    """The spec's scale = max(amax * R(n), S_MIN) for a token's amax (or an INT4 group's
    range, with n = 15), from the spec's bit patterns; amax here is normal and positive."""
    r = {448: _spec.R448_BITS, 127: _spec.R127_BITS, 15: _spec.R15_BITS, 3: _spec.R3_BITS}[n]
    f32 = lambda bits: np.float32(_spec.f32_from_bits(bits))  # noqa: E731
    return np.maximum(amax * f32(r), f32(_spec.S_MIN_BITS))


def _dynamic_inverse(amax: np.float32, n: int) -> np.float32:
    """The spec's inv = 1 / scale for that scale."""
    return np.float32(1) / _dynamic_scale(amax, n)


# ---------------------------------------------------------------- realistic
def realistic_inputs(rng: np.random.Generator, head_dim: int = 128) -> Dict[str, np.ndarray]:
    """KV-like data: heavy-tailed tokens, keys with a few fixed outlier channels 10 to
    100 times larger (as measured in real LLM keys), and near-Gaussian values."""
    shape = (1, 4, 24, head_dim)
    heavy = rng.standard_t(3, size=shape) * 0.7
    keys = rng.standard_normal(shape)
    channels = rng.choice(head_dim, size=4, replace=False)
    keys[..., channels] *= rng.uniform(10, 100, size=4)
    values = rng.standard_normal(shape) * 0.3
    return {"heavy-tailed": heavy, "keys-outlier-channels": keys, "values-gaussian": values}


def realistic_cases() -> Iterator[Case]:
    rng = np.random.default_rng(20261127)
    inputs = {128: realistic_inputs(rng, 128), 96: realistic_inputs(rng, 96)}
    for head_dim, named in inputs.items():
        for name, x in named.items():
            for dtype in DTYPES:
                for spec in all_specs(static_scales=(0.05,), v11="sampled"):
                    yield _make("realistic", spec, dtype, f"{name}-d{head_dim}", x, ("Realistic",))
    # Spec v1.1 on a longer history (256 tokens: whole blocks of every G, no repeats) of
    # keys whose outlier channels differ per head, the data per-channel groups are for.
    long_rng = np.random.default_rng(20261130)
    keys = long_rng.standard_normal((1, 2, 256, 128))
    for head in range(2):
        channels = long_rng.choice(128, size=6, replace=False)
        keys[0, head][:, channels] *= long_rng.uniform(10, 100, size=6)
    for dtype in DTYPES:
        for spec in all_specs():
            if spec.format in V11_FORMATS:
                yield _make("realistic", spec, dtype, "keys-outlier-channels-256-tokens", keys, ("Realistic", "OutlierChannels"))


# --------------------------------------------------------------- degenerate
def degenerate_inputs(dtype: str) -> List[Tuple[str, np.ndarray, Tuple[str, ...]]]:
    rng = np.random.default_rng(7)
    d = 128
    base = rng.standard_normal((6, d)).astype(np.float32)
    out = []
    x = base.copy()
    x[1] = 0
    x[4] = -0.0
    out.append(("all-zero-tokens", x, ("AllZeroToken",)))
    x = base.copy()
    x[0, :] = 3.0
    x[2, 32:64] = -1.25
    x[3, :64] = 7.0
    out.append(("constant-groups", x, ("ConstantGroup",)))
    x = np.zeros((4, d), np.float32)
    x[0, 5] = 2.5
    x[1, 0] = -1e-3
    x[2, d - 1] = 65000.0
    x[3, 70] = -3.0
    out.append(("single-nonzero", x, ("SingleNonZero",)))
    # Magnitudes near the floors: subnormals (flushed: the token counts as zero), values
    # whose scale would fall below S_MIN, and values just above 2^-126.
    tiny_scale = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-140}[dtype]
    x = np.stack([
        base[0] * np.float32(tiny_scale),
        base[1] * np.float32(2.0**-100 * 448 / 4),
        base[2] * np.float32(2.0**-125),
        np.where(np.arange(d) % 2 == 0, np.float32(2.0**-126), np.float32(2.0**-127)),
        base[4] * np.float32(2.0**-90),
        -np.abs(base[5]) * np.float32(2.0**-118),
    ])
    out.append(("tiny-magnitudes", x, ("Subnormal", "NearSMin")))
    big = {"float16": 60000.0, "bfloat16": 3.0e38, "float32": 3.4e38}[dtype]
    x = base.copy()
    x[0] = np.sign(base[0]) * np.float32(big)
    x[1, ::2] = np.float32(big)
    x[1, 1::2] = np.float32(-big)
    x[2] *= np.float32(big / 8)
    out.append(("huge-magnitudes", x, ("Huge", "RangeOverflow") if dtype != "float16" else ("Huge",)))
    x = base.copy()
    x[0, 0] = np.nan
    x[1, d - 1] = np.inf
    x[2, 63] = -np.inf
    x[3, 64] = np.nan
    x[3, 65] = np.inf
    x[5, 100] = -np.nan
    out.append(("nan-inf", x, ("NaN", "Inf")))
    # A cache-sized tensor: XLA on the CPU hands reductions over a few dozen rows or
    # more to YNNPACK, whose max and min drop NaN (a NaN token came back with a finite
    # scale); the six tokens above stayed below that. One token in three gets a NaN or
    # an infinity, at columns that start, end or straddle INT4 groups.
    x = np.random.default_rng(8).standard_normal((2, 4, 32, d)).astype(np.float32)
    tokens = x.reshape(-1, d)
    bad = (np.nan, -np.nan, np.inf, -np.inf)
    columns = (0, 1, 31, 32, 63, 64, 95, 96, d - 2, d - 1)
    for t in range(0, tokens.shape[0], 3):
        tokens[t, columns[(t // 3) % len(columns)]] = bad[(t // 3) % len(bad)]
    tokens[7, [5, 70]] = np.nan  # a token with two, in different groups
    out.append(("nan-inf-many-tokens", x, ("NaN", "Inf", "ManyTokens")))
    # NaN alone, no infinity that a NaN-dropping maximum would still see: the whole
    # tensor (FP8 per tensor) and three tokens are poisoned by it.
    x = np.random.default_rng(9).standard_normal((2, 4, 32, d)).astype(np.float32)
    x[0, 1, 5, 40] = np.nan
    x[1, 2, 17, d - 1] = -np.nan
    x[1, 3, 31, 0] = np.nan
    out.append(("nan-many-tokens", x, ("NaN", "ManyTokens")))
    # Every input above at once, tiled to a cache-sized tensor: reductions and loops
    # change implementation with size (the NaN-dropping reductions above appeared only
    # past a few dozen rows), and the small cases stay below any such threshold.
    rows = np.concatenate([v.reshape(-1, d) for _, v, _ in out])
    tiled = np.tile(rows, (-(-1024 // rows.shape[0]), 1))
    out.append(("all-above-tiled", tiled, tuple(sorted({f for _, _, fl in out for f in fl} | {"ManyTokens"}))))
    return out


def degenerate_cases() -> Iterator[Case]:
    for dtype in DTYPES:
        inputs = degenerate_inputs(dtype)
        for name, x, flags in inputs:
            for spec in all_specs(static_scales=(1.0, 2.0**-120, 3.0e38), v11="sampled"):
                yield _make("degenerate", spec, dtype, name, x, flags)
        # Per channel, a group is a channel of a block of tokens: the same inputs
        # transposed, so each token above (all zero, constant, NaN...) is a channel of
        # 128 tokens here.
        for name, x, flags in inputs:
            if x.ndim != 2 or x.shape[0] > 128:
                continue
            channels = np.resize(x, (128, 128)).T
            for spec in all_specs(v11="sampled"):
                if spec.info.per_channel:
                    yield _make("degenerate", spec, dtype, f"{name}-as-channels", channels, flags + ("AsChannels",))
    yield from underflow_boundary_cases()


# Just below 2^-126 a float32 product rounds one way under IEEE gradual underflow and
# another under flush-to-zero hardware: (1 - 2^-24) * 2^-126 is a tie between the largest
# subnormal and 2^-126 (IEEE gives 2^-126, which a flush keeps) but exact with an
# unbounded exponent, hence tiny, so x86 FTZ (XLA on the CPU) returns 0. docs/spec.md,
# section 8, "the lowest normal binade".
_SCALE_ONTO_TIE = np.float32(_spec.f32_from_bits(0x04FFFFFF))  # (1 - 2^-24) * 2^-117


def underflow_boundary_cases() -> Iterator[Case]:
    """Dequantized products that land on (1 - 2^-24) * 2^-126 and elsewhere in [2^-126, 2^-125).

    FP8: a static scale of (1 - 2^-24) * 2^-117; an input of 2^-126 gets the code 2^-9,
    whose product with the scale is that tie; larger codes land just below 2^-125.
    INT4: a group with minimum -2^-126 and a range whose scale s has s * (1 / s) rounding
    to 1 - 2^-24, so that the q = 0 element dequantizes onto the tie."""
    tiny = np.float32(2.0**-126)
    steps = np.float32(2.0**-9) * np.arange(1, 8, dtype=np.float32)  # the e4m3 subnormal codes
    row = np.concatenate([steps * _SCALE_ONTO_TIE, -steps * _SCALE_ONTO_TIE, [tiny, -tiny]]).astype(np.float32)
    x = np.tile(np.resize(row, 128), (2, 1))
    x[1] *= np.float32(3)  # codes 3 * 2^-9 ...: products near 3 * 2^-126, normal
    yield _make("degenerate", Spec(Format.FP8_PER_TENSOR, static_scale=float(_SCALE_ONTO_TIE)), "float32",
                "underflow-boundary", x, ("Subnormal", "UnderflowBoundary"))
    for spec in all_specs():
        if spec.info.levels == 0:
            continue
        g = spec.group_size
        top = _int4_top_for_boundary_tie(spec.info.levels)
        group = np.linspace(0, top, g, dtype=np.float32)
        group[0], group[-1] = -tiny, top
        if spec.format is Format.INT4:  # v1's case, as it was
            x = np.tile(group, (2, 128 // g))
        else:
            x = lay_groups(np.stack([group, group]), spec)
        yield _make("degenerate", spec, "float32", "underflow-boundary", x, ("Subnormal", "UnderflowBoundary"))


def _int4_top_for_boundary_tie(levels: int = 15) -> np.float32:
    """The first float32 M >= 1 for which a group [-2^-126, ..., M] has scale s and
    inverse inv (the spec's, from its bit patterns) with s * inv rounding to 1 - 2^-24, so
    that -(zero) * s = -(2^-126 * inv) * s is the tie (1 - 2^-24) * 2^-126. The range
    M + 2^-126 rounds to M."""
    target = 1.0 - 2.0**-24
    m = np.float32(1.0)
    while True:
        scale = _dynamic_scale(m, levels)
        inv = np.float32(1) / scale
        if float(np.float32(np.float64(scale) * np.float64(inv))) == target:  # the float64 product is exact
            return m
        m = np.nextafter(m, np.float32(np.inf))


# ------------------------------------------------------------------- shapes
def shape_cases() -> Iterator[Case]:
    rng = np.random.default_rng(11)
    # Dtypes are covered by every other family; here each head_dim gets one 2-D case
    # and two of them a 4-D case, which keeps compiled variants' specialisations few.
    for head_dim in HEAD_DIMS:
        x2 = rng.standard_normal((5, head_dim)) * 4
        for spec in all_specs(v11="sampled"):
            yield _make("shapes", spec, "float32", f"2d-d{head_dim}", x2, ("Layout2D",))
    # Narrow heads: 3 and 17 packed INT4 bytes per token, not a whole number of 32-bit
    # words, which backends that unpack a word at a time must handle separately.
    narrow_rng = np.random.default_rng(12)  # its own stream: the other cases keep their data
    for head_dim in NARROW_HEAD_DIMS:
        x2 = narrow_rng.standard_normal((4, head_dim)) * 4
        for spec in all_specs(v11="sampled"):
            yield _make("shapes", spec, "float32", f"2d-d{head_dim}", x2, ("Layout2D", "NarrowHead"))
    for head_dim in (64, 128):
        x4 = rng.standard_normal((2, 3, 4, head_dim))
        for spec in all_specs(v11="sampled"):
            yield _make("shapes", spec, "bfloat16", f"4d-d{head_dim}", x4, ("Layout4D",))
    for spec in all_specs(static_scales=(0.25,), v11="sampled"):
        yield _make("shapes", spec, "float16", "zero-tokens-2d", np.zeros((0, 64)), ("ZeroTokens",))
        yield _make("shapes", spec, "float32", "zero-tokens-4d", np.zeros((2, 0, 3, 128)), ("ZeroTokens",))
        stored = rng.standard_normal((2, 5, 3, 96))  # [B, S, H, D], read as [B, H, S, D]
        yield _make("shapes", spec, "float32", "noncontiguous-swapaxes-d96", stored, ("NonContiguous",), layout="swapaxes")
