"""How ``kvquant conformance`` runs: backends dealt to one process per core (lanes),
each variant's checks run in shares (its checks of one format) that an idle process
may take from a busy one, progress and failures reported as they come, and the table,
summary and JSON report at the end. docs/conformance.md ("Side by side", "First run")
says why it is shaped so; kvquant/cli.py only parses the arguments and calls
``run_conformance``."""
from __future__ import annotations

import datetime
import json
import platform
import sys
import time
from typing import Dict, List

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
RELEASE_ABOVE_BYTES = 1 << 30
# After a release, the next one waits until memory has grown this much past what the
# release left: what a release cannot free (the cases, the expected bits, the libraries)
# must not make every later check release and compile again.
RELEASE_HEADROOM_BYTES = 128 << 20
RELEASE_FLOOR_BYTES = 640 << 20  # below this a framework's own baseline would release every check
PARENT_POLL_SECONDS = 1.0  # how often a lane process looks whether the command is still there
LANE_EXIT_SECONDS = 30.0  # how long a lane that has finished may take to exit before it is stopped


class UsageError(Exception):
    """Bad arguments: reported in one line, exit code 2."""


class Progress:
    """Checks done, failures so far and time left for one backend variant: a tqdm bar
    on a terminal, a plain line every ``every`` seconds (and at the end) elsewhere, so
    that a log or CI shows the run is alive."""

    def __init__(self, label: str, total: int, stream, bar: bool, every: float = 10.0, position: int = 0):
        self.label, self.total, self.stream, self.every = label, total, stream, every
        self.done = self.failed = 0
        self.started = self.last = time.monotonic()
        self.bar = None
        if bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="check", file=stream, dynamic_ncols=True, leave=True,
                            position=position)

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
    then reads executables from disk (docs/conformance.md). torch.compile keeps
    its own on-disk caches. JAX_COMPILATION_CACHE_DIR, if set, wins."""
    if "jax" not in sys.modules:
        return
    import os

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        from kvquant._cache_dir import cache_dir

        directory = cache_dir("jax")  # executables are code: only a private directory
        if directory is None:
            return
        jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _empty_compile_caches() -> Dict[str, str]:
    """The on-disk compile caches of this process's frameworks that hold nothing yet, by
    the name of the backend that compiles into them: on a fresh machine those variants
    check the first profile (a sample), and the header says why."""
    import os

    empty = {}
    torch_graphs = sys.modules.get("kvquant.backends.torch.graphs")
    if torch_graphs is not None:
        # The graphs saved for this kvquant and torch; where saving is off, Inductor's.
        graphs, suffix = torch_graphs.saved_graphs_dir(), ".pt2"
        try:
            if graphs is None:
                from torch._inductor.runtime.cache_dir_utils import default_cache_dir

                graphs = os.path.join(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir(), "fxgraph")
                suffix = ""
            if not (os.path.isdir(graphs) and any(n.endswith(suffix) for n in os.listdir(graphs))):
                empty["torch"] = "torch.compile's"
        except ImportError:  # another torch: say nothing rather than guess
            pass
    if "jax" in sys.modules:
        import jax

        path = jax.config.jax_compilation_cache_dir
        if path and not (os.path.isdir(path) and os.listdir(path)):
            empty["jax"] = "JAX's"
    return empty


def _lanes(names: List[str], jobs: int) -> List[List[str]]:
    """Backends dealt round robin to at most ``jobs`` processes: each process imports
    the frameworks of its own backends and checks them first; the built-in order
    (numpy, torch, jax, then plug-ins) puts the two compiling frameworks in different
    ones. A process that runs out of work then takes shares of the others' (_Shares)."""
    count = max(1, min(jobs, len(names)))
    return [names[i::count] for i in range(count)]


def _variant_key(ops) -> str:
    return f"{ops.name}/{ops.variant}"


def _shares_of(checks) -> List[str]:
    """A variant's shares, in the order its checks run: its checks of one format each.
    Every check of a format compiles the same kernels (bundles, sampled cases,
    properties, invariances), so a share is compiled in one process, never twice."""
    return list(dict.fromkeys(c.format for c in checks))


