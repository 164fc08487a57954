"""The suite as a list of named checks, shared by the pytest plugin and the command.

Each check has an id ``backend-variant/family/format/dtype/name`` and a function
returning the mismatches it found (an empty list is a pass).
"""
from __future__ import annotations

import fnmatch
import functools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import cases as C
from .bundles import SharedCompilations, SharedRun, bundleable, make_bundles, paired_dtype
from .runner import INVARIANCE_CHECKS, Mismatch, run_case, run_invariance
from .vectors import golden_cases

# Case families, each a generator of framework-neutral inputs (conformance/cases.py),
# then the two families that draw or build their inputs as they run.
CASE_FAMILIES = {
    "golden": golden_cases,
    "exhaustive16": C.exhaustive16_cases,
    "fp8-boundary": C.fp8_boundary_cases,
    "rounding-ties": C.rounding_tie_cases,
    "realistic": C.realistic_cases,
    "degenerate": C.degenerate_cases,
    "shapes": C.shape_cases,
}
SUITE_FAMILIES = tuple(CASE_FAMILIES) + ("property", "invariance")
# Where a backend's kernels lack a format of a later spec version: one check per format,
# reported as not implemented (a failure only for a version the caller requires).
UNIMPLEMENTED = "unimplemented"
KNOWN_FAILURES_DIR = Path(__file__).with_name("known_failures")
REFERENCE_BACKEND = "numpy"


@dataclass
class Check:
    id: str
    backend: str
    variant: str
    family: str
    label: str  # format label
    dtype: str
    run: Callable[[], List[Mismatch]]
    flags: Tuple[str, ...] = ()  # the edge cases its input covers (case families)
    not_implemented: bool = False  # the backend lacks this format (family "unimplemented")
    format: str = ""  # the format's name: a variant's checks are shared out by format (conformance/scheduler.py)


def _variant_id(ops) -> str:
    return f"{ops.name}-{ops.variant}"


PROFILES = ("quick", "first", "full")
# The first profile: what the default run checks on a variant whose framework's compile
# cache is empty, so that a first run answers in minutes rather than compiling every
# kernel (docs/conformance.md, "First run"): on compiling variants every format's
# bundled cases at one group size (_first_run_groups), a few compiled quantize and
# dequantize calls per format; on the others the quick profile without the checks that compile
# (seed-types traces the seed's calls under the framework's compiler).
FIRST_RUN_SKIPPED_INVARIANCE = ("seed-types",)
# The quick profile: per backend variant and (family, format, dtype) cell, at most this
# many cases, chosen to cover the cell's edge-case flags first; fewer property draws.
QUICK_CASES_PER_CELL = 1
QUICK_PROPERTY_EXAMPLES = 3
QUICK_PROPERTY_EXAMPLES_COMPILING = 1  # each draw is a new shape to compile
QUICK_INT4_GROUP = 64  # the property draws and invariances of the quick profile take INT4 at this G


@functools.lru_cache(maxsize=4)
def all_cases(families: Tuple[str, ...] = tuple(CASE_FAMILIES)) -> Tuple[C.Case, ...]:
    # A family yields None where a format cannot take its input's head_dim.
    cases = tuple(case for family in families for case in CASE_FAMILIES[family]() if case is not None)
    seen = set()
    for c in cases:
        if c.id in seen:
            raise AssertionError(f"duplicate case id {c.id}")
        seen.add(c.id)
    return cases


def sample_cases(cases: Sequence[C.Case], per_cell: int, sharing: SharedCompilations = SharedCompilations()) -> List[C.Case]:
    """At most ``per_cell`` cases of each (family, format label, dtype) cell, or for a
    compiling variant (``sharing``; every case is a compilation of its own) of each
    (family, format) cell, the bundles having reached every dtype: first the case whose
    flags add the most not yet covered in its cell; among equals, one whose group size
    is paired with its dtype (bundles.paired_dtype), then one whose input shape an
    earlier pick already has (compiled variants specialise per shape, so a new shape is
    a new compilation), then the family's own order. The result keeps the cases' order."""
    cells: Dict[tuple, List[C.Case]] = {}
    for case in cases:
        key = (case.family, case.spec.format) if sharing.compiling else (case.family, case.spec.label, case.dtype)
        cells.setdefault(key, []).append(case)
    chosen, shapes = set(), set()
    for members in cells.values():
        covered: set = set()
        for _ in range(min(per_cell, len(members))):
            rest = [c for c in members if c.id not in chosen]
            # max() keeps the first of equal keys: the family's own order.
            best = max(rest, key=lambda c: (len(set(c.flags) - covered), paired_dtype(c.spec) in (None, c.dtype),
                                            c.x.shape in shapes))
            chosen.add(best.id)
            shapes.add(best.x.shape)
            covered |= set(best.flags)
    return [c for c in cases if c.id in chosen]


