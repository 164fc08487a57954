"""The NumPy backend, the reference of docs/spec.md: kernels.py (the spec's formulas,
step by step), runtime.py (arrays, dtypes, devices) and attention.py (the float64
reference). The same file names in backends/torch/ and backends/jax/."""
from __future__ import annotations

from kvquant._ops import CONTRACT, CONTRACT_V11, BackendOps, KernelSet

from . import kernels
from .runtime import runtime


class _Kernels(KernelSet):
    """The contract's functions of kernels.py, as they are."""

    UNITS = {name: () for name in CONTRACT + CONTRACT_V11}


def create_backend() -> BackendOps:
    return BackendOps(kernels.NAME, runtime, _Kernels(vars(kernels)), variant="eager")
