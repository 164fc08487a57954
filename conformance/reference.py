"""Expected outputs: how the suite calls a backend for a format, and what the reference
(the NumPy backend) returns for a case. Below the runner and the golden vectors, which
both use it."""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence

import numpy as np

from kvquant._formats import FORMATS
from kvquant._spec import OUTPUT_DTYPES

from .cases import Case, Spec

_REFERENCE_CACHE: Dict[str, Dict[str, np.ndarray]] = {}


def reference_backend():
    from kvquant.backends.numpy import create_backend

    return create_backend()


def quantize_with(ops, spec: Spec, x, on_nonfinite: str):
    """The seed's quantize method of spec's format on ``ops``, on x of any rank."""
    shape = tuple(ops.runtime.shape(x))
    return FORMATS[spec.format].quantize(ops, x, math.prod(shape[:-1]), shape[-1], group_size=spec.group_size,
                                         static_scale=spec.static_scale, on_nonfinite=on_nonfinite)


def dequantize_with(ops, spec: Spec, outputs: Sequence[Any], shape, out_dtype: Any):
    return FORMATS[spec.format].dequantize(ops, outputs, math.prod(shape[:-1]), shape[-1], out_dtype, spec.group_size)


def output_names(spec: Spec):
    return FORMATS[spec.format].output_names


def reference_outputs(case: Case) -> Dict[str, np.ndarray]:
    """Expected bits for a case: the checked-in ones for golden vectors, else the
    reference's, cached by case id (a case id names its input completely)."""
    if case.expected is not None:
        return case.expected
    cached = _REFERENCE_CACHE.get(case.id)
    if cached is not None:
        return cached
    ref = reference_backend()
    x = case.logical_input
    outs = quantize_with(ref, case.spec, x, case.on_nonfinite)
    result = dict(zip(output_names(case.spec), outs))
    for dt in OUTPUT_DTYPES:
        result["dequant:" + dt] = dequantize_with(ref, case.spec, outs, x.shape, dt)
    _REFERENCE_CACHE[case.id] = result
    return result


def forget_reference_outputs() -> None:
    """Drop cached expected outputs (the command does, between backend variants that
    share no cases, to keep its memory flat)."""
    _REFERENCE_CACHE.clear()
