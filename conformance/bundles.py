"""How the quick profile checks every case in few calls: the cases of one format,
parameters and input dtype are laid out as the rows of one input, quantized and
dequantized once, and each case's rows of the outputs are compared with that case's
own expected bits (quantized in calls of CHUNK_ROWS rows).

That is the same check because quantization never looks across a token (per-token
formats) or across a block of G tokens (per-channel formats): docs/spec.md defines
each scale from its own token, group or (block, channel), and the invariance family
checks on every backend that a token alone and inside a batch give the same bits.
Columns are padded with zeros only where that adds no element to an existing group:
a zero never raises a token's amax, and a padded INT4/INT2 token gains whole groups
of its own. What a bundle does not exercise, each case's own shape and layout, is
what the shapes family (sampled case by case in the quick profile) and ``--full`` are
for.

Compiled variants (torch.compile, jax.jit, JAX op by op) specialise per shape: case
by case, a sample of 211 cases cost some 800 compilations per variant; as bundles,
all 1,299 bundleable cases need about 80 quantize compilations (one per format,
dtype and width) and 60 dequantize ones. Where a variant compiles per shape and dtype
(``compiles_per_shape``), bundles share more (``SharedCompilations``): a format's
group sizes take the input dtypes in turn, and every case whose dtype is not the one
paired with its group size rides as float32 rows, which by the spec's first step
(widening to float32, exact) are the same input; each bundle dequantizes into one
output dtype. Every case is still checked; what is given up is the cross product
(format, group size, input dtype, output dtype), which ``--full`` keeps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from kvquant._formats import FORMATS
from kvquant._spec import OUTPUT_DTYPES
from kvquant._types import Format

from .cases import DTYPES, NP_DTYPES, WIDTH, Case, Spec
from .reference import dequantize_with, output_names, quantize_with, reference_backend, reference_outputs
from .runner import Mismatch, with_arbiter, compare, to_backend

CHUNK_ROWS = 512  # a multiple of every G, so per-channel blocks never straddle a call


def bundleable(case: Case) -> bool:
    """Whether a case's bits can be checked as rows of a bundle: not the shapes family
    (its own shape and layout are what it checks), not an empty input, and per tensor
    only with a static scale and an input the whole tensor does not answer for (a
    dynamic scale comes from the whole input; a NaN or an out-of-range element makes
    every code of a per-tensor call NaN, which only "raise" cases are free of)."""
    if case.family == "shapes" or case.x.size == 0 or case.x.shape[-1] > WIDTH:
        return False
    if case.spec.format is Format.FP8_PER_TENSOR:
        return case.spec.static_scale is not None and case.on_nonfinite == "raise"
    return True


def paired_dtype(spec: Spec) -> Optional[str]:
    """Under ``SharedCompilations``, the input dtype a format's group size is compiled
    for: the format's group sizes take the input dtypes in turn (INT4: G32 float32,
    G64 float16, G128 bfloat16), so every (format, group size) and every (format,
    dtype) is compiled, not each (format, group size, dtype). None for formats without
    group sizes, which keep every dtype."""
    sizes = spec.info.group_sizes
    if not sizes or spec.group_size is None:
        return None
    return DTYPES[sizes.index(spec.group_size) % len(DTYPES)]


@dataclass(frozen=True)
class SharedCompilations:
    """How cases share calls on a variant: ``compiling`` where each new input shape or
    dtype compiles anew (the kernels' ``compiles_per_shape``) and the profile is quick."""

    compiling: bool = False

    def carrier_dtype(self, case: Case) -> str:
        """The input dtype of the bundle that carries ``case``: its own, or float32 rows
        where a compiling variant has not paired its dtype with its group size (a
        float16 or bfloat16 input widened to float32 is the spec's own first step, so the
        expected bits are the same)."""
        paired = paired_dtype(case.spec) if self.compiling else None
        if paired is None or case.dtype in (paired, "float32"):
            return case.dtype
        return "float32"

    def out_dtypes(self, spec: Spec, in_dtype: str) -> Tuple[str, ...]:
        """The output dtypes a call's outputs are dequantized into: every one, or for a
        compiling variant one, the dtype paired with the group size (else the input's),
        so that each (format, group size) and each (format, output dtype) is compiled."""
        if not self.compiling:
            return tuple(OUTPUT_DTYPES)
        return (paired_dtype(spec) or in_dtype,)


def _width(case: Case) -> int:
    """The bundle's row width for a case: WIDTH where zero columns join no group of the
    case's own; else the case's head_dim (a short last group, e.g. G = 64 on 96)."""
    head_dim = case.x.shape[-1]
    if case.spec.info.params == "group" and head_dim % case.spec.group_size:
        return head_dim
    return WIDTH


def _rows(case: Case) -> int:
    """How many rows (tokens of every leading index) a case fills."""
    return case.x.size // case.x.shape[-1]


@dataclass
class Bundle:
    """Cases of one spec and input dtype as rows of one [rows, width] input, quantized
    in calls of CHUNK_ROWS rows: every call of every bundle of a width has one shape,
    so compiled variants compile once per (format, dtype, width) and JAX op by op
    shares its compilations across formats."""

    spec: Spec
    dtype: str
    width: int
    out_dtypes: Tuple[str, ...] = tuple(OUTPUT_DTYPES)
    cases: List[Case] = field(default_factory=list)
    starts: Dict[str, int] = field(default_factory=dict)  # each case's first row, by case id
    used: int = 0  # rows the cases fill

    @property
    def rows(self) -> int:
        return -(-self.used // CHUNK_ROWS) * CHUNK_ROWS

    def add(self, case: Case) -> None:
        self.cases.append(case)
        self.starts[case.id] = self.used
        self.used += _rows(case)

    def input(self) -> np.ndarray:
        x = np.zeros((self.rows, self.width), NP_DTYPES[self.dtype])
        for case in self.cases:
            start = self.starts[case.id]
            x[start:start + _rows(case), :case.x.shape[-1]] = case.logical_input.reshape(-1, case.x.shape[-1])
        return x

    def _indexed_by(self, output: str) -> str:
        """What a bundle output's first axis counts: "rows" (codes, dequantized values,
        per-token and per-group parameters), "blocks" of G rows (per-channel ones) or
        "calls" (a per-tensor scale, one per call)."""
        if output == "codes" or output.startswith("dequant"):
            return "rows"
        return {"token": "rows", "group": "rows", "channel": "blocks", "tensor": "calls"}[self.spec.info.params]

    def rows_of(self, output: str, array: np.ndarray, start: int, stop: int) -> np.ndarray:
        """Rows start:stop (multiples of G for per-channel formats) of a bundle output in
        its 2-D rows layout."""
        kind = self._indexed_by(output)
        if kind == "rows":
            return array[start:stop]
        if kind == "blocks":
            return array[start // self.spec.group_size:stop // self.spec.group_size]
        call = start // CHUNK_ROWS  # a view, so that expected bits can be written in
        return array[call:call + 1].reshape(())

    def region(self, case: Case, output: str, array: np.ndarray) -> np.ndarray:
        """The part of a bundle output that belongs to ``case``: a view, for reading the
        backend's bits and for writing the case's expected ones."""
        info = self.spec.info
        start = self.starts[case.id]
        rows = self.rows_of(output, array, start, start + _rows(case))
        head_dim = case.x.shape[-1]
        if output == "codes":
            return rows[:, :head_dim // info.codes_per_byte]
        if output.startswith("dequant") or info.params == "channel":
            return rows[:, :head_dim]
        if info.params == "group":
            return rows[:, :-(-head_dim // self.spec.group_size)]
        return rows

    def calls(self, output: str, array: np.ndarray) -> List[np.ndarray]:
        """A bundle output cut into its calls' parts."""
        return [self.rows_of(output, array, lo, lo + CHUNK_ROWS) for lo in range(0, self.rows, CHUNK_ROWS)]

    def join(self, output: str, parts: Sequence[np.ndarray]) -> np.ndarray:
        """The calls' parts of one output as one bundle output."""
        return np.stack(parts) if self._indexed_by(output) == "calls" else np.concatenate(parts)


def make_bundles(cases: Sequence[Case], sharing: SharedCompilations = SharedCompilations()) -> List[Bundle]:
    """The bundleable cases grouped by (spec, input dtype, row width), in first-seen
    order; the input dtype is each case's carrier (``SharedCompilations``)."""
    bundles: Dict[Tuple, Bundle] = {}
    for case in cases:
        key = (case.spec, sharing.carrier_dtype(case), _width(case))
        if key not in bundles:
            bundles[key] = Bundle(case.spec, key[1], key[2], sharing.out_dtypes(case.spec, key[1]))
        bundles[key].add(case)
    return list(bundles.values())


def _dequantize_inputs(bundle: Bundle) -> List[np.ndarray]:
    """What dequantization is fed: each case's expected outputs in its own rows (as case
    by case, a quantize bug cannot hide a dequantize one), the reference's bits for zeros
    in the padding."""
    ref = reference_backend()
    zeros = np.zeros((CHUNK_ROWS, bundle.width), NP_DTYPES[bundle.dtype])
    one_call = [np.array(a) for a in quantize_with(ref, bundle.spec, zeros, "propagate")]
    calls = bundle.rows // CHUNK_ROWS
    base = [bundle.join(name, [a] * calls) for name, a in zip(output_names(bundle.spec), one_call)]
    for case in bundle.cases:
        expected = reference_outputs(case)
        for name, array in zip(output_names(bundle.spec), base):
            region = bundle.region(case, name, array)
            region[...] = expected[name].reshape(region.shape)
    return base


def run_bundle(ops, bundle: Bundle, device=None) -> Dict[str, List[Mismatch]]:
    """Each case's mismatches (by case id) from the bundle's quantize calls and its
    dequantize calls in each output dtype. Cases run with on_nonfinite="propagate":
    inputs of "raise" cases are finite, where the two agree bit for bit."""
    rt = ops.runtime
    found: Dict[str, List[Mismatch]] = {case.id: [] for case in bundle.cases}
    info = FORMATS[bundle.spec.format]
    names = output_names(bundle.spec)
    where = f"as rows of a [{bundle.rows}, {bundle.width}] {bundle.dtype} bundle of {len(bundle.cases)} cases"

    def fail_all(operation: str, output: str, message: str) -> None:
        for case in bundle.cases:
            found[case.id].append(Mismatch(ops.name, ops.variant, case.id, operation, output, f"{where}: {message}"))

    def crashed(operation: str, output: str, exc: Exception) -> None:
        fail_all(operation, output, f"raised {type(exc).__name__}: {exc}")

    def check(operation: str, output: str, array: np.ndarray, expected_key: str, shape: Tuple[int, ...]) -> None:
        # The whole output's shape first: a case's rows are a slice of it, and a slice
        # would not see extra columns.
        if tuple(array.shape) != tuple(shape):
            fail_all(operation, output, f"output shape {tuple(array.shape)}, expected {tuple(shape)}")
            return
        for case in bundle.cases:
            expected = reference_outputs(case)[expected_key]
            actual = np.ascontiguousarray(bundle.region(case, output, array)).reshape(expected.shape)
            m = compare(case, operation, output, expected, actual, ops.name, ops.variant)
            if m:
                m.message += f" ({where}; --full runs it alone)"
                found[case.id].append(with_arbiter(m, ops, case, expected_key))

    def on_backend(outs, in_device):
        for arr in outs:
            if rt.device(arr) != in_device:
                raise RuntimeError(f"returned on {rt.device(arr)}, input was on {in_device}")
        return [rt.to_numpy(arr) for arr in outs]

    shape = (CHUNK_ROWS, bundle.width)
    expected_inputs = _dequantize_inputs(bundle)  # the reference's outputs: their shapes are the expected ones
    try:
        parts = []
        for x in np.split(bundle.input(), bundle.rows // CHUNK_ROWS):
            x = to_backend(ops, x, device)
            parts.append(on_backend(quantize_with(ops, bundle.spec, x, "propagate"), rt.device(x)))
    except Exception as exc:  # a crash is a finding, reported on every case it hides
        crashed(info.quantize_method, "*", exc)
    else:
        for i, name in enumerate(names):
            joined = bundle.join(name, [p[i] for p in parts])
            check(info.quantize_method, name, joined, name, expected_inputs[i].shape)
    inputs = [bundle.calls(name, a) for name, a in zip(names, expected_inputs)]
    for dt in bundle.out_dtypes:
        try:
            parts = []
            for call in zip(*inputs):
                args = [to_backend(ops, a, device) for a in call]
                parts += on_backend([dequantize_with(ops, bundle.spec, args, shape, dt)], rt.device(args[0]))
        except Exception as exc:
            crashed(info.dequantize_method, f"dequant[{dt}]", exc)
            continue
        check(info.dequantize_method, f"dequant[{dt}]", np.concatenate(parts), "dequant:" + dt, (bundle.rows, bundle.width))
    return found


class SharedRun:
    """One bundle on one backend variant, run by whichever of its cases' checks comes
    first and dropped once each has taken its mismatches (memory stays flat)."""

    def __init__(self, ops, bundle: Bundle, device=None):
        self.ops, self.bundle, self.device = ops, bundle, device
        self._results = None
        self._left: set = set()

    def mismatches(self, case: Case) -> List[Mismatch]:
        if self._results is None:
            with np.errstate(all="ignore"):
                self._results = run_bundle(self.ops, self.bundle, self.device)
            self._left = set(self._results)
        found = self._results[case.id]
        self._left.discard(case.id)
        if not self._left:
            self._results = None
        return found
