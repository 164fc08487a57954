"""The conformance suite over every built-in backend and variant, one test per check;
and proof that it catches real bugs and reports them usefully."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import kvquant
from broken_backends import BROKEN, make_broken
from kvquant.conformance.runner import backend_variants
from kvquant.conformance.suite import (
    SUITE_FAMILIES,
    KnownFailures,
    UnmatchedKnownFailureWarning,
    format_table,
    iter_checks,
    run_checks,
    warn_unmatched,
)

BUILTIN = [n for n in ("numpy", "torch", "jax") if n == "numpy" or __import__("importlib").util.find_spec(n)]
# The spec transcription (the example backend) over every family: the NumPy rows compare
# the reference with itself outside the golden vectors, so only this row holds the
# reference to the spec there (a zero point left unflushed failed nothing else).
# The variants that compile every shape anew (torch.compile, jax.jit, JAX op by op) run
# the command's quick profile, compilations shared (conformance/bundles.py,
# SharedCompilations): every case that can share a call is checked as rows of a bundle,
# the others one per (family, format). Case by case, every golden vector and shape case
# was a compilation of its own: on a fresh machine (empty Inductor cache) CI's pytest
# took 29 min 28 s on 2 cores, over its budget. What sharing gives up is the cross
# product (format, group size, input dtype, output dtype), which the eager variants,
# the reference and the spec transcription still check case by case here, and
# `kvquant conformance --full` on every variant; test_compiling_variants_* below hold
# that sharing still checks every bundleable case and catches every planted bug.
COMPILING = {("torch", "compile"), ("jax", "eager"), ("jax", "jit")}


def _checks():
    checks = []
    for ops in backend_variants(BUILTIN + ["example"]):
        checks += list(iter_checks([ops], profile="quick" if (ops.name, ops.variant) in COMPILING else "full"))
    return checks


CHECKS = _checks()


def _group(check) -> str:
    """One xdist group per backend variant and kernel family: each torch.compile / jax.jit
    specialisation is compiled by one worker only, and the compile-heavy variants still
    spread over both cores (fp8 and fp8_per_tensor share their dequantize kernel)."""
    family = check.label.split("-")[0].split("_")[0]
    return f"{check.backend}-{check.variant}-{family}"


@pytest.mark.parametrize("check", [pytest.param(c, marks=pytest.mark.xdist_group(_group(c))) for c in CHECKS],
                         ids=[c.id for c in CHECKS])
def test_builtin_backend_conforms(check):
    mismatches = check.run()
    assert not mismatches, "\n".join(str(m) for m in mismatches[:5])


def test_every_builtin_variant_is_checked():
    seen = {(c.backend, c.variant) for c in CHECKS}
    expected = {("numpy", "eager"), ("example", "eager")}
    if "torch" in BUILTIN:
        expected |= {("torch", "eager"), ("torch", "compile")}
    if "jax" in BUILTIN:
        expected |= {("jax", "eager"), ("jax", "jit")}
    assert seen == expected


# ------------------------------------------------------------ broken backends
@pytest.fixture(scope="module")
def broken_outcomes():
    return {name: run_checks(iter_checks([make_broken(name)], families=("golden", "fp8-boundary", "rounding-ties", "degenerate", "shapes")))
            for name in BROKEN}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_suite_fails_broken_backend_where_the_bug_is(broken_outcomes, name):
    _, operation, output = BROKEN[name]
    failed = [o for o in broken_outcomes[name] if o.status == "fail"]
    assert failed, f"the suite passed the broken backend {name!r}"
    firsts = [o.mismatches[0] for o in failed]
    assert any(m.operation == operation and m.output == output for m in firsts), \
        f"{name}: expected failures in {operation} -> {output}, got {sorted({(m.operation, m.output) for m in firsts})}"
    hit = next(m for m in firsts if m.operation == operation and m.output == output)
    text = str(hit)
    for part in (f"broken-{name}", operation, hit.case_id, "first mismatch at index", "expected 0x", "actual 0x", "input bits", "elements differ"):
        assert part in text, f"report lacks {part!r}:\n{text}"


def test_swapped_nibbles_report_shows_the_swap(broken_outcomes):
    m = next(o.mismatches[0] for o in broken_outcomes["swapped-nibbles"] if o.status == "fail")
    e, a = int(m.expected_hex, 16), int(m.actual_hex, 16)
    assert a == ((e >> 4) | (e << 4)) & 0xFF


def test_cast_without_clamp_report_shows_nan_past_448(broken_outcomes):
    m = next(o.mismatches[0] for o in broken_outcomes["cast-without-clamp"] if o.status == "fail")
    assert m.expected_hex in ("0x7e", "0xfe") and m.actual_hex in ("0x7f", "0xff")


def test_round_half_away_report_shows_a_tie(broken_outcomes):
    tie = [o.mismatches[0] for o in broken_outcomes["round-half-away"] if o.status == "fail" and "ties" in o.check.id]
    assert tie, "no rounding-tie case caught round-half-away"
    assert abs(int(tie[0].expected_hex, 16) - int(tie[0].actual_hex, 16)) == 1


def test_a_correct_backend_passes_the_same_families(broken_outcomes):
    # Guards the test above: the families used are passable by a correct implementation.
    outcomes = run_checks(iter_checks([kvquant.get_backend("example")], families=("golden", "fp8-boundary", "rounding-ties", "degenerate", "shapes")))
    assert outcomes and all(o.status == "pass" for o in outcomes)


def test_table_counts_failures():
    outcomes = run_checks(iter_checks([make_broken("swapped-nibbles")], families=("rounding-ties",)))
    table = format_table(outcomes)
    assert "broken-swapped-nibbles / eager" in table
    assert "0/2!" in table  # the int4 tie cases (half-integers, products-on-ties) fail ...
    assert "2/2" in table   # ... and the int8 ones pass


# ------------------------------------------------------------ known failures
def test_known_failures_mark_expected_and_warn_on_stale(tmp_path):
    path = tmp_path / "known.json"
    path.write_text(json.dumps({"knownFailures": [
        {"id": "broken-swapped-nibbles-eager/rounding-ties/int4-*", "reason": "nibbles swapped on purpose"},
        {"id": "broken-swapped-nibbles-eager/no-such-family/*", "reason": "stale"},
    ]}))
    known = KnownFailures.load([str(path)])
    checks = list(iter_checks([make_broken("swapped-nibbles")], families=("rounding-ties",)))
    with pytest.warns(UnmatchedKnownFailureWarning, match="no-such-family"):
        stale = warn_unmatched(known, (c.id for c in checks))
    assert stale == ["broken-swapped-nibbles-eager/no-such-family/*"]
    outcomes = run_checks(checks, known)
    assert {o.status for o in outcomes if "/int4-g" in o.check.id} == {"known"}
    assert {o.status for o in outcomes if "int8" in o.check.id} == {"pass"}


# ------------------------------------------------------ plugin and command
def run(cmd, cwd, env=None):
    full_env = {**os.environ, **(env or {})}
    full_env.pop("KVQUANT_BACKEND", None) if env is None or "KVQUANT_BACKEND" not in env else None
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=full_env,
                          timeout=900)  # a hang fails the test instead of stalling CI


def test_plugin_runs_suite_for_third_party_backend(tmp_path):
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--kvquant-backend", "example",
               "--kvquant-family", "golden", "--kvquant-family", "invariance"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_plugin_reads_backend_from_environment(tmp_path):
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--kvquant-family", "rounding-ties",
               "--collect-only"], tmp_path, {"KVQUANT_BACKEND": "example"})
    assert "example-eager/rounding-ties/int8/float32/half-integers" in out.stdout


def test_plugin_is_inert_without_a_backend(tmp_path):
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only"], tmp_path)
    assert "no tests collected" in out.stdout or "no tests ran" in out.stdout


def test_plugin_reports_failures_with_ids(tmp_path):
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import kvquant
        from broken_backends import make_broken
        kvquant.register_backend("broken-swapped-nibbles", make_broken("swapped-nibbles"))
    """))
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--kvquant-backend", "broken-swapped-nibbles",
               "--kvquant-family", "rounding-ties"], tmp_path)
    assert out.returncode == 1
    assert "FAILED" in out.stdout and "broken-swapped-nibbles-eager/rounding-ties/int4-g32/float32/half-integers" in out.stdout
    assert "quantize_kv_int4 -> codes" in out.stdout and "first mismatch at index" in out.stdout


