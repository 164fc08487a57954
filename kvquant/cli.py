"""The ``kvquant`` command.

    kvquant info                      backends found, their versions and devices
    kvquant conformance [--backend NAME ...] [--json FILE]
                                      check backends bit for bit against the reference
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional


def _cmd_info(args) -> int:
    import kvquant

    print(f"kvquant {kvquant.__version__} (spec v{kvquant.SPEC_VERSION})")
    for name in kvquant.available_backends():
        try:
            ops = kvquant.get_backend(name)
        except Exception as exc:
            print(f"  {name:<10} not available: {exc}")
            continue
        rt = ops.runtime
        variants = ", ".join(ops.variants())
        print(f"  {name:<10} {rt.version()}; devices: {', '.join(rt.devices())}; variants: {variants}")
    return 0


def _cmd_conformance(args) -> int:
    import numpy as np

    from kvquant.conformance.runner import backend_variants
    from kvquant.conformance.suite import (
        KnownFailures,
        default_known_failure_files,
        format_table,
        iter_checks,
        run_checks,
        warn_unmatched,
    )

    ops_list = backend_variants(args.backend or None, args.variant or None)
    if not ops_list:
        print("no backend to check", file=sys.stderr)
        return 2
    names = sorted({o.name for o in ops_list})
    known = KnownFailures.load(args.known_failures or default_known_failure_files(names))
    checks = list(iter_checks(ops_list, args.family or None, args.device))
    warn_unmatched(known, (c.id for c in checks))
    print(f"kvquant conformance: {len(checks)} checks over {', '.join(f'{o.name}/{o.variant}' for o in ops_list)}", flush=True)
    started = time.time()
    failures = []

    def progress(outcome):
        if outcome.status == "fail":
            failures.append(outcome)
            if len(failures) <= args.show:
                print(f"FAIL {outcome.check.id}\n  " + "\n  ".join(str(m) for m in outcome.mismatches[:3]), flush=True)

    with np.errstate(all="ignore"):
        outcomes = run_checks(checks, known, progress)
    print()
    print(format_table(outcomes))
    passed = sum(o.status != "fail" for o in outcomes)
    print(f"{passed} passed, {len(failures)} failed in {time.time() - started:.1f}s")
    if args.json:
        report = {
            "passed": passed,
            "failed": len(failures),
            "checks": [
                {"id": o.check.id, "status": o.status, "known_reason": o.known_reason,
                 "mismatches": [m.as_dict() for m in o.mismatches]}
                for o in outcomes
            ],
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 1 if failures else 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kvquant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends found, versions and devices").set_defaults(func=_cmd_info)
    conf = sub.add_parser("conformance", help="check backends bit for bit against the reference")
    conf.add_argument("--backend", action="append", default=[], help="backend name (repeatable); default: every installed backend")
    conf.add_argument("--variant", action="append", default=[], help="only these variants (eager, compile, jit, ...)")
    conf.add_argument("--family", action="append", default=[], help="only these case families")
    conf.add_argument("--device", default=None, help="device for inputs, e.g. cuda:0")
    conf.add_argument("--known-failures", action="append", default=[], help="JSON file of known failures")
    conf.add_argument("--json", default=None, help="write a machine-readable report here")
    conf.add_argument("--show", type=int, default=20, help="print details of at most this many failures")
    conf.set_defaults(func=_cmd_conformance)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
