"""Golden vectors: the lint (ids, counts, flags, coverage) and byte-for-byte reproduction."""
import itertools
import json

import pytest

from conftest import assert_same_bits
from kvquant.conformance import vectors
from kvquant.conformance.cases import DTYPES
from kvquant.conformance.reference import _REFERENCE_CACHE, reference_outputs

VERSIONS = ("1", "1.1")
FILES = {v: vectors.load_vectors(v) for v in VERSIONS}
DATA = FILES["1"]
TESTS = [(g, t) for g in DATA["testGroups"] for t in g["tests"]]
TESTS_V11 = [(g, t) for g in FILES["1.1"]["testGroups"] for t in g["tests"]]
ALL_TESTS = TESTS + TESTS_V11


@pytest.mark.parametrize("version", VERSIONS)
def test_ids_unique_and_counts_match(version):
    tests = [t for g in FILES[version]["testGroups"] for t in g["tests"]]
    ids = [t["tcId"] for t in tests]
    assert len(ids) == len(set(ids))
    assert FILES[version]["numberOfTests"] == len(ids)
    assert sorted(ids) == list(range(1, len(ids) + 1))


@pytest.mark.parametrize("version", VERSIONS)
def test_every_flag_is_documented_and_every_note_used(version):
    data = FILES[version]
    used = {f for g in data["testGroups"] for t in g["tests"] for f in t["flags"]}
    assert used == set(data["notes"]), f"undocumented {used - set(data['notes'])}, unused {set(data['notes']) - used}"


def test_spec_versions_match_library():
    import kvquant
    from kvquant._spec import SPEC_VERSIONS

    assert kvquant.SPEC_VERSION == SPEC_VERSIONS[-1] == "1.1"
    assert {v: FILES[v]["specVersion"] for v in VERSIONS} == {"1": "1", "1.1": "1.1"}
    # Each file holds its own version's formats only.
    from kvquant._formats import format_info
    for v in VERSIONS:
        assert {format_info(g["format"]).spec_version for g in FILES[v]["testGroups"]} == {v}


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


REQUIRED_V11 = {"Normal", "Layout2D", "Layout4D", "Subnormal", "NearSMin", "Huge", "NaN", "Inf", "ZeroTokens",
                "RoundingTie", "OutlierChannels"}


@pytest.mark.parametrize("fmt, dtype", list(itertools.product(["int2", "int4_per_channel", "int2_per_channel"], DTYPES)))
def test_coverage_of_each_v11_format_and_dtype(fmt, dtype):
    mine = [(g, t) for g, t in TESTS_V11 if g["format"] == fmt and g["inputDtype"] == dtype]
    flags = {f for _, t in mine for f in t["flags"]}
    assert REQUIRED_V11 <= flags, f"missing {REQUIRED_V11 - flags}"
    assert {g["groupSize"] for g, _ in mine} == {32, 64, 128}
    if fmt == "int2":
        assert {"ShortLastGroup", "AllZeroToken", "ConstantGroup"} <= flags
    else:
        assert {"ZeroChannel", "ConstantChannel", "TwoBlocks"} <= flags
    if dtype != "float16":
        assert {"RangeOverflow"} <= flags
        assert fmt == "int2" or "ZeroPointUnderflow" in flags


@pytest.mark.parametrize("group, test", ALL_TESTS, ids=[f"v{g['format']}-tc{t['tcId']}-{g['groupSize'] or ''}-{g['inputDtype']}-{t['comment']}" for g, t in ALL_TESTS])
def test_reference_reproduces_vector(group, test):
    case = vectors.vector_to_case(group, test)
    fresh = case.__class__(**{**case.__dict__, "expected": None, "id": case.id + "#fresh"})
    _REFERENCE_CACHE.pop(fresh.id, None)
    got = reference_outputs(fresh)
    for name, want in case.expected.items():
        assert_same_bits(want, got[name], f"tc{test['tcId']} {name}")


@pytest.mark.parametrize("version", VERSIONS)
def test_regenerating_gives_the_checked_in_file(version):
    assert json.loads(json.dumps(vectors.generate(version))) == FILES[version]


def test_unflushed_zero_point_in_the_reference_fails_the_pinned_vectors(monkeypatch):
    """The planted bug of issue 15 (zero = -(mn * inv) without flush_product) passed the
    whole suite; the zero-point-underflow vectors must catch it."""
    import numpy as np

    import kvquant.backends.numpy as reference
    from kvquant.backends.numpy import kernels
    from kvquant.conformance.runner import run_case
    from kvquant.conformance.vectors import golden_cases

    pinned = [c for c in golden_cases() if "ZeroPointUnderflow" in c.flags]
    # int4 g32/g64/g128 (v1), int4 and int2 per channel g32/g64/g128 (v1.1), x float32/bfloat16
    assert len(pinned) == 18
    ops = reference.create_backend()
    assert all(run_case(ops, c).passed for c in pinned)
    monkeypatch.setattr(kernels, "flush_product", lambda v: np.asarray(v, np.float32))
    failed = [c for c in pinned if any(m.output == "zeros" for m in run_case(ops, c).mismatches)]
    assert failed == pinned
