"""The suite as a list of named checks, shared by the pytest plugin and the command.

Each check has an id ``backend-variant/family/format/dtype/name`` and a function
returning the mismatches it found (an empty list is a pass).
"""
from __future__ import annotations

import fnmatch
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from . import cases as C
from .runner import INVARIANCE_CHECKS, Mismatch, run_case, run_invariance

SUITE_FAMILIES = C.FAMILIES + ("property", "invariance")
KNOWN_FAILURES_DIR = Path(__file__).with_name("known_failures")


@dataclass
class Check:
    id: str
    backend: str
    variant: str
    family: str
    label: str  # format label
    dtype: str
    run: Callable[[], List[Mismatch]]


def _variant_id(ops) -> str:
    return f"{ops.name}-{ops.variant}"


def iter_checks(ops_list: Sequence[Any], families: Optional[Iterable[str]] = None, device: Optional[str] = None,
                property_examples: int = 25) -> Iterator[Check]:
    families = tuple(families) if families else SUITE_FAMILIES
    unknown = set(families) - set(SUITE_FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; expected some of {', '.join(SUITE_FAMILIES)}")
    case_families = tuple(f for f in families if f in C.FAMILIES)
    cases = C.all_cases(case_families) if case_families else ()
    for ops in ops_list:
        vid = _variant_id(ops)
        for case in cases:
            yield Check(f"{vid}/{case.id}", ops.name, ops.variant, case.family, case.spec.label, case.dtype,
                        _bind_case(ops, case, device))
        if "property" in families:
            for spec in C.all_specs():
                yield Check(f"{vid}/property/{spec.label}/any/hypothesis", ops.name, ops.variant, "property",
                            spec.label, "any", _bind_property(ops, spec, device, property_examples))
        if "invariance" in families:
            for spec in C.all_specs():
                for check in INVARIANCE_CHECKS:
                    yield Check(f"{vid}/invariance/{spec.label}/float32/{check}", ops.name, ops.variant,
                                "invariance", spec.label, "float32", _bind_invariance(ops, check, spec, device))


def _bind_case(ops, case, device):
    def run():
        with np.errstate(all="ignore"):
            return run_case(ops, case, device).mismatches
    return run


def _bind_invariance(ops, check, spec, device):
    def run():
        with np.errstate(all="ignore"):
            return run_invariance(ops, check, spec, device)
    return run


def _bind_property(ops, spec, device, examples):
    def run():
        from .properties import run_property

        with np.errstate(all="ignore"):
            return run_property(ops, spec, device, examples)
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
        families = [f for f in SUITE_FAMILIES if any(o.check.family == f for o in items)]
        rows: Dict[tuple, Dict[str, List[int]]] = {}
        for o in items:
            cell = rows.setdefault((o.check.label, o.check.dtype), {}).setdefault(o.check.family, [0, 0])
            cell[1] += 1
            cell[0] += o.status in ("pass", "known", "xpass")
        width = max([len(f) for f in families] + [9])
        header = f"{'format':<30}{'dtype':<10}" + "".join(f"{f:>{width + 2}}" for f in families)
        total_fail = sum(o.status == "fail" for o in items)
        lines.append(f"== {variant}: {len(items) - total_fail}/{len(items)} checks pass")
        lines.append(header)
        for (label, dtype), cells in sorted(rows.items()):
            row = f"{label:<30}{dtype:<10}"
            for f in families:
                if f in cells:
                    ok, n = cells[f]
                    text = f"{ok}/{n}" + ("" if ok == n else "!")
                else:
                    text = "-"
                row += f"{text:>{width + 2}}"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)
