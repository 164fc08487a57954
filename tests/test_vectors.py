"""Golden vectors: the lint (ids, counts, flags, coverage) and byte-for-byte reproduction."""
import itertools
import json

import pytest

from conftest import assert_same_bits
from kvquant.conformance import vectors
from kvquant.conformance.cases import DTYPES
from kvquant.conformance.reference import _REFERENCE_CACHE, reference_outputs

DATA = vectors.load_vectors()
TESTS = [(g, t) for g in DATA["testGroups"] for t in g["tests"]]


def test_ids_unique_and_counts_match():
    ids = [t["tcId"] for _, t in TESTS]
    assert len(ids) == len(set(ids))
    assert DATA["numberOfTests"] == len(ids)
    assert sorted(ids) == list(range(1, len(ids) + 1))


def test_every_flag_is_documented_and_every_note_used():
    used = {f for _, t in TESTS for f in t["flags"]}
    assert used == set(DATA["notes"]), f"undocumented {used - set(DATA['notes'])}, unused {set(DATA['notes']) - used}"


def test_spec_version_matches_library():
    import kvquant

    assert DATA["specVersion"] == kvquant.SPEC_VERSION


REQUIRED = {"AllZeroToken", "ConstantGroup", "Subnormal", "NearSMin", "Fp8Midpoint", "PastFp8Max", "Huge", "NaN", "Inf",
            "Layout2D", "Layout4D", "ZeroTokens", "RoundingTie"}


@pytest.mark.parametrize("fmt, dtype", list(itertools.product(["fp8", "fp8_per_tensor", "int8", "int4"], DTYPES)))
def test_coverage_of_each_format_and_dtype(fmt, dtype):
    flags = {f for g, t in TESTS if g["format"] == fmt and g["inputDtype"] == dtype for f in t["flags"]}
    assert REQUIRED <= flags, f"missing {REQUIRED - flags}"
    if fmt == "int4":
        assert "ShortLastGroup" in flags
        assert {g["groupSize"] for g, _ in TESTS if g["format"] == "int4"} == {32, 64, 128}
        if dtype != "float16":
            assert "RangeOverflow" in flags
    head_dims = {t["shape"][-1] for g, t in TESTS if g["format"] == fmt and g["inputDtype"] == dtype}
    assert {64, 96, 128, 256} <= head_dims


def test_static_scale_edge_flags_present():
    flags = {f for g, t in TESTS for f in t["flags"]}
    assert {"StaticScale", "StaticScaleFlushesInput", "StaticScaleReciprocalFlushed"} <= flags


@pytest.mark.parametrize("group, test", TESTS, ids=[f"tc{t['tcId']}-{g['format']}-{g['groupSize'] or ''}-{g['inputDtype']}-{t['comment']}" for g, t in TESTS])
def test_reference_reproduces_vector(group, test):
    case = vectors.vector_to_case(group, test)
    fresh = case.__class__(**{**case.__dict__, "expected": None, "id": case.id + "#fresh"})
    _REFERENCE_CACHE.pop(fresh.id, None)
    got = reference_outputs(fresh)
    for name, want in case.expected.items():
        assert_same_bits(want, got[name], f"tc{test['tcId']} {name}")


def test_regenerating_gives_the_checked_in_file():
    assert json.loads(json.dumps(vectors.generate())) == DATA


def test_unflushed_zero_point_in_the_reference_fails_the_pinned_vectors(monkeypatch):
    """The planted bug of issue 15 (zero = -(mn * inv) without flush_product) passed the
    whole suite; the zero-point-underflow vectors must catch it."""
    import numpy as np

    import kvquant.backends.numpy_backend as reference
    from kvquant.conformance.runner import run_case
    from kvquant.conformance.vectors import golden_cases

    pinned = [c for c in golden_cases() if "ZeroPointUnderflow" in c.flags]
    assert len(pinned) == 6  # int4 g32/g64/g128 x float32/bfloat16
    ops = reference.create_backend()
    assert all(run_case(ops, c).passed for c in pinned)
    monkeypatch.setattr(reference, "flush_product", lambda v: np.asarray(v, np.float32))
    failed = [c for c in pinned if any(m.output == "zeros" for m in run_case(ops, c).mismatches)]
    assert failed == pinned