def _run_lane(names: List[str], options: dict, emit, ask) -> None:
    """The variants of these backends, share by share, then shares of other processes'
    variants while any are left, checked in this process.

    ``ask(request)`` goes to the parent's _Shares: ``("claim", key, share)`` is whether
    this process may run that share of one of its own variants (another may have taken
    it), and ``("steal",)`` gives ``(name, variant, share)`` of a share no process has
    started, or None once there is none. What happens is told through
    ``emit(kind, key, payload)``: "ready" (the variants, their check ids and shares),
    "outcome" (one check's result as plain data) or "usage" (bad arguments).
    _run_lanes adds "done" after the lane, "crash" if it died."""
    import numpy as np

    import kvquant
    from kvquant.conformance.reference import forget_reference_outputs
    from kvquant.conformance.runner import backend_variants, release_compiled, resident_bytes
    from kvquant.conformance.suite import KnownFailures, iter_checks, run_checks

    def checks_of(ops, profile):
        return list(iter_checks([ops], options["families"] or None, options["device"],
                                profile=profile, require=options["require"]))

    try:
        # Without --backend, a lane's share of every backend: those not installed are skipped.
        named = [(name, ops) for name in names
                 for ops in backend_variants([name], options["variants"] or None, missing_ok=not options["chosen"])]
    except (kvquant.BackendNotFoundError, ValueError) as exc:
        emit("usage", None, str(exc))
        return
    _enable_compile_caches()
    empty = _empty_compile_caches()
    # A variant whose framework's compile cache is empty checks the first profile in a
    # default run; decided here once, and handed to any process that takes its shares.
    profiles = [options["profile"] if not (options["profile"] == "quick" and options["first_run_sample"]
                                           and o.name in empty) else "first" for _, o in named]
    try:
        per_variant = [checks_of(ops, profile) for (_, ops), profile in zip(named, profiles)]
        deferred = [len(checks_of(ops, "quick")) - len(checks) if profile == "first" else 0
                    for (_, ops), profile, checks in zip(named, profiles, per_variant)]
    except ValueError as exc:
        emit("usage", None, str(exc))
        return
    emit("ready", None, [{"key": _variant_key(o), "name": name, "backend": o.name, "variant": o.variant,
                          "runtime": o.runtime.version(), "devices": list(o.runtime.devices()),
                          "empty_caches": [empty[o.name]] if o.name in empty else [],
                          "profile": profile, "deferred": later,
                          "ids": [c.id for c in checks], "shares": _shares_of(checks)}
                         for (name, o), checks, profile, later in zip(named, per_variant, profiles, deferred)])
    known = KnownFailures.load(options["known_files"])
    release_above = options["release_above"]

    def run(ops, checks):
        key = _variant_key(ops)

        def report(outcome):
            # Compiled kernels are cached per shape and dtype (JAX op by op: every
            # operation, per shape), and many checks bring shapes of their own: past
            # the budget the variant drops them and compiles again as needed.
            nonlocal release_above
            rss = resident_bytes()
            if rss is not None and rss > release_above:
                release_compiled(ops)
                release_above = max(options["release_above"], (resident_bytes() or 0) + RELEASE_HEADROOM_BYTES)
            c = outcome.check
            emit("outcome", key, {"id": c.id, "backend": c.backend, "variant": c.variant, "family": c.family,
                                  "label": c.label, "dtype": c.dtype, "flags": list(c.flags),
                                  "not_implemented": c.not_implemented, "known_reason": outcome.known_reason,
                                  "mismatches": [m.as_dict() for m in outcome.mismatches]})

        with np.errstate(all="ignore"):
            run_checks(checks, known, report)

    def done_with(ops, checks):
        # No later variant uses this one's compiled kernels; keeping them all made a
        # full run grow to several GB.
        release_compiled(ops)
        del checks[:]
        # The expected bits of some 1,300 cases: recomputed by the next variant in about
        # 2 s, cheaper than holding them (and their three dequantized dtypes) throughout.
        forget_reference_outputs()

    for (_, ops), checks in zip(named, per_variant):
        for share in _shares_of(checks):
            if ask(("claim", _variant_key(ops), share)):
                run(ops, [c for c in checks if c.format == share])
        done_with(ops, checks)
    stolen = None  # (name, variant, ops, checks) of the variant shares were last taken from
    while True:
        job = ask(("steal",))
        if stolen is not None and (job is None or job[:2] != stolen[:2]):
            done_with(*stolen[2:])
        if job is None:
            return
        name, variant, share, profile = job
        if stolen is None or job[:2] != stolen[:2]:
            (ops,) = backend_variants([name], [variant])
            _enable_compile_caches()  # its framework may be new to this process
            stolen = (name, variant, ops, checks_of(ops, profile))
        run(stolen[2], [c for c in stolen[3] if c.format == share])


