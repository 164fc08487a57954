"""Run cases against a backend and say exactly where and how it differs.

A check never loosens: every output (codes, scales, zeros, each dequantized
dtype) is compared bit for bit, shape and dtype included, and outputs must stay
on the input's device. Dequantization is fed the *reference's* codes, so a
quantize bug cannot hide or fake a dequantize bug.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from kvquant._formats import FORMATS
from kvquant._spec import OUTPUT_DTYPES
from kvquant._types import Format

from .cases import WIDTH, Case, Spec
from .reference import dequantize_with as _dequantize
from .reference import output_names as _names
from .reference import quantize_with as _quantize
from .reference import reference_backend, reference_outputs


@dataclass
class Mismatch:
    backend: str
    variant: str
    case_id: str
    operation: str
    output: str
    message: str
    index: Optional[Tuple[int, ...]] = None
    expected_hex: Optional[str] = None
    actual_hex: Optional[str] = None
    input_hex: Optional[str] = None
    differing: int = 0
    total: int = 0

    def __str__(self) -> str:
        head = f"[{self.backend}/{self.variant}] {self.operation} -> {self.output} on case {self.case_id}: {self.message}"
        if self.index is None:
            return head
        return (
            f"{head}\n  first mismatch at index {self.index}: expected {self.expected_hex}, "
            f"actual {self.actual_hex}; input bits {self.input_hex}\n"
            f"  {self.differing} of {self.total} elements differ"
        )

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass
class CaseResult:
    backend: str
    variant: str
    case: Case
    mismatches: List[Mismatch] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.mismatches


# ------------------------------------------------------------------ compare
def bits_of(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def _hex(value: np.ndarray) -> str:
    width = value.dtype.itemsize * 2
    return f"0x{int(bits_of(np.asarray(value).reshape(1))[0]):0{width}x}"


def _input_context(case: Case, output: str, index: Tuple[int, ...]) -> str:
    """Input bits that produced the mismatching element, for the report."""
    x = case.logical_input
    if x.size == 0:
        return "(empty input)"
    lead = index[:-1] if output in ("codes",) or output.startswith("dequant") else index
    if case.spec.format is Format.FP8_PER_TENSOR and output in ("scales",):
        flat = np.abs(x.astype(np.float32)).reshape(-1)
        return f"tensor amax element {_hex(x.reshape(-1)[int(np.nanargmax(flat))])}" if not np.isnan(flat).all() else "all NaN"
    info = FORMATS[case.spec.format]
    if output == "codes" and info.codes_per_byte > 1:
        k, j = info.codes_per_byte, index[-1]
        return ", ".join(f"x{lead + (k * j + i,)}={_hex(x[lead + (k * j + i,)])}" for i in range(k))
    if output == "codes" or output.startswith("dequant"):
        return f"x{index}={_hex(x[index])}"
    if info.per_channel:  # scales / zeros: show the (block, channel) group's extremes
        g, (block, channel) = case.spec.group_size, index[-2:]
        values = x[index[:-2]][block * g:(block + 1) * g, channel].astype(np.float32)
        return (f"channel {channel} of token block {block}: min {_hex(np.float32(np.min(values)))}, "
                f"max {_hex(np.float32(np.max(values)))}")
    if info.has_zeros:  # scales / zeros: show the group's extremes
        token, group = index[:-1], index[-1]
        g = case.spec.group_size
        block = x[token][group * g:(group + 1) * g].astype(np.float32)
        return f"group {group} of token {token}: min {_hex(np.float32(np.min(block)))}, max {_hex(np.float32(np.max(block)))}"
    row = x[lead].astype(np.float32)
    with np.errstate(invalid="ignore"):
        k = int(np.nanargmax(np.abs(row))) if not np.isnan(row).all() else 0
    return f"token {lead} amax element x{lead + (k,)}={_hex(x[lead + (k,)])}"


def _first_difference(expected: np.ndarray, actual: np.ndarray) -> Optional[Dict[str, Any]]:
    """None if the arrays are bit-identical (shape and dtype included), else the Mismatch
    fields: a vectorised check first, details only for the first differing element."""
    if tuple(actual.shape) != tuple(expected.shape):
        return {"message": f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"}
    if actual.dtype != expected.dtype:
        return {"message": f"dtype {actual.dtype}, expected {expected.dtype}"}
    differ = bits_of(expected).reshape(-1) != bits_of(actual).reshape(-1)
    if not differ.any():
        return None
    first = int(np.argmax(differ))
    return {
        "message": "bits differ",
        "index": tuple(int(i) for i in np.unravel_index(first, expected.shape)) if expected.ndim else (),
        "expected_hex": _hex(expected.reshape(-1)[first]),
        "actual_hex": _hex(actual.reshape(-1)[first]),
        "differing": int(differ.sum()),
        "total": int(differ.size),
    }


def compare(case: Case, operation: str, output: str, expected: np.ndarray, actual: np.ndarray, backend: str, variant: str) -> Optional[Mismatch]:
    fields = _first_difference(expected, actual)
    if fields is None:
        return None
    if "index" in fields:
        fields["input_hex"] = _input_context(case, output, fields["index"])
    return Mismatch(backend, variant, case.id, operation, output, **fields)


# ---------------------------------------------------------------------- run
def to_backend(ops, a: np.ndarray, device=None):
    return ops.runtime.from_numpy(np.ascontiguousarray(a), device)


def backend_input(ops, case: Case, device=None):
    arr = ops.runtime.from_numpy(case.x, device)
    return arr.swapaxes(1, 2) if case.layout == "swapaxes" else arr


def run_case(ops, case: Case, device=None, out_dtypes: Sequence[str] = OUTPUT_DTYPES) -> CaseResult:
    """The case's quantize outputs, and dequantization of the reference's outputs into
    each of ``out_dtypes``, compared bit for bit with the reference's."""
    rt = ops.runtime
    result = CaseResult(ops.name, ops.variant, case)
    add = result.mismatches.append
    expected = reference_outputs(case)
    shape = case.logical_input.shape
    op = FORMATS[case.spec.format].quantize_method
    x = backend_input(ops, case, device)
    in_device = rt.device(x)
    try:
        outs = _quantize(ops, case.spec, x, case.on_nonfinite)
    except Exception as exc:  # a crash is a finding, reported like a mismatch
        add(Mismatch(ops.name, ops.variant, case.id, op, "*", f"raised {type(exc).__name__}: {exc}"))
    else:
        for name, arr in zip(_names(case.spec), outs):
            if rt.device(arr) != in_device:
                add(Mismatch(ops.name, ops.variant, case.id, op, name, f"returned on {rt.device(arr)}, input was on {in_device}"))
                continue
            m = compare(case, op, name, expected[name], rt.to_numpy(arr), ops.name, ops.variant)
            if m:
                add(with_arbiter(m, ops, case, name))
    dop = FORMATS[case.spec.format].dequantize_method
    ref_outs = [to_backend(ops, expected[n], device) for n in _names(case.spec)]
    for dt in out_dtypes:
        try:
            out = _dequantize(ops, case.spec, ref_outs, shape, dt)
        except Exception as exc:
            add(Mismatch(ops.name, ops.variant, case.id, dop, f"dequant[{dt}]", f"raised {type(exc).__name__}: {exc}"))
            continue
        m = compare(case, dop, f"dequant[{dt}]", expected["dequant:" + dt], rt.to_numpy(out), ops.name, ops.variant)
        if m:
            add(with_arbiter(m, ops, case, "dequant:" + dt))
    return result


