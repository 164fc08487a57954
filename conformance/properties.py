"""Property-based cases: hypothesis draws shapes, dtypes and magnitudes.

The profile is fixed (derandomized, no example database), so CI runs the same
examples every time; ``KVQUANT_HYPOTHESIS_EXAMPLES`` raises the count locally.
"""
from __future__ import annotations

import os
from typing import List

import numpy as np

from .bundles import SharedCompilations
from .cases import DTYPES, WIDTH, Spec, _make
from .runner import Mismatch, run_case

# Few, so compiled variants specialise few times; the first, which hypothesis draws
# first, the bundles' width, whose kernels a compiling variant has compiled already.
HEAD_DIMS = (WIDTH, 64, 96)


def run_property(ops, spec: Spec, device=None, examples: int = 25,
                 sharing: SharedCompilations = SharedCompilations()) -> List[Mismatch]:
    try:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st
    except ImportError:  # the suite still runs everything else
        return [Mismatch(ops.name, ops.variant, f"property/{spec.label}", "*", "*",
                         "hypothesis is not installed; install kvquant-bitexact[test] to run property cases")]
    examples = int(os.environ.get("KVQUANT_HYPOTHESIS_EXAMPLES", examples))
    found: List[Mismatch] = []

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(
        dtype=st.sampled_from(DTYPES),
        head_dim=st.sampled_from(HEAD_DIMS),
        lead=st.sampled_from([(1,), (3,), (7,), (1, 2, 3), (2, 1, 4)]),
        exponent=st.integers(min_value=-140, max_value=125),
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        outlier=st.booleans(),
    )
    def prop(dtype, head_dim, lead, exponent, seed, outlier):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal(lead + (head_dim,)) * 2.0**exponent
        if outlier:
            x[..., rng.integers(head_dim)] *= 64
        # The id names every drawn parameter: expected outputs are cached by case id.
        name = f"{'x'.join(map(str, lead))}x{head_dim}-2^{exponent}-seed{seed}" + ("-outlier" if outlier else "")
        case = _make("property", spec, dtype, name, np.clip(x, -3.4e38, 3.4e38), ("Property",))
        result = run_case(ops, case, device, sharing.out_dtypes(spec, dtype))
        if result.mismatches:
            found[:] = result.mismatches
            raise AssertionError(str(result.mismatches[0]))

    try:
        prop()
    except Exception as exc:  # AssertionError, or an ExceptionGroup of several draws' failures
        if found:
            return found
        return [Mismatch(ops.name, ops.variant, f"property/{spec.label}", "*", "*",
                         f"property failed: {type(exc).__name__}: {exc}")]
    return []