class _Shares:
    """Which process runs each share of each variant (its checks of one format).

    Each process claims the shares of its own backends in order; one that has run out
    takes the last share not yet started of the process with the most left. Without
    it the default run's two processes ended minutes apart on a first run: torch's
    (torch.compile compiling some 180 kernels) long after JAX's."""

    LATER = "later"  # a steal asked before every process has said what it checks

    def __init__(self, lanes: int):
        self.lanes = lanes
        self.open: dict = {}  # variant key -> its shares no process has started, in order
        self.owner: dict = {}  # variant key -> (lane, backend name, variant, profile)
        self.settled: set = set()  # lanes that said what they check, or ended

    def add(self, lane: int, variants: List[dict]) -> None:
        for v in variants:
            self.open[v["key"]] = list(v["shares"])
            self.owner[v["key"]] = (lane, v["name"], v["variant"], v["profile"])
        self.settled.add(lane)

    def gone(self, lane: int) -> None:
        self.settled.add(lane)

    def answer(self, lane: int, request: tuple):
        if request[0] == "claim":
            _, key, share = request
            left = self.open.get(key, [])
            if share in left:
                left.remove(share)
                return True
            return False
        if len(self.settled) < self.lanes:
            return self.LATER
        left_by_lane: dict = {}
        for key, shares in self.open.items():
            owner = self.owner[key][0]
            if owner != lane and shares:
                left_by_lane.setdefault(owner, []).append(key)
        if not left_by_lane:
            return None
        busiest = max(left_by_lane, key=lambda o: sum(len(self.open[k]) for k in left_by_lane[o]))
        key = left_by_lane[busiest][-1]
        _, name, variant, profile = self.owner[key]
        return name, variant, self.open[key].pop(), profile


def _exit_with_parent() -> None:
    """End this process once its parent has gone (killed, say, by SIGTERM or the
    out-of-memory killer, so that no ``finally`` stopped its lanes). A lane otherwise
    learns of it only at its next message, which a compile can put minutes away: after
    a killed run its two processes were seen compiling on until killed by hand."""
    import os
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(EXIT_FAILED)

    threading.Thread(target=watch, name="kvquant-exit-with-parent", daemon=True).start()