def test_command_checks_third_party_backend_and_writes_json(tmp_path):
    report = tmp_path / "report.json"
    out = run([sys.executable, "-m", "kvquant.cli", "conformance", "--backend", "example", "--family", "golden",
               "--full", "--json", str(report)], tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    data = json.loads(report.read_text())
    assert data["failed"] == 0 and data["passed"] == len(data["checks"]) > 300
    assert "example / eager" in out.stdout


def test_command_exits_nonzero_on_mismatch(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import kvquant
        from broken_backends import make_broken
        from kvquant.cli import main
        kvquant.register_backend("broken-divide-not-multiply", make_broken("divide-not-multiply"))
        sys.exit(main(["conformance", "--backend", "broken-divide-not-multiply", "--family", "golden", "--full"]))
    """)
    out = run([sys.executable, "-c", script], tmp_path)
    assert out.returncode == 1
    assert "FAIL broken-divide-not-multiply-eager/golden/int8" in out.stdout


def test_info_lists_backends(tmp_path):
    out = run([sys.executable, "-m", "kvquant.cli", "info"], tmp_path)
    assert out.returncode == 0
    assert "numpy" in out.stdout and "example" in out.stdout and "devices" in out.stdout


def test_raise_check_catches_infinite_scales():
    """A backend that stores +inf tokens with an infinite scale (not NaN) raises for NaN
    but silently accepts infinities: the raise check has inf-only tokens for it."""
    checks = [c for c in iter_checks([make_broken("inf-scale-not-nan")], families=("invariance",))
              if c.id.endswith("/raise")]
    failed = [o for o in run_checks(checks) if o.status == "fail"]
    assert failed, "the raise check passed a backend that never raises for infinities"
    assert all("+-inf and no NaN" in str(o.mismatches) for o in failed)


def test_mismatch_names_what_the_transcription_says():
    outcomes = run_checks(iter_checks([make_broken("round-half-away")], families=("rounding-ties",)))
    first = next(o.mismatches[0] for o in outcomes if o.status == "fail")
    assert "spec transcription" in first.message and "sides with the reference" in first.message


def test_property_ids_name_every_drawn_parameter(monkeypatch):
    """Expected outputs are cached by case id: two draws differing only in the outlier
    flag once shared one id, and a correct backend failed against itself."""
    monkeypatch.setenv("KVQUANT_HYPOTHESIS_EXAMPLES", "100")
    outcomes = run_checks(iter_checks([kvquant.get_backend("numpy")], families=("property",)))
    # 6 of spec v1, 3 of v1.1 (one group size each)
    assert [o.status for o in outcomes] == ["pass"] * 9, [str(o.mismatches[:1]) for o in outcomes]


def test_reference_row_says_how_it_is_checked():
    table = format_table(run_checks(iter_checks([kvquant.get_backend("numpy")], families=("golden",))))
    assert "golden vectors" in table and "transcription" in table


def test_quick_profile_reaches_every_format_dtype_and_family():
    from kvquant.conformance.bundles import bundleable
    from kvquant.conformance.suite import CASE_FAMILIES, all_cases

    quick = list(iter_checks([kvquant.get_backend("numpy")], profile="quick"))
    full = list(iter_checks([kvquant.get_backend("numpy")], profile="full"))
    cells = lambda checks: {(c.family, c.label, c.dtype) for c in checks}  # noqa: E731
    formats = lambda checks: {(c.family, c.label.split("-g")[0], c.dtype) for c in checks}  # noqa: E731
    assert formats(quick) == formats(full)
    # The property draws and invariances take one group size per format; the case
    # families reach every group size.
    in_cases = lambda checks: cells(c for c in checks if c.family not in ("property", "invariance"))  # noqa: E731
    assert in_cases(quick) == in_cases(full)
    # Every case that can share a bundle is checked; of the others, per cell the one
    # with the most edge-case flags stands for it.
    cases = all_cases(tuple(CASE_FAMILIES))
    quick_ids = {c.id.split("/", 1)[1] for c in quick}
    assert {c.id for c in cases if bundleable(c)} <= quick_ids
    alone = [c for c in cases if not bundleable(c)]
    assert len([c for c in alone if c.id in quick_ids]) < len(alone) / 3
    for cell in {(c.family, c.spec.label, c.dtype) for c in alone}:
        members = [c for c in alone if (c.family, c.spec.label, c.dtype) == cell]
        assert [len(c.flags) for c in members if c.id in quick_ids] == [max(len(c.flags) for c in members)], cell


# Bugs that read across tokens, channels or blocks: in a bundle they read the padding or
# the other cases' rows too, so a case fails there with a different first difference
# (or, under "raise" alone, raises where the bundle's "propagate" returns codes).
MIXES_NEIGHBOURS = {"groups-span-tokens", "channel-token-axes-swapped", "channel-stats-over-history"}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_bundles_fail_every_case_that_fails_alone(name):
    """The quick profile's bundles (rows of many cases in one call) hide no failure: each
    bundled case the broken backend fails case by case also fails in its bundle, in the
    same operation and output, with the index in the case's own coordinates."""
    from kvquant.conformance.bundles import bundleable
    from kvquant.conformance.suite import all_cases

    families = ("golden", "fp8-boundary", "rounding-ties", "degenerate")
    ops = make_broken(name)
    ids = {f"broken-{name}-eager/{c.id}" for c in all_cases(families) if bundleable(c)}
    alone = {o.check.id: o for o in run_checks(iter_checks([ops], families=families, profile="full"))}
    bundled = {o.check.id: o for o in run_checks(iter_checks([ops], families=families, profile="quick"))
               if o.check.id in ids}
    assert len(bundled) == len(ids)
    missed = [cid for cid, o in alone.items() if o.status == "fail" and cid in bundled and bundled[cid].status != "fail"]
    assert not missed, f"{len(missed)} cases fail alone but pass in their bundle, e.g. {missed[:3]}"
    for cid, o in bundled.items():
        if o.status == "fail" and alone[cid].status == "fail":
            first, same = o.mismatches[0], alone[cid].mismatches[0]
            if name not in MIXES_NEIGHBOURS:  # elementwise bugs: the same first difference
                assert (first.operation, first.output, first.index, first.expected_hex, first.actual_hex,
                        first.input_hex) == (same.operation, same.output, same.index, same.expected_hex,
                                             same.actual_hex, same.input_hex), cid


def _compiling(ops):
    """The backend as a compiling variant (each new shape or dtype compiled anew) looks
    to the quick profile."""
    ops.kernels.compiles_per_shape = True
    return ops


def test_compiling_variants_check_every_case_in_fewer_compilations():
    """Where each new shape or dtype compiles, the quick profile still checks every
    bundleable case and reaches every (format, group size) and (format, dtype), in calls
    of far fewer distinct (kernel, group size, dtype, width) than the plain quick profile."""
    from kvquant.conformance.bundles import SharedCompilations, bundleable, make_bundles
    from kvquant.conformance.cases import DTYPES
    from kvquant.conformance.suite import CASE_FAMILIES, all_cases

    cases = [c for c in all_cases(tuple(CASE_FAMILIES)) if bundleable(c)]
    plain, shared = make_bundles(cases), make_bundles(cases, SharedCompilations(True))
    assert sorted(c.id for b in shared for c in b.cases) == sorted(c.id for c in cases)
    quantize_calls = lambda bundles: {(b.spec.format, b.spec.group_size, b.dtype, b.width) for b in bundles}  # noqa: E731
    dequantize_calls = lambda bundles: {(b.spec.info.kernel, b.spec.group_size, dt, b.width)  # noqa: E731
                                        for b in bundles for dt in b.out_dtypes}
    assert len(quantize_calls(shared)) < 0.7 * len(quantize_calls(plain))
    assert len(dequantize_calls(shared)) < 0.4 * len(dequantize_calls(plain))
    reached = lambda f: {f(b) for b in shared}  # noqa: E731
    formats = {c.spec.format for c in cases}
    assert reached(lambda b: (b.spec.format, b.dtype)) == {(f, d) for f in formats for d in DTYPES}
    assert reached(lambda b: (b.spec.format, b.spec.group_size)) == {(c.spec.format, c.spec.group_size) for c in cases}
    assert {(b.spec.format, dt) for b in shared for dt in b.out_dtypes} == {(f, d) for f in formats for d in DTYPES}
    # A case rides in another dtype's bundle only as float32 rows, which hold its input exactly.
    assert all(b.dtype in (c.dtype, "float32") for b in shared for c in b.cases)
    # And the checks that result pass on a correct backend and name each case as its own.
    ops = _compiling(make_broken("none"))
    checks = list(iter_checks([ops], families=("golden", "rounding-ties", "shapes"), profile="quick"))
    assert {c.id.split("/", 1)[1] for c in checks} >= {c.id for c in cases if c.family in ("golden", "rounding-ties")}
    assert {(c.family, c.format) for c in checks if c.family == "shapes"} == \
        {("shapes", c.spec.format.value) for c in all_cases(("shapes",))}
    assert all(o.status == "pass" for o in run_checks(checks))


def test_invariance_checks_reuse_the_kernels_the_bundles_compiled():
    """On a variant that compiles per shape, every quantization the invariance checks
    run on several tokens, and every dequantization of every-code and caller-params into
    a dtype the bundles dequantize into, has a (kernel, dtype, width, arguments) the
    bundles' calls already had: a width of their own cost torch.compile 23 graphs."""
    import numpy as np

    from kvquant.conformance.suite import CASE_FAMILIES

    ops = _compiling(make_broken("none"))
    calls, phase = {"bundles": set(), "invariance": set()}, ["bundles"]

    def recorded(name, impl):
        def kernel(*args):
            first = args[0]
            rest = tuple(a if isinstance(a, (int, str)) or a is None else type(a).__name__
                         for a in args[1:] if not isinstance(a, np.ndarray))
            # Dynamo specialises a dimension of size 1: one token is a kernel of its own.
            calls[phase[0]].add((name, str(first.dtype), first.shape[1:], first.shape[0] == 1, rest))
            return impl(*args)
        return kernel

    for name in dir(ops.kernels):
        if name.endswith(("_quantize", "_dequantize", "_quantize_per_token", "_quantize_per_tensor")):
            setattr(ops.kernels, name, recorded(name, getattr(ops.kernels, name)))
    checks = list(iter_checks([ops], families=tuple(CASE_FAMILIES) + ("invariance",), profile="quick"))
    for check in checks:
        phase[0] = "invariance" if check.family == "invariance" else "bundles"
        assert not check.run(), check.id
    bundled = calls["bundles"]
    out_dtypes = {(k[0], k[-1]) for k in bundled}
    new = {k for k in calls["invariance"] - bundled
           if not k[3] and ("quantize" in k[0].replace("dequantize", "") or (k[0], k[-1]) in out_dtypes)}
    # A dynamic per-tensor scale comes from the whole input, so no bundle holds one:
    # that kernel is compiled by the invariance checks, at the bundles' width.
    assert new == {("fp8_quantize_per_tensor", "float32", (256,), False, (None,))}, sorted(new)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_compiling_variants_still_catch_every_bug_in_every_format_it_touches(name):
    """Sharing compilations gives up the cross product (format, group size, input dtype,
    output dtype), not a bug: every format whose cases a broken backend fails case by
    case still has a failing case in the compiling quick profile."""
    families = ("golden", "fp8-boundary", "rounding-ties", "degenerate")
    fmt = lambda o: o.check.format  # noqa: E731
    alone = run_checks(iter_checks([make_broken(name)], families=families, profile="full"))
    shared = run_checks(iter_checks([_compiling(make_broken(name))], families=families, profile="quick"))
    failing_alone = {fmt(o) for o in alone if o.status == "fail"}
    assert failing_alone, name
    assert {fmt(o) for o in shared if o.status == "fail"} == failing_alone


# ------------------------------------------------------ spec v1 backends stay checkable
def test_a_v1_only_backend_is_reported_as_not_implementing_v11():
    ops = make_broken("none", versions=("1",))
    checks = list(iter_checks([ops], families=("golden", "invariance")))
    unimplemented = [c for c in checks if c.family == "unimplemented"]
    assert sorted(c.label for c in unimplemented) == ["int2", "int2_per_channel", "int4_per_channel"]
    assert not any(("int2" in c.label or "channel" in c.label) and c.family != "unimplemented" for c in checks)
    outcomes = run_checks(checks)
    assert {o.status for o in outcomes if o.check.family == "unimplemented"} == {"unimplemented"}
    assert all(o.status == "pass" for o in outcomes if o.check.family != "unimplemented")
    table = format_table(outcomes)
    assert "3 formats not implemented (n/i)" in table and "n/i" in table


def test_requiring_v11_fails_a_v1_only_backend():
    ops = make_broken("none", versions=("1",))
    outcomes = run_checks(iter_checks([ops], families=("golden",), require=("1.1",)))
    failed = [o for o in outcomes if o.status == "fail"]
    assert sorted(o.check.label for o in failed) == ["int2", "int2_per_channel", "int4_per_channel"]
    assert "spec v1.1 is required" in failed[0].mismatches[0].message


def test_calling_an_unimplemented_format_names_the_spec_version():
    import numpy as np

    ops = make_broken("none", versions=("1",))
    with pytest.raises(NotImplementedError, match=r"int4_per_channel \(spec v1.1\)"):
        ops.quantize_kv_int4_per_channel(np.zeros((32, 64), np.float32), 32, 64, 32)


def test_bundles_check_the_whole_output_shape():
    """A case's rows are a slice of the bundle's output, which would not see columns a
    backend added: the bundle checks the whole output's shape first (a backend built on
    BackendOps fails earlier, where it reshapes; this one returns what it likes)."""
    import numpy as np

    reference = kvquant.get_backend("numpy")

    class WideCodes:
        name, variant = "wide-codes", "eager"

        def __getattr__(self, attr):
            return getattr(reference, attr)

        def quantize_kv_int8(self, *args, **kwargs):
            codes, scales = reference.quantize_kv_int8(*args, **kwargs)
            return np.pad(codes, ((0, 0), (0, 4))), scales

    outcomes = run_checks(c for c in iter_checks([WideCodes()], families=("golden",), profile="quick")
                          if "/int8/" in c.id and "/golden/" in c.id)
    assert outcomes and all(o.status == "fail" for o in outcomes)
    bundled = [o.mismatches[0].message for o in outcomes if "bundle of" in o.mismatches[0].message]
    assert len(bundled) > len(outcomes) / 2  # the others (an empty input) run alone
    assert all("output shape" in m and "expected (512, 256)" in m for m in bundled)


# ------------------------------------------------------ the first run's sample
def test_first_run_profile_is_a_sample_of_the_quick_one(monkeypatch):
    """With a cold compile cache the default run checks the first profile: on compiling
    variants the bundles at one group size per format (every format still checked), on
    the others everything but the checks that compile; always a subset of the quick
    profile's checks, with the same ids."""
    from kvquant._formats import FORMATS

    for compiling in (False, True):
        ops = backend_variants(["numpy"])[0]
        monkeypatch.setattr(ops.kernels, "compiles_per_shape", compiling, raising=False)
        quick = {c.id: c for c in iter_checks([ops], profile="quick")}
        first = {c.id: c for c in iter_checks([ops], profile="first")}
        assert set(first) < set(quick)
        assert {c.format for c in first.values()} == {f.value for f in FORMATS}
        skipped = {quick[i].family for i in set(quick) - set(first)}
        if compiling:
            assert {c.family for c in first.values()} <= set(SUITE_FAMILIES) - {"property", "invariance"}
            assert len(first) < 0.7 * len(quick)
        else:
            assert skipped == {"invariance"}
            assert all(i.endswith("/seed-types") for i in set(quick) - set(first))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_first_run_profile_still_fails_every_broken_backend(name):
    """The sample a first run checks on a compiling variant still fails every planted
    bug of tests/broken_backends.py in at least one format."""
    families = ("golden", "fp8-boundary", "rounding-ties", "degenerate")
    first = run_checks(iter_checks([_compiling(make_broken(name))], families=families, profile="first"))
    assert any(o.status == "fail" for o in first), name


def test_a_cold_framework_gets_the_first_profile_and_every_check_turns_it_off(monkeypatch):
    """The lane decides once per variant: a framework whose compile cache is empty gets
    the first profile and says how many checks it leaves; --every-check keeps quick."""
    from kvquant.conformance import scheduler as cli

    monkeypatch.setattr(cli, "_empty_compile_caches", lambda: {"numpy": "NumPy's"})
    for sample, profile in ((True, "first"), (False, "quick")):
        told = []
        options = {"chosen": True, "variants": [], "families": ["golden", "invariance"], "device": None,
                   "profile": "quick", "require": [], "known_files": [], "release_above": 2 ** 40,
                   "first_run_sample": sample}
        answers = iter([True] * 100)

        def ask(request):
            return next(answers) if request[0] == "claim" else None

        cli._run_lane(["numpy"], options, lambda kind, key, payload: told.append((kind, payload)), ask)
        (ready,) = [p for k, p in told if k == "ready"]
        assert ready[0]["profile"] == profile and ready[0]["empty_caches"] == ["NumPy's"]
        assert (ready[0]["deferred"] > 0) == sample
        outcomes = [p for k, p in told if k == "outcome"]
        assert len(outcomes) == len(ready[0]["ids"]) and not any(o["mismatches"] for o in outcomes)
