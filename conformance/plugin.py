"""pytest plugin: ``pytest --kvquant-backend NAME`` runs the conformance suite.

Registered through the ``pytest11`` entry point, so it is active wherever
kvquant is installed, and inert until a backend is named (by the option or the
``KVQUANT_BACKEND`` environment variable, comma-separated). Each check is its
own test item whose id names backend, variant, family, format, dtype and case,
so one failure never hides another.
"""
from __future__ import annotations

import os
import warnings

import pytest

from .suite import (
    SUITE_FAMILIES,
    KnownFailures,
    UnmatchedKnownFailureWarning,
    default_known_failure_files,
    iter_checks,
)


def pytest_addoption(parser):
    group = parser.getgroup("kvquant", "kvquant conformance suite")
    group.addoption("--kvquant-backend", action="append", default=[], metavar="NAME",
                    help="backend to check bit for bit against the reference (repeatable; default: $KVQUANT_BACKEND)")
    group.addoption("--kvquant-variant", action="append", default=[], metavar="VARIANT",
                    help="only these variants (eager, compile, jit, ...)")
    group.addoption("--kvquant-family", action="append", default=[], metavar="FAMILY",
                    help=f"only these case families: {', '.join(SUITE_FAMILIES)}")
    group.addoption("--kvquant-device", default=None, metavar="DEVICE", help="device to put inputs on (e.g. cuda:0)")
    group.addoption("--kvquant-require", action="append", default=[], metavar="VERSION",
                    help="fail on formats of this spec version the backend does not implement (default: skip them)")
    group.addoption("--kvquant-known-failures", action="append", default=[], metavar="FILE",
                    help="JSON file of checks this backend knowingly fails")


def _selected_backends(config):
    names = list(config.getoption("--kvquant-backend"))
    if not names and os.environ.get("KVQUANT_BACKEND"):
        names = [n for n in os.environ["KVQUANT_BACKEND"].split(",") if n]
    return names


class ConformanceFailure(Exception):
    pass


class KvquantCheckItem(pytest.Item):
    def __init__(self, *, check, **kwargs):
        super().__init__(**kwargs)
        self.check = check

    def runtest(self):
        mismatches = self.check.run()
        if not mismatches and self.check.not_implemented:
            pytest.skip(f"{self.check.label} is not implemented by this backend (spec {self.check.id.rsplit('/', 1)[-1]})")
        if mismatches:
            text = "\n".join(str(m) for m in mismatches[:5])
            if len(mismatches) > 5:
                text += f"\n... and {len(mismatches) - 5} more outputs differ"
            raise ConformanceFailure(text)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        return "kvquant-conformance", None, self.name


class KvquantSuite(pytest.Collector):
    def collect(self):
        return []


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    names = _selected_backends(config)
    if not names:
        return
    from .runner import backend_variants

    variants = config.getoption("--kvquant-variant") or None
    families = config.getoption("--kvquant-family") or None
    ops_list = backend_variants(names, variants)
    known = KnownFailures.load(config.getoption("--kvquant-known-failures") or default_known_failure_files(names))
    parent = KvquantSuite.from_parent(session, name="kvquant-conformance")
    new = []
    for check in iter_checks(ops_list, families, config.getoption("--kvquant-device"),
                             require=config.getoption("--kvquant-require")):
        item = KvquantCheckItem.from_parent(parent, name=check.id, check=check)
        reason = known.reason_for(check.id)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=f"known failure: {reason}", strict=False))
        new.append(item)
    stale = known.unmatched(c.name for c in new)
    for pattern in stale:
        warnings.warn(UnmatchedKnownFailureWarning(f"known-failure entry {pattern!r} ({known.source}) matches no check"))
    items.extend(new)