def with_arbiter(m: Mismatch, ops, case: Case, output: str) -> Mismatch:
    """A disagreement with the reference may be the reference's bug: say what the
    independent transcription of the spec gives at the first differing element, when
    the case is not a golden vector (whose bits are checked in) and the backend is not
    the transcription itself (the example backend)."""
    if m.index is None or case.expected is not None or ops.name == "example":
        return m
    from kvquant._ops import BackendOps
    from kvquant.backends.numpy.runtime import NumpyRuntime
    from kvquant.conformance import transcription as kernels

    judge = BackendOps("transcription", NumpyRuntime(), kernels)
    try:
        x = case.logical_input
        outs = _quantize(judge, case.spec, np.ascontiguousarray(x), case.on_nonfinite)
        if output.startswith("dequant:"):
            ref_outs = [reference_outputs(case)[n] for n in _names(case.spec)]
            value = _dequantize(judge, case.spec, ref_outs, x.shape, output.split(":", 1)[1])
        else:
            value = dict(zip(_names(case.spec), outs))[output]
        said = _hex(np.asarray(value)[m.index] if m.index else np.asarray(value))
    except Exception as exc:  # the judge's own failure must not hide the mismatch
        m.message += f"; the spec transcription could not judge ({type(exc).__name__})"
        return m
    side = "the backend" if said == m.actual_hex else "the reference" if said == m.expected_hex else "neither"
    m.message += f"; the spec transcription (kvquant.conformance.transcription) gives {said} there: it sides with {side}"
    return m