def implements(ops, spec: C.Spec) -> bool:
    """Whether a backend's kernels have the functions of spec's format (the v1.1 formats
    are optional: a backend written for v1 stays checkable)."""
    from kvquant._ops import CONTRACT

    return all(n in CONTRACT or getattr(ops.kernels, n, None) is not None for n in spec.info.kernel_names)


def _unimplemented_check(ops, fmt, required: bool) -> Check:
    from kvquant._formats import FORMATS

    info = FORMATS[fmt]
    cid = f"{_variant_id(ops)}/{UNIMPLEMENTED}/{fmt.value}/any/spec-v{info.spec_version}"

    def run():
        if not required:
            return []
        return [Mismatch(ops.name, ops.variant, cid, info.quantize_method, "*",
                         f"{fmt.value} (spec v{info.spec_version}) is not implemented, and spec "
                         f"v{info.spec_version} is required: its kernels lack {' / '.join(info.kernel_names)}")]
    return Check(cid, ops.name, ops.variant, UNIMPLEMENTED, fmt.value, "any", run, not_implemented=True,
                 format=fmt.value)


def iter_checks(ops_list: Sequence[Any], families: Optional[Iterable[str]] = None, device: Optional[str] = None,
                property_examples: Optional[int] = None, profile: str = "full",
                require: Iterable[str] = (), share_compilations: bool = True) -> Iterator[Check]:
    """Every check of the suite for each backend variant in ``ops_list``. ``profile``
    "full" runs every case on its own; "quick" every case that can share a call as rows
    of a bundle (conformance/bundles.py), a sample of the others that still reaches
    every cell (sample_cases), fewer property draws, and property draws and
    invariances at one group size per format; on variants that compile per shape, unless
    ``share_compilations`` is False, with compilations shared (bundles.SharedCompilations).
    "first" is the quick profile for a first run with cold compile caches: on variants
    that compile per shape only the bundles at one group size per format; on the
    others no check that compiles (FIRST_RUN_SKIPPED_INVARIANCE).
    A format
    a backend does not implement gets one "unimplemented" check instead of its cases,
    which fails only if its spec version is in ``require``."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; expected one of {', '.join(PROFILES)}")
    families = tuple(families) if families else SUITE_FAMILIES
    unknown = set(families) - set(SUITE_FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; expected some of {', '.join(SUITE_FAMILIES)}")
    examples_given = property_examples
    case_families = tuple(f for f in CASE_FAMILIES if f in families)
    cases = all_cases(case_families) if case_families else ()
    bundled: Sequence[C.Case] = ()
    alone: Sequence[C.Case] = cases
    first = profile == "first"
    if first:
        profile = "quick"
    if profile == "quick":
        # Every case that can share a call with others runs as rows of a bundle
        # (conformance/bundles.py); of the rest, a sample runs case by case.
        bundled = [c for c in cases if bundleable(c)]
        alone = [c for c in cases if not bundleable(c)]
    require = {str(v) for v in require}
    family_specs = C.all_specs(v11="sampled")
    if profile == "quick":  # one group size per format; the case families sweep every G
        family_specs = [s for s in family_specs if s.format is not C.Format.INT4 or s.group_size == QUICK_INT4_GROUP]
    for ops in ops_list:
        vid = _variant_id(ops)
        sharing = SharedCompilations(profile == "quick" and share_compilations
                                     and bool(getattr(ops.kernels, "compiles_per_shape", False)))
        property_examples = examples_given if examples_given is not None else (
            25 if profile == "full" else QUICK_PROPERTY_EXAMPLES_COMPILING if sharing.compiling else QUICK_PROPERTY_EXAMPLES)
        missing = {spec.format for spec in C.all_specs() if not implements(ops, spec)}
        for fmt in sorted(missing, key=lambda f: f.value):
            yield _unimplemented_check(ops, fmt, C.FORMATS[fmt].spec_version in require)
        sample_only = first and sharing.compiling  # a cold compiler: one group size per format, bundled
        chosen = _first_run_groups(bundled) if sample_only else {}
        for bundle in make_bundles([c for c in bundled if c.spec.format not in missing
                                    and chosen.get(c.spec.format, c.spec.group_size) == c.spec.group_size],
                                   sharing):
            shared = SharedRun(ops, bundle, device)
            for case in bundle.cases:
                yield Check(f"{vid}/{case.id}", ops.name, ops.variant, case.family, case.spec.label, case.dtype,
                            functools.partial(shared.mismatches, case), case.flags, format=case.spec.format.value)
        if sample_only:
            continue
        for case in (sample_cases(alone, QUICK_CASES_PER_CELL, sharing) if profile == "quick" else alone):
            if case.spec.format in missing:
                continue
            yield Check(f"{vid}/{case.id}", ops.name, ops.variant, case.family, case.spec.label, case.dtype,
                        _bind_case(ops, case, device, sharing.out_dtypes(case.spec, case.dtype)), case.flags,
                        format=case.spec.format.value)
        # Property draws and invariances take spec v1.1's formats at one group size each
        # (cases.V11_SAMPLED_GROUPS), and in the quick profile INT4 too: under
        # torch.compile every draw's shape is compiled anew; the other group sizes are
        # swept by the case families.
        if "property" in families:
            for spec in family_specs:
                if spec.format in missing:
                    continue
                yield Check(f"{vid}/property/{spec.label}/any/hypothesis", ops.name, ops.variant, "property",
                            spec.label, "any", _bind_property(ops, spec, device, property_examples, sharing),
                            format=spec.format.value)
        # Inside a caller's trace, compiled kernels step aside for their eager code (one
        # graph with the caller's), so tracing them again compiles what the eager
        # variant's seed-types check compiled: a compiling variant skips it.
        trace = not (sharing.compiling and getattr(ops.kernels, "wrapped", False))
        if "invariance" in families:
            for spec in family_specs:
                if spec.format in missing:
                    continue
                for check in INVARIANCE_CHECKS:
                    if first and check in FIRST_RUN_SKIPPED_INVARIANCE:
                        continue
                    yield Check(f"{vid}/invariance/{spec.label}/float32/{check}", ops.name, ops.variant,
                                "invariance", spec.label, "float32", _bind_invariance(ops, check, spec, device, trace),
                                format=spec.format.value)


def _first_run_groups(bundled: Sequence[C.Case]) -> Dict[Any, Optional[int]]:
    """Per format, the group size the first profile checks: the one most of its
    bundleable cases have (the default, 64, among equals)."""
    counts: Dict[Any, Dict[Optional[int], int]] = {}
    for c in bundled:
        counts.setdefault(c.spec.format, {}).setdefault(c.spec.group_size, 0)
        counts[c.spec.format][c.spec.group_size] += 1
    return {fmt: max(groups, key=lambda g: (groups[g], g == 64)) for fmt, groups in counts.items()}


def _bind_case(ops, case, device, out_dtypes):
    def run():
        with np.errstate(all="ignore"):
            return run_case(ops, case, device, out_dtypes).mismatches
    return run


def _bind_invariance(ops, check, spec, device, trace):
    def run():
        with np.errstate(all="ignore"):
            return run_invariance(ops, check, spec, device, trace)
    return run


def _bind_property(ops, spec, device, examples, sharing):
    def run():
        from .properties import run_property

        with np.errstate(all="ignore"):
            return run_property(ops, spec, device, examples, sharing)
    return run


# ------------------------------------------------------------ known failures
@dataclass
class KnownFailures:
    """Checks a backend knowingly fails, each with a reason. Patterns use fnmatch."""

    entries: Dict[str, str]
    source: str = ""

    @classmethod
    def load(cls, paths: Iterable[str]) -> "KnownFailures":
        entries: Dict[str, str] = {}
        sources = []
        for path in paths:
            with open(path) as fh:
                data = json.load(fh)
            for item in data.get("knownFailures", []):
                entries[item["id"]] = item.get("reason", "")
            sources.append(str(path))
        return cls(entries, ", ".join(sources))

    def reason_for(self, check_id: str) -> Optional[str]:
        for pattern, reason in self.entries.items():
            if fnmatch.fnmatchcase(check_id, pattern):
                return reason
        return None

    def unmatched(self, check_ids: Iterable[str]) -> List[str]:
        ids = list(check_ids)
        return [p for p in self.entries if not any(fnmatch.fnmatchcase(i, p) for i in ids)]


class UnmatchedKnownFailureWarning(UserWarning):
    """A known-failure entry matches no check: it is stale, or misspelt."""


def warn_unmatched(known: KnownFailures, check_ids: Iterable[str]) -> List[str]:
    stale = known.unmatched(check_ids)
    for pattern in stale:
        warnings.warn(f"known-failure entry {pattern!r} ({known.source}) matches no check", UnmatchedKnownFailureWarning, stacklevel=2)
    return stale


def default_known_failure_files(backend_names: Iterable[str]) -> List[str]:
    files = []
    for name in backend_names:
        path = KNOWN_FAILURES_DIR / f"{name}.json"
        if path.exists():
            files.append(str(path))
    extra = os.environ.get("KVQUANT_KNOWN_FAILURES")
    if extra:
        files += [p for p in extra.split(os.pathsep) if p]
    return files


# ------------------------------------------------------------------- report
@dataclass
class Outcome:
    check: Check
    mismatches: List[Mismatch]
    known_reason: Optional[str] = None

    @property
    def status(self) -> str:
        if not self.mismatches and self.check.not_implemented:
            return UNIMPLEMENTED
        if not self.mismatches:
            return "pass" if self.known_reason is None else "xpass"
        return "known" if self.known_reason is not None else "fail"


def run_checks(checks: Iterable[Check], known: Optional[KnownFailures] = None, progress=None) -> List[Outcome]:
    outcomes = []
    for check in checks:
        try:
            mismatches = check.run()
        except Exception as exc:  # a crash inside a check is a finding, never a silent skip
            mismatches = [Mismatch(check.backend, check.variant, check.id, "*", "*", f"check raised {type(exc).__name__}: {exc}")]
        outcome = Outcome(check, mismatches, known.reason_for(check.id) if known else None)
        outcomes.append(outcome)
        if progress:
            progress(outcome)
    return outcomes


def format_table(outcomes: Sequence[Outcome]) -> str:
    """Formats x input dtypes (rows) by case families (columns), per backend variant;
    each cell is passed/total, with a '!' where anything failed."""
    lines = []
    by_variant: Dict[str, List[Outcome]] = {}
    for o in outcomes:
        by_variant.setdefault(f"{o.check.backend} / {o.check.variant}", []).append(o)
    for variant, items in by_variant.items():
        families = [f for f in SUITE_FAMILIES + (UNIMPLEMENTED,) if any(o.check.family == f for o in items)]
        rows: Dict[tuple, Dict[str, List[int]]] = {}
        for o in items:
            cell = rows.setdefault((o.check.label, o.check.dtype), {}).setdefault(o.check.family, [0, 0])
            cell[1] += 1
            cell[0] += o.status in ("pass", "known", "xpass", UNIMPLEMENTED)
        width = max([len(f) for f in families] + [9])
        label_width = max([len(label) for label, _ in rows] + [6]) + 2
        header = f"{'format':<{label_width}}{'dtype':<10}" + "".join(f"{f:>{width + 2}}" for f in families)
        total_fail = sum(o.status == "fail" for o in items)
        absent = sum(o.status == UNIMPLEMENTED for o in items)
        lines.append(f"== {variant}: {len(items) - total_fail - absent}/{len(items) - absent} checks pass"
                     + (f"; {absent} formats not implemented (n/i)" if absent else ""))
        if items[0].check.backend == REFERENCE_BACKEND:
            lines.append("   (the reference: outside the golden vectors its case checks compare it with itself;"
                         " the golden vectors and the spec transcription's row, the example backend, check it)")
        lines.append(header)
        for (label, dtype), cells in sorted(rows.items()):
            row = f"{label:<{label_width}}{dtype:<10}"
            for f in families:
                if f == UNIMPLEMENTED and f in cells:
                    ok, n = cells[f]
                    text = "n/i" if ok == n else "n/i!"
                elif f in cells:
                    ok, n = cells[f]
                    text = f"{ok}/{n}" + ("" if ok == n else "!")
                else:
                    text = "-"
                row += f"{text:>{width + 2}}"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)