def _lane_process(names: List[str], options: dict, conn) -> None:
    """A worker process: one lane, its messages sent on its own pipe, its requests for
    shares answered on it, then "done"."""
    _exit_with_parent()

    def ask(request):
        conn.send(("ask", None, request))
        return conn.recv()

    try:
        _run_lane(names, options, lambda kind, key, payload: conn.send((kind, key, payload)), ask)
    except BaseException as exc:  # noqa: BLE001 - told to the parent, which fails the run
        import traceback

        conn.send(("crash", None, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.send(("done", None, None))
        conn.close()


def _run_lanes(lanes: List[List[str]], options: dict, handle) -> None:
    """Every lane, each message passed to ``handle(lane, kind, key, payload)`` as it
    comes, and each request for shares ("ask") answered with what it returns: one lane
    in this process, more in one spawned process each (spawned: forking a process that
    has imported a framework is not safe).

    Each process has a pipe of its own. With one multiprocessing.Queue shared by all, a
    process that died while its queue's feeder thread held the queue's lock (a kernel
    that kills the process, the out-of-memory killer) left every other process blocked
    on that lock for good (test_a_process_that_dies_fails_the_run).
    A pipe's reader also learns of its writer's death at once, as the end of the pipe."""
    if len(lanes) == 1:
        _run_lane(lanes[0], options, lambda kind, key, payload: handle(0, kind, key, payload),
                  lambda request: handle(0, "ask", None, request))
        handle(0, "done", None, None)
        return
    import multiprocessing
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("spawn")
    procs, open_lanes, waiting = [], {}, []
    for i, names in enumerate(lanes):
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_lane_process, args=(names, options, child_end), daemon=True)
        proc.start()
        child_end.close()  # the child holds the only other end: its exit ends the pipe
        procs.append(proc)
        open_lanes[parent_end] = i
    try:
        while open_lanes:
            for conn in wait(list(open_lanes)):
                i = open_lanes[conn]
                try:
                    kind, key, payload = conn.recv()
                except (EOFError, OSError):  # the process ended without "done": it died
                    del open_lanes[conn]
                    procs[i].join(timeout=10)
                    handle(i, "crash", None, f"the process checking {', '.join(lanes[i])} "
                                             f"exited with code {procs[i].exitcode}")
                    continue
                if kind == "done":
                    del open_lanes[conn]
                if kind == "ask":
                    waiting.append((conn, i, payload))
                else:
                    handle(i, kind, key, payload)
            # Asked for a share before every process said what it checks: answered once they have.
            still = []
            for conn, i, request in waiting:
                answer = handle(i, "ask", None, request)
                if answer == _Shares.LATER:
                    still.append((conn, i, request))
                elif conn in open_lanes:
                    conn.send(answer)
            waiting = still
    finally:
        # Once every lane has said "done" (or died), each may still be exiting (its
        # frameworks' exit handlers, their compile workers): stopped there, it left
        # semaphores behind and the resource tracker warned of them after the table.
        # After an error or Ctrl-C with lanes still open, they are stopped at once.
        for proc in procs:
            if not open_lanes:
                proc.join(timeout=LANE_EXIT_SECONDS)
            if proc.is_alive():
                proc.terminate()
            proc.join()


class _Report:
    """The parent's side of a run: progress per variant, failures as they come, and
    the outcomes for the table and the JSON report, from the lanes' plain messages."""

    def __init__(self, args, lanes: List[List[str]], names: List[str], known):
        self.args, self.lanes, self.names, self.known = args, lanes, names, known
        self.ready: dict = {}
        self.variants: List[dict] = []
        self.backlog: list = []
        self.progress: dict = {}
        self.outcomes: dict = {}
        self.failures: list = []
        self.crashed: List[str] = []
        self.bar = not args.no_progress and sys.stderr.isatty()
        self.started = time.time()
        self.shares = _Shares(len(lanes))
        self.process_of: dict = {}  # check id -> the process (lane) that ran it

    def __call__(self, lane: int, kind: str, key, payload):
        if kind == "ask":
            return self.shares.answer(lane, payload)
        if kind == "usage":
            raise UsageError(payload)
        if kind in ("crash", "done"):
            self.shares.gone(lane)
        if kind == "crash":
            self.crashed.append(payload)
            print(f"kvquant conformance: {payload}", file=sys.stderr, flush=True)
        elif kind == "ready":
            self.shares.add(lane, payload)
            self.ready[lane] = payload
            if len(self.ready) == len(self.lanes):
                self._start()
        elif len(self.ready) < len(self.lanes):
            self.backlog.append((lane, kind, key, payload))  # told before the header
        elif kind == "outcome":
            self._outcome(key, payload)
            self.process_of[payload["id"]] = lane
        return None

    def _start(self) -> None:
        """Every lane has said what it will check: validate, print the header, then
        what came meanwhile."""
        from kvquant.conformance.suite import warn_unmatched

        variants = [v for lane in range(len(self.lanes)) for v in self.ready[lane]]
        order = {v["key"]: (self.names.index(v["name"]), i) for i, v in enumerate(variants)}
        self.variants = sorted(variants, key=lambda v: order[v["key"]])
        if self.args.variant:
            unknown = set(self.args.variant) - {v["variant"] for v in self.variants}
            if unknown:
                raise UsageError(f"no backend has variant(s) {', '.join(sorted(unknown))}")
        if not self.variants:
            raise UsageError("no backend to check")
        warn_unmatched(self.known, (i for v in self.variants for i in v["ids"]))
        self.outcomes = {v["key"]: [] for v in self.variants}
        print(f"kvquant conformance ({'full' if self.args.full else 'quick'} profile): {self.total} checks over "
              f"{', '.join(v['key'] for v in self.variants)}"
              + (f", in {len(self.lanes)} processes side by side" if len(self.lanes) > 1 else ""), flush=True)
        empty = sorted({c for v in self.variants for c in v.get("empty_caches", ())})
        deferred = sum(v.get("deferred", 0) for v in self.variants)
        if empty and deferred:
            sampled = ", ".join(v["key"] for v in self.variants if v.get("profile") == "first")
            print(f"First run: {' and '.join(empty)} compile cache{'s are' if len(empty) > 1 else ' is'} empty, so "
                  f"{sampled} check a sample now ({deferred} checks left for the next run, which compiles what they "
                  "need; runs after that take about a minute on 2 cores; --full checks everything now; "
                  "docs/conformance.md).", flush=True)
        elif empty:
            print(f"First run: {' and '.join(empty)} compile cache{'s are' if len(empty) > 1 else ' is'} empty, so "
                  "every kernel checked is compiled now (docs/conformance.md has the times).", flush=True)
        self.started = time.time()
        backlog, self.backlog = self.backlog, []
        for message in backlog:
            self(*message)

    @property
    def total(self) -> int:
        return sum(len(v["ids"]) for v in self.variants)

    def _outcome(self, key: str, payload: dict) -> None:
        from kvquant.conformance.runner import Mismatch
        from kvquant.conformance.suite import Check, Outcome

        if key not in self.progress:
            count = len(next(v for v in self.variants if v["key"] == key)["ids"])
            self.progress[key] = Progress(key, count, sys.stderr if self.bar else sys.stdout, self.bar,
                                          position=len(self.progress))
        check = Check(payload["id"], payload["backend"], payload["variant"], payload["family"], payload["label"],
                      payload["dtype"], run=None, flags=tuple(payload["flags"]),
                      not_implemented=payload["not_implemented"])
        found = [Mismatch(**{k: (tuple(v) if k == "index" and v is not None else v) for k, v in m.items()})
                 for m in payload["mismatches"]]
        outcome = Outcome(check, found, payload["known_reason"])
        self.outcomes[key].append(outcome)
        failed = outcome.status == "fail"
        self.progress[key].update(failed)
        if self.progress[key].done == self.progress[key].total:  # its shares may have run in several processes
            self.progress[key].close()
        if failed:
            self.failures.append(outcome)
            if len(self.failures) <= self.args.show:
                text = f"FAIL {check.id}\n  " + "\n  ".join(str(m) for m in found[:3])
                if self.progress[key].bar is not None:
                    self.progress[key].bar.write(text)
                else:
                    print(text, flush=True)

    @staticmethod
    def _order(variant: dict):
        position = {cid: i for i, cid in enumerate(variant["ids"])}
        return lambda outcome: position[outcome.check.id]

    def finish(self) -> int:
        import kvquant
        from kvquant.conformance.suite import format_table

        for p in self.progress.values():
            p.close()
        # In the order of one process, whichever processes ran the shares.
        every = [o for v in self.variants for o in sorted(self.outcomes[v["key"]], key=self._order(v))]
        print()
        print(format_table(every))
        passed = sum(o.status in ("pass", "known", "xpass") for o in every)
        absent = sum(o.status == "unimplemented" for o in every)
        not_run = self.total - len(every)
        seconds = time.time() - self.started
        deferred = sum(v.get("deferred", 0) for v in self.variants)
        print(f"{passed} passed, " + (f"{absent} formats not implemented, " if absent else "")
              + f"{len(self.failures)} failed" + (f", {not_run} not run (a process failed)" if not_run else "")
              + f" in {seconds:.1f}s"
              + (f"; first run: {deferred} checks left for the next run (kvquant conformance again)" if deferred else ""))
        if self.args.json:
            versions = {"kvquant": kvquant.__version__, "spec": kvquant.SPEC_VERSION,
                        "python": platform.python_version(), "platform": platform.platform()}
            for v in self.variants:
                versions[v["backend"]] = {"runtime": v["runtime"], "devices": v["devices"]}
            report = {
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "profile": "full" if self.args.full else "quick",
                "first_run": {v["key"]: v.get("deferred", 0) for v in self.variants if v.get("profile") == "first"},
                "versions": versions,
                "device": self.args.device,
                "processes": len(self.lanes),
                "seconds": round(seconds, 1),
                "passed": passed,
                "not_implemented": absent,
                "failed": len(self.failures),
                "checks": [
                    {"id": o.check.id, "status": o.status, "known_reason": o.known_reason,
                     "process": self.process_of.get(o.check.id),
                     "mismatches": [m.as_dict() for m in o.mismatches]}
                    for o in every
                ],
            }
            from kvquant._cache_dir import write_atomic

            write_atomic(self.args.json, json.dumps(report, indent=1), shared=True)
        return EXIT_FAILED if self.failures or self.crashed or not_run else EXIT_OK


def run_conformance(args) -> int:
    """The command's work for parsed ``args``: lanes side by side, the report, the exit code."""
    import os

    import kvquant
    from kvquant.conformance.suite import KnownFailures, default_known_failure_files

    names = list(args.backend) or kvquant.available_backends()
    known_files = args.known_failures or default_known_failure_files(names)
    known = KnownFailures.load(known_files)  # a missing or malformed file is reported before any work
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    lanes = _lanes(names, args.jobs or cores)
    options = {"chosen": bool(args.backend), "variants": list(args.variant), "families": list(args.family),
               "device": args.device, "profile": "full" if args.full else "quick", "require": list(args.require),
               "first_run_sample": not args.every_check,
               "known_files": known_files,
               # Lanes side by side share the memory budget.
               "release_above": max(RELEASE_ABOVE_BYTES // len(lanes), RELEASE_FLOOR_BYTES)}
    report = _Report(args, lanes, names, known)
    _run_lanes(lanes, options, report)
    if len(report.ready) < len(lanes):  # a lane failed before it could say what it checks
        return EXIT_FAILED
    return report.finish()