# --------------------------------------------------------------- invariance
INVARIANCE_CHECKS = ("batch", "streaming", "threads", "determinism", "raise", "every-code", "caller-params",
                     "seed-types")


def _as_np(ops, outs) -> List[np.ndarray]:
    return [ops.runtime.to_numpy(o) for o in outs]


def _same(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> Optional[str]:
    for name, x, y in zip(("codes", "scales", "zeros"), a, b):
        if x.shape != y.shape or not np.array_equal(bits_of(x), bits_of(y)):
            bad = np.flatnonzero(bits_of(x).reshape(-1) != bits_of(y).reshape(-1)) if x.shape == y.shape else []
            where = f" first at flat index {int(bad[0])}" if len(bad) else f" shapes {x.shape} vs {y.shape}"
            return f"{name} differ:{where}"
    return None


def invariance_inputs(spec: Optional[Spec] = None) -> Dict[str, np.ndarray]:
    """[12, WIDTH] tokens with an outlier token and a zero one; for per-channel formats
    [256, WIDTH] (8 blocks of the smallest G, 2 of the largest) with outlier channels
    and a zero channel, the shape per-channel groups are for. WIDTH, the bundles' row
    width: a variant that compiles per shape then checks them with the kernels it
    compiled for the bundles (a head_dim of their own cost torch.compile 23 more)."""
    rng = np.random.default_rng(99)
    if spec is not None and FORMATS[spec.format].per_channel:
        x = rng.standard_normal((256, WIDTH)).astype(np.float32)
        x[:, [3, 50]] *= 40
        x[:, 7] = 0
        x[70:90] *= 8
        return {"float32": x}
    x = rng.standard_normal((12, WIDTH)).astype(np.float32)
    x[3, :5] *= 50
    x[7] = 0
    return {"float32": x}


def _units(spec: Spec, tokens: int) -> List[Tuple[int, int]]:
    """The token ranges quantized independently of each other: single tokens, or blocks
    of G tokens for per-channel formats."""
    step = spec.group_size if FORMATS[spec.format].per_channel else 1
    return [(t, t + step) for t in range(0, tokens, step)]


def _flat_layout(arrays: Sequence[np.ndarray], spec: Spec) -> List[np.ndarray]:
    """Outputs of any layout as 2-D or 1-D: codes [T, D'], scales [T], [T, groups] or,
    per channel, [blocks, head_dim]."""
    tokens = arrays[0].size // arrays[0].shape[-1] if arrays[0].ndim else 0
    info = FORMATS[spec.format]
    out = [arrays[0].reshape(tokens, -1)]
    for a in arrays[1:]:
        if info.per_channel:
            out.append(a.reshape(-1, a.shape[-1]))
        else:
            out.append(a.reshape(tokens, -1) if info.has_zeros else a.reshape(tokens))
    return out


def run_invariance(ops, check: str, spec: Spec, device=None, trace: bool = True) -> List[Mismatch]:
    """Properties every backend must have, beyond matching the reference. ``trace``:
    whether seed-types also runs its calls under the kernels' ``trace``."""
    x_np = invariance_inputs(spec)["float32"]
    label = f"invariance/{spec.label}/float32/{check}"
    fail = lambda msg: [Mismatch(ops.name, ops.variant, label, FORMATS[spec.format].quantize_method, "*", msg)]  # noqa: E731
    on = "raise"
    whole = _as_np(ops, _quantize(ops, spec, to_backend(ops, x_np, device), on))
    if check == "determinism":
        again = _as_np(ops, _quantize(ops, spec, to_backend(ops, x_np, device), on))
        problem = _same(whole, again)
        return fail(f"two runs on the same input differ: {problem}") if problem else []
    if check == "batch":
        if spec.format is Format.FP8_PER_TENSOR:
            return []  # one scale for the whole tensor: batch-dependent by definition
        units = _units(spec, x_np.shape[0])
        per_unit = spec.group_size if FORMATS[spec.format].per_channel else 1
        for u in sorted({0, len(units) // 2, len(units) - 1}):
            start, stop = units[u]
            alone = _as_np(ops, _quantize(ops, spec, to_backend(ops, x_np[start:stop], device), on))
            inside = [whole[0][start:stop]] + [a[start // per_unit:stop // per_unit] for a in whole[1:]]
            problem = _same(inside, alone)
            if problem:
                return fail(f"tokens {start}:{stop} alone differ from the same tokens inside the batch: {problem}")
        batched = x_np.reshape(2, 3, 2, -1) if per_unit == 1 else x_np.reshape(2, 1, 128, -1)
        four = _as_np(ops, _quantize(ops, spec, to_backend(ops, batched, device), on))
        problem = _same(_flat_layout(four, spec), _flat_layout(whole, spec))
        return fail(f"the 4-D layout differs from the same tokens in 2-D: {problem}") if problem else []
    if check == "streaming":
        if spec.format is Format.FP8_PER_TENSOR:
            return []
        pieces = [_as_np(ops, _quantize(ops, spec, to_backend(ops, x_np[a:b], device), on))
                  for a, b in _units(spec, x_np.shape[0])]
        joined = [np.concatenate([p[i] for p in pieces], axis=0) for i in range(len(whole))]
        problem = _same(joined, whole)
        unit = "blocks of tokens" if FORMATS[spec.format].per_channel else "tokens"
        return fail(f"appending {unit} one at a time differs from quantizing all at once: {problem}") if problem else []
    if check == "threads":
        set_threads = getattr(ops.runtime, "num_threads", None)
        if set_threads is None:
            return []  # the runtime has no thread control to vary
        results = []
        for n in (1, 2):
            with set_threads(n):
                results.append(_as_np(ops, _quantize(ops, spec, to_backend(ops, x_np, device), on)))
        problem = _same(results[0], results[1])
        return fail(f"1 thread and 2 threads differ: {problem}") if problem else []
    if check == "raise":
        return _check_raise(ops, spec, label, device)
    if check == "seed-types":
        return _check_seed_types(ops, spec, label, device, trace)
    if check == "every-code":
        return _check_every_code(ops, spec, label, device)
    if check == "caller-params":
        return _check_caller_params(ops, spec, label, device)
    raise ValueError(f"unknown invariance check {check!r}")


def raise_inputs(spec: Spec) -> List[Tuple[str, np.ndarray, Tuple[int, ...]]]:
    """(what, input, index the error must name) for on_nonfinite="raise": a lone NaN,
    tokens poisoned by infinities alone (a backend that gives them an infinite scale
    instead of NaN would pass a NaN-only check while storing them silently), and both
    again in a cache-sized 4-D tensor, where reductions change implementation."""
    x = invariance_inputs(spec)["float32"]
    info = FORMATS[spec.format]

    def index(token: Tuple[int, ...], column: int) -> Tuple[int, ...]:
        if spec.format is Format.FP8_PER_TENSOR:
            return ()
        if info.per_channel:  # the (block, channel) group in the scales' layout
            return token[:-1] + (token[-1] // spec.group_size, column)
        return token + ((column // spec.group_size,) if spec.group_size else ())

    nan = x.copy()
    nan[4, 70] = np.nan
    inf = x.copy()
    inf[9, 3] = np.inf
    last = WIDTH - 1
    inf[10, last] = -np.inf
    # 160 tokens per head; 256 per channel, whole blocks of every G; the invariance width.
    cache = np.random.default_rng(5).standard_normal((2, 4, 256 if info.per_channel else 160, WIDTH)).astype(np.float32)
    cache_inf = cache.copy()
    cache_inf[1, 2, 150, 64] = -np.inf
    cache_inf[1, 3, 7, 0] = np.inf
    cache_nan = cache.copy()
    cache_nan[0, 3, 101, last] = np.nan
    cache_nan[1, 0, 0, 33] = np.inf
    return [
        ("a NaN", nan, index((4,), 70)),
        ("+-inf and no NaN", inf, index((9,), 3)),
        ("-inf and +inf in a [2, 4, 160, 256] cache", cache_inf, index((1, 2, 150), 64)),
        ("a NaN and an inf in a [2, 4, 160, 256] cache", cache_nan, index((0, 3, 101), last)),
    ]


def _check_raise(ops, spec: Spec, label: str, device) -> List[Mismatch]:
    if not ops.runtime.is_concrete(to_backend(ops, invariance_inputs(spec)["float32"], device)):
        return []
    found = []
    for what, bad, expected_index in raise_inputs(spec):
        fail = Mismatch(ops.name, ops.variant, label, FORMATS[spec.format].quantize_method, "*", "")
        try:
            _quantize(ops, spec, to_backend(ops, bad, device), "raise")
        except ValueError as exc:
            got = getattr(exc, "index", None)
            if got is not None and tuple(got) != expected_index:
                fail.message = f"on_nonfinite='raise' with {what} named index {tuple(got)}, expected {expected_index}"
                found.append(fail)
            continue
        fail.message = f"on_nonfinite='raise' did not raise ValueError for {what}"
        found.append(fail)
    return found


def _check_seed_types(ops, spec: Spec, label: str, device, trace_too: bool = True) -> List[Mismatch]:
    """The seed's own argument types, as its users pass them: the 2-D layout with
    explicit num_tokens and head_dim, the group size as an ``Int4GroupSize`` member, the
    output dtype as the framework's dtype object and as a string; called, and where the
    variant runs whole functions its own way (the kernels' optional ``trace``:
    torch.compile(fullgraph=True), jax.jit), traced too. torch.compile once crashed on
    an Int4GroupSize member that an int 64 passed."""
    from kvquant._types import Int4GroupSize

    info = FORMATS[spec.format]
    x_np = invariance_inputs(spec)["float32"]
    tokens, head_dim = x_np.shape
    group = Int4GroupSize(spec.group_size) if spec.group_size else None
    # One output dtype as a string, the others as framework dtype objects (and the
    # reverse in the second call): every form reaches every kernel across the two.
    # Traced, the first alone: a tracer meets each kind of argument there, and the
    # form is read while tracing, so the second would only grow the caller's graph.
    forms = [[dt if i % 2 else ops.runtime.dtype(dt) for i, dt in enumerate(OUTPUT_DTYPES)],
             [ops.runtime.dtype(dt) if i % 2 else dt for i, dt in enumerate(OUTPUT_DTYPES)]]

    def seed_calls(x, out_dtypes):
        # The table's calls pass every argument positionally, as the seed's users do.
        outs = info.quantize(ops, x, tokens, head_dim, group_size=group, static_scale=spec.static_scale)
        return tuple(outs) + tuple(info.dequantize(ops, outs, tokens, head_dim, dt, group) for dt in out_dtypes)

    ref = reference_backend()
    ref_x = ref.runtime.from_numpy(x_np)
    ref_outs = _quantize(ref, spec, ref_x, "raise")
    expected = [np.asarray(o) for o in ref_outs] + [np.asarray(_dequantize(ref, spec, ref_outs, x_np.shape, dt))
                                                     for dt in OUTPUT_DTYPES]
    names = list(info.output_names) + [f"dequant[{dt}]" for dt in OUTPUT_DTYPES]
    runs = [("called", lambda fn: fn)]
    trace = getattr(ops.kernels, "trace", None)
    if trace is not None and trace_too:
        runs.append(("traced", trace))
    describe = lambda dts: ", ".join(getattr(d, "__name__", None) or repr(d) for d in dts)  # noqa: E731
    found = []
    for how, wrap in runs:
        run_forms = forms if how == "called" else forms[:1]
        try:
            results = wrap(lambda x: [seed_calls(x, out_dtypes) for out_dtypes in run_forms])(to_backend(ops, x_np, device))
        except Exception as exc:
            found.append(Mismatch(ops.name, ops.variant, label, info.quantize_method, "*",
                                  f"{how} with group {group!r}, output dtypes {' and '.join(map(describe, run_forms))}: "
                                  f"raised {type(exc).__name__}: {str(exc)[:300]}"))
            continue
        for out_dtypes, got in zip(run_forms, results):
            described = describe(out_dtypes)
            for name, exp, act in zip(names, expected, got):
                fields = _first_difference(exp, ops.runtime.to_numpy(act))
                if fields is not None:
                    fields["message"] = f"{how}, output dtypes {described}: " + fields["message"]
                    found.append(Mismatch(ops.name, ops.variant, label, info.quantize_method, name, **fields))
    return found


def every_code_inputs(spec: Spec) -> Tuple[List[np.ndarray], Tuple[int, int]]:
    """Dequantization inputs holding every code value, quantize's or not (the FP8 NaN codes
    0x7F/0xFF, INT8 -128), with scales that overflow float16, products that must be
    flushed, and a NaN: what a cache written elsewhere may hand a backend."""
    import ml_dtypes

    scales = np.array([1.0, 2.0**-118, 1e36, np.nan, np.inf, 0.0], np.float32)
    info = FORMATS[spec.format]
    if info.has_zeros:
        # 11 tokens (128 per channel: whole blocks of every G) of head_dim WIDTH, every byte.
        rows = 128 if info.per_channel else 11
        packed = np.resize(np.arange(256, dtype=np.uint8), (rows, WIDTH // info.codes_per_byte))
        shape = info.param_shape((rows, WIDTH), spec.group_size)
        count = shape[0]
        groups = shape[1]
        scale_g = np.resize(np.array([0.375, 2.0**-110, 1e30, 3.0, np.nan, 1.0, np.inf, 0.0], np.float32), (count - 2 if count > 2 else count, groups))
        zeros_g = np.resize(np.array([7.5, -3.0, 0.0, 15.0, 2.0**-126, np.nan, 1e-3, np.inf, 4.0], np.float32), scale_g.shape)
        # Two more rows: scales in the lowest normal binade with zeros that read as 0
        # (0, -0, a subnormal), so that q = 1 dequantizes to the scale itself, below
        # 2^-125, and must be flushed, while q >= 2 stays.
        lowest = np.array([2.0**-126, 1.5 * 2.0**-126, np.nextafter(np.float32(2.0**-125), np.float32(0))], np.float32)
        reads_as_zero = np.array([0.0, -0.0, 2.0**-127], np.float32)
        extra = 2 if count > 2 else 0
        scale_g = np.concatenate([scale_g, np.resize(lowest, (extra, groups))])
        zeros_g = np.concatenate([zeros_g, np.resize(reads_as_zero[::-1], (extra, groups))])
        if count <= 2:  # one or two blocks per channel: the lowest binade in some channels
            scale_g[:, ::5] = np.resize(lowest, scale_g[:, ::5].shape)
            zeros_g[:, ::5] = np.resize(reads_as_zero, zeros_g[:, ::5].shape)
        return [packed, scale_g, zeros_g], (rows, WIDTH)
    if spec.format is Format.INT8:
        return [np.resize(np.arange(-128, 128).astype(np.int8), (6, WIDTH)), scales], (6, WIDTH)
    codes = np.resize(np.arange(256, dtype=np.uint8), (6, WIDTH)).view(ml_dtypes.float8_e4m3fn)
    if spec.format is Format.FP8_PER_TENSOR:
        return [codes, np.array(0.3125, np.float32)], (6, WIDTH)
    return [codes, scales], (6, WIDTH)


# Scales and zeros a cache written elsewhere may hold: each side of every bound a
# backend may use to skip the product flush (2^-126, 2^-125, 2^-124, 2^-116, 2^-99, spec
# section 8), subnormals, signed zeros, huge values, infinities and NaN.
CALLER_PARAMS = np.array([
    0.0, -0.0, 2.0**-149, -1e-40, 2.0**-126, 1.5 * 2.0**-126, np.nextafter(np.float32(2.0**-125), np.float32(0)),
    2.0**-125, 2.0**-124, 1.5 * 2.0**-124, 2.0**-117, 2.0**-116, 2.0**-100, 2.0**-99, 1.5 * 2.0**-99, 1e-30,
    0.01, 0.375, 1.0, 3.0, 7.5, 15.0, 448.0, 1e30, 3.4e38, np.inf, -np.inf, np.nan, -1.0, -7.5, -2.0**-126,
], np.float32)
# Shortcuts decide from the smallest scale of a call (or of a row), so each positive
# value takes a turn as the smallest.
CALLER_PARAM_FLOORS = tuple(sorted({float(v) for v in CALLER_PARAMS if 0 < v < np.inf}))


def caller_param_inputs(spec: Spec, floor: Optional[float]) -> Tuple[List[np.ndarray], Tuple[int, int]]:
    """Dequantization inputs with random codes and parameters from CALLER_PARAMS: any
    of them (floor None), or those >= floor with floor itself present."""
    import ml_dtypes

    rng = np.random.default_rng(0 if floor is None else int(np.float32(floor).view(np.uint32)))
    rows, head_dim = 32, WIDTH
    pool = CALLER_PARAMS if floor is None else CALLER_PARAMS[(CALLER_PARAMS >= floor) & (CALLER_PARAMS < np.inf)]

    def scales(shape):
        s = rng.choice(pool, size=shape).astype(np.float32)
        if floor is not None:
            s.reshape(-1)[rng.integers(s.size)] = floor
        return s

    info = FORMATS[spec.format]
    if info.has_zeros:
        rows = 128 if info.per_channel else rows  # whole blocks of every G
        shape = info.param_shape((rows, head_dim), spec.group_size)
        packed = rng.integers(0, 256, (rows, head_dim // info.codes_per_byte), dtype=np.uint8)
        zeros = rng.choice(CALLER_PARAMS, size=shape).astype(np.float32)
        return [packed, scales(shape), zeros], (rows, head_dim)
    if spec.format is Format.INT8:
        return [rng.integers(-128, 128, (rows, head_dim), dtype=np.int8), scales((rows,))], (rows, head_dim)
    codes = rng.integers(0, 256, (rows, head_dim), dtype=np.uint8).view(ml_dtypes.float8_e4m3fn)
    if spec.format is Format.FP8_PER_TENSOR:
        return [codes, scales(())], (rows, head_dim)
    return [codes, scales((rows,))], (rows, head_dim)


def _check_caller_params(ops, spec: Spec, label: str, device) -> List[Mismatch]:
    found = []
    for floor in (None,) + CALLER_PARAM_FLOORS:
        inputs, shape = caller_param_inputs(spec, floor)
        drawn = "any parameters" if floor is None else f"smallest scale 0x{int(np.float32(floor).view(np.uint32)):08x}"
        found += _compare_dequantizations(ops, spec, label, inputs, shape, device, drawn + ": ")
    return found


def _check_every_code(ops, spec: Spec, label: str, device) -> List[Mismatch]:
    inputs, shape = every_code_inputs(spec)
    return _compare_dequantizations(ops, spec, label, inputs, shape, device)


def _compare_dequantizations(ops, spec: Spec, label: str, inputs, shape, device, context: str = "") -> List[Mismatch]:
    """The backend's dequantization of host inputs against the reference's, in every
    output dtype; a mismatch names the code byte behind its first differing element."""
    ref = reference_backend()
    dop = FORMATS[spec.format].dequantize_method
    found = []
    for dt in OUTPUT_DTYPES:
        expected = ref.runtime.to_numpy(_dequantize(ref, spec, inputs, shape, dt))
        try:
            actual = ops.runtime.to_numpy(_dequantize(ops, spec, [to_backend(ops, a, device) for a in inputs], shape, dt))
        except Exception as exc:
            found.append(Mismatch(ops.name, ops.variant, label, dop, f"dequant[{dt}]", f"{context}raised {type(exc).__name__}: {exc}"))
            continue
        fields = _first_difference(expected, actual)
        if fields is None:
            continue
        fields["message"] = context + fields["message"]
        if "index" in fields:
            first = int(np.ravel_multi_index(fields["index"], expected.shape))
            code_bits = bits_of(inputs[0]).reshape(-1)[first // FORMATS[spec.format].codes_per_byte]
            fields["input_hex"] = f"code byte 0x{int(code_bits):02x}"
        found.append(Mismatch(ops.name, ops.variant, label, dop, f"dequant[{dt}]", **fields))
    return found


# ------------------------------------------------------------------ drivers
def release_compiled(ops) -> None:
    """Let a backend variant drop the kernels it compiled for the shapes it has seen
    (the optional ``release`` member of its kernels), and hand the freed memory back:
    after jax.clear_caches() a quick run's JAX process still held 1.39 GB, 0.46 GB once
    glibc was asked to trim its heaps."""
    release = getattr(ops.kernels, "release", None)
    if release is not None:
        release()
        gc.collect()
        _trim_heap()


def _trim_heap() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the memory is reused, not returned
        pass


def resident_bytes() -> Optional[int]:
    """This process's resident memory (Linux), or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def backend_variants(names: Optional[Iterable[str]] = None, variants: Optional[Iterable[str]] = None,
                     missing_ok: bool = False) -> List[Any]:
    """Every (backend, variant) object to check: all installed backends by default. A
    named backend that is not installed raises, unless ``missing_ok``."""
    import kvquant

    chosen = list(names) if names else None
    out = []
    for name in chosen or kvquant.available_backends():
        try:
            ops = kvquant.get_backend(name)
        except kvquant.BackendNotFoundError:
            if chosen and not missing_ok:
                raise
            continue
        for variant, v_ops in ops.variants().items():
            if variants and variant not in variants:
                continue
            out.append(v_ops)
    return out
