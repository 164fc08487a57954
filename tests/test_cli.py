"""The kvquant command as a new user meets it: usage errors in one line with their own
exit code, the families in --help, progress while it runs, a report that can be
compared later."""
import json
import os
import subprocess
import sys

import pytest


def _command(args, env=None):
    """The command's argv, and its environment without KVQUANT_BACKEND (which would
    choose the backends the test names itself)."""
    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "KVQUANT_BACKEND"}
    return [sys.executable, "-m", "kvquant.cli", *args], env


def kvquant(*args, cwd=None, env=None):
    # A time limit, so that a command that hangs fails its test instead of stalling CI
    # (processes side by side once deadlocked on a shared queue when one of them died).
    argv, env = _command(args, env)
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


def test_unknown_backend_is_one_line_and_exit_2(tmp_path):
    out = kvquant("conformance", "--backend", "nmupy", cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nmupy" in lines[0] and "numpy" in lines[0], out.stderr


def test_unknown_family_is_a_usage_error(tmp_path):
    out = kvquant("conformance", "--family", "goldn", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_help_lists_every_family(tmp_path):
    from kvquant.conformance.suite import SUITE_FAMILIES

    out = kvquant("conformance", "--help", cwd=tmp_path)
    assert out.returncode == 0
    assert all(f in out.stdout for f in SUITE_FAMILIES)
    assert "--full" in out.stdout


def test_progress_lines_and_versioned_report(tmp_path):
    report = tmp_path / "r.json"
    out = kvquant("conformance", "--backend", "example", "--family", "golden", "--json", str(report), cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    # Not a terminal: plain progress lines, at least the final one.
    assert "example/eager: " in out.stdout and " checks, 0 failed" in out.stdout
    data = json.loads(report.read_text())
    assert data["profile"] == "quick" and data["date"][:2] == "20"
    assert data["versions"]["spec"] == "1.1" and "numpy" in data["versions"]["example"]["runtime"]
    assert data["failed"] == 0 and data["passed"] == len(data["checks"])


def test_full_profile_runs_more_checks(tmp_path):
    quick, full = tmp_path / "q.json", tmp_path / "f.json"
    # The shapes family: the quick profile samples it (a case's shape and layout are
    # what it checks, so it cannot share a call); the other case families it bundles.
    kvquant("conformance", "--backend", "example", "--family", "shapes", "--json", str(quick), cwd=tmp_path)
    kvquant("conformance", "--backend", "example", "--family", "shapes", "--full", "--json", str(full), cwd=tmp_path)
    q, f = json.loads(quick.read_text()), json.loads(full.read_text())
    assert f["profile"] == "full" and len(f["checks"]) > 3 * len(q["checks"]) > 0


def test_info_aligns_long_backend_names(tmp_path):
    out = kvquant("info", cwd=tmp_path)
    assert out.returncode == 0
    rows = [line for line in out.stdout.splitlines() if line.startswith("  ")]
    starts = {line.index(" ", 2 + len(line.split()[0])) for line in rows}
    columns = {len(line) - len(line[2:].lstrip()) for line in rows}
    assert rows and columns == {2}
    # The text after each name starts in one column.
    text_starts = {len(line) - len(line.split(None, 1)[1]) for line in rows}
    assert len(text_starts) == 1, out.stdout
    assert starts


def test_table_widens_for_long_labels():
    from kvquant.conformance.suite import Check, Outcome, format_table

    long_label = "fp8_per_tensor-static=1.17549435e-38-and-more"
    check = Check("x/golden/a", "numpy", "eager", "golden", long_label, "float32", lambda: [])
    line = next(line for line in format_table([Outcome(check, [])]).splitlines() if line.startswith(long_label))
    assert line[len(long_label)] == " " and "float32" in line


@pytest.mark.parametrize("argv", [["conformance", "--variant", "nosuch", "--backend", "numpy"]])
def test_unknown_variant_is_a_usage_error(tmp_path, argv):
    out = kvquant(*argv, cwd=tmp_path)
    assert out.returncode == 2 and "nosuch" in out.stderr and "Traceback" not in out.stderr


def test_memory_release_does_not_repeat_while_memory_stays_high(monkeypatch, capsys):
    """Past the memory budget the command drops the variant's compiled kernels; when
    what remains is still above it (the cases, the expected bits, the libraries), it
    must not drop them again after every check: that made each check compile anew and
    jax.jit's quick run several times slower."""
    from kvquant import cli
    from kvquant.conformance import runner

    released = []
    monkeypatch.setattr(runner, "resident_bytes", lambda: 2 << 30)
    monkeypatch.setattr(runner, "release_compiled", lambda ops: released.append(ops.name))
    assert cli.main(["conformance", "--backend", "numpy", "--family", "golden", "--no-progress"]) == 0
    assert "passed" in capsys.readouterr().out
    assert released == ["numpy", "numpy"]  # once past the budget, once at the variant's end


def _with_backends(tmp_path, **entry_points):
    """An environment in which ``entry_points`` (name -> "module:factory" in
    tests/broken_backends.py) are installed kvquant backends, as a plug-in's would be."""
    dist = tmp_path / "kvquant_test_backends-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kvquant-test-backends\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[kvquant.backends]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items()))
    tests = os.path.dirname(__file__)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), tests, os.environ.get("PYTHONPATH", "")])}


def _run(args, env, cwd):
    return kvquant(*args, cwd=cwd, env=env)


def test_backends_side_by_side_give_the_report_of_one_process(tmp_path):
    """--jobs 2 checks backends in two processes, and the one that runs out of work
    first takes shares of the other's; the checks, their order and their outcomes are
    those of one process, failures included."""
    env = _with_backends(tmp_path, broken="broken_backends:slow_round_half_away_backend")
    args = ["conformance", "--backend", "numpy", "--backend", "broken", "--family", "rounding-ties", "--no-progress"]
    one = _run(args + ["--jobs", "1", "--json", str(tmp_path / "1.json")], env, tmp_path)
    two = _run(args + ["--jobs", "2", "--json", str(tmp_path / "2.json")], env, tmp_path)
    assert one.returncode == two.returncode == 1, two.stdout[-2000:] + two.stderr[-2000:]
    assert "2 processes side by side" in two.stdout and "side by side" not in one.stdout
    assert "FAIL broken-round-half-away-eager/" in two.stdout
    r1, r2 = (json.loads((tmp_path / f"{n}.json").read_text()) for n in (1, 2))
    assert r2["processes"] == 2 and r1["processes"] == 1
    assert [(c["id"], c["status"]) for c in r1["checks"]] == [(c["id"], c["status"]) for c in r2["checks"]]
    assert r2["failed"] == r1["failed"] > 0 and r2["passed"] == r1["passed"] > 0
    assert {"numpy", "broken-round-half-away"} <= set(r2["versions"])
    ran = {(c["id"].split("/")[0], c["process"]) for c in r2["checks"]}
    assert ("broken-round-half-away-eager", 0) in ran and ("broken-round-half-away-eager", 1) in ran, ran
    assert {c["process"] for c in r1["checks"]} == {0}


def test_a_process_that_dies_fails_the_run(tmp_path):
    env = _with_backends(tmp_path, dying="broken_backends:dying_backend")
    out = _run(["conformance", "--backend", "numpy", "--backend", "dying", "--family", "golden", "--jobs", "2",
                "--no-progress"], env, tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "exited with code 3" in out.stderr and "dying" in out.stderr
    assert "not run (a process failed)" in out.stdout


def test_a_finished_process_is_let_exit(tmp_path):
    """A process that has sent its last outcome runs its exit handlers to the end: it
    used to be stopped in the middle, and the resource tracker then warned of the
    semaphores it left behind."""
    (tmp_path / "marks").mkdir()
    env = {**_with_backends(tmp_path, slow_exit="broken_backends:slow_to_exit_backend"),
           "KVQUANT_TEST_MARKS": str(tmp_path / "marks")}
    out = _run(["conformance", "--backend", "numpy", "--backend", "slow_exit", "--family", "rounding-ties",
                "--jobs", "2", "--no-progress"], env, tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    marks = sorted(p.name for p in (tmp_path / "marks").iterdir())
    made = [m.split(".")[1] for m in marks if m.startswith("made.")]
    exited = [m.split(".")[1] for m in marks if m.startswith("exited.")]
    assert made and exited == made, marks


def _gone(pid: int) -> bool:
    """Whether a process has ended (a zombie not yet reaped counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads processes from /proc")
def test_processes_end_when_the_command_is_killed(tmp_path):
    """Killed (no finally runs), the command leaves no process behind: each notices
    within seconds, not at its next message, which a compile can put minutes away."""
    import signal
    import time

    marks = tmp_path / "marks"
    marks.mkdir()
    argv, env = _command(["conformance", "--backend", "numpy", "--backend", "hanging", "--family", "golden",
                          "--jobs", "2", "--no-progress"],
                         {**_with_backends(tmp_path, hanging="broken_backends:hanging_backend"),
                          "KVQUANT_TEST_MARKS": str(marks)})
    command = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(marks.iterdir()) and time.time() < deadline:
            time.sleep(0.2)
        pids = [int(p.name.split(".")[1]) for p in marks.iterdir()]
        assert pids, "the hanging backend's process never started"
        time.sleep(1)  # inside the hanging kernel by now
        assert not any(_gone(pid) for pid in pids)
    finally:
        command.send_signal(signal.SIGKILL)
        command.wait()
    deadline = time.time() + 15
    while not all(_gone(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if not _gone(pid)]
    for pid in left:  # not to leave it to CI
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes {left} outlived the killed command by 15 s"


def test_first_run_says_the_compile_caches_are_empty(tmp_path, monkeypatch, capsys):
    """A fresh machine's first run would compile every kernel: the header says when a
    framework's compile cache is empty (and which variants therefore check a sample,
    and how many checks are left for the next run), and only then."""
    pytest.importorskip("torch")
    import argparse

    from kvquant.conformance import scheduler as cli
    from kvquant.conformance.suite import KnownFailures

    import importlib

    torch_graphs = importlib.import_module("kvquant.backends.torch.graphs")
    monkeypatch.setenv("KVQUANT_TORCH_GRAPHS_DIR", str(tmp_path / "graphs"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    try:
        # The graphs saved for this kvquant (the compiled variant's cache) ...
        torch_graphs.saved_graphs_dir.cache_clear()
        assert "torch.compile's" in cli._empty_compile_caches().values()
        (tmp_path / "inductor" / "fxgraph" / "ab").mkdir(parents=True)
        assert "torch.compile's" in cli._empty_compile_caches().values()
        with open(os.path.join(torch_graphs.saved_graphs_dir(), "int8_quantize-0.pt2"), "wb"):
            pass
        assert "torch.compile's" not in cli._empty_compile_caches().values()
        # ... or, where saving is off, Inductor's.
        monkeypatch.setenv("KVQUANT_TORCH_GRAPHS_DIR", "0")
        torch_graphs.saved_graphs_dir.cache_clear()
        assert "torch.compile's" not in cli._empty_compile_caches().values()
        (tmp_path / "inductor" / "fxgraph" / "ab").rmdir()
        assert "torch.compile's" in cli._empty_compile_caches().values()
    finally:
        torch_graphs.saved_graphs_dir.cache_clear()

    def header(empty, deferred=0):
        args = argparse.Namespace(full=False, variant=[], no_progress=True, json=None)
        report = cli._Report(args, [["torch"]], ["torch"], KnownFailures.load([]))
        report(0, "ready", None, [
            {"key": "torch/eager", "name": "torch", "backend": "torch", "variant": "eager", "empty_caches": [],
             "profile": "quick", "deferred": 0, "ids": ["a"], "shares": ["int8"]},
            {"key": "torch/compile", "name": "torch", "backend": "torch", "variant": "compile",
             "empty_caches": empty, "profile": "first" if deferred else "quick", "deferred": deferred,
             "ids": ["b"], "shares": ["int8"]}])
        return capsys.readouterr().out

    assert "First run: torch.compile's compile cache is empty" in header(["torch.compile's"])
    sampled = header(["torch.compile's"], deferred=12)
    assert "torch/compile check a sample now (12 checks left for the next run" in sampled
    assert "First run" not in header([])


def test_each_share_runs_once_and_idle_processes_take_the_last_ones():
    """The parent's bookkeeping of shares (a variant's checks of one format): a process
    claims its own in order, one out of work takes the last share not yet started of
    the process with the most left, nothing is handed out twice, and a request made
    before every process has said what it checks waits."""
    from kvquant.conformance import scheduler as cli

    def variant(name, variant, shares):
        return {"key": f"{name}/{variant}", "name": name, "variant": variant, "shares": shares,
                "profile": "first" if variant == "compile" else "quick"}

    shares = cli._Shares(3)
    shares.add(0, [variant("numpy", "eager", ["fp8", "int8"])])
    assert shares.answer(0, ("steal",)) == cli._Shares.LATER
    shares.add(1, [variant("torch", "eager", ["fp8", "int8"]), variant("torch", "compile", ["fp8", "int8", "int4"])])
    shares.add(2, [variant("jax", "jit", ["fp8"])])
    assert shares.answer(0, ("claim", "numpy/eager", "fp8")) and shares.answer(0, ("claim", "numpy/eager", "int8"))
    assert shares.answer(1, ("claim", "torch/eager", "fp8"))
    # torch's process has the most left; the taker checks the owner's profile
    assert shares.answer(0, ("steal",)) == ("torch", "compile", "int4", "first")
    assert not shares.answer(1, ("claim", "torch/compile", "int4"))  # taken: its owner skips it
    assert shares.answer(2, ("steal",)) == ("torch", "compile", "int8", "first")
    assert shares.answer(1, ("claim", "torch/eager", "int8")) and shares.answer(1, ("claim", "torch/compile", "fp8"))
    assert shares.answer(1, ("steal",)) == ("jax", "jit", "fp8", "quick")
    assert not shares.answer(2, ("claim", "jax/jit", "fp8"))
    assert [shares.answer(lane, ("steal",)) for lane in range(3)] == [None, None, None]


def test_a_steal_waits_for_a_process_that_ended_before_saying_what_it_checks():
    from kvquant.conformance import scheduler as cli

    shares = cli._Shares(2)
    shares.add(0, [{"key": "numpy/eager", "name": "numpy", "variant": "eager", "shares": ["fp8"], "profile": "quick"}])
    assert shares.answer(0, ("steal",)) == cli._Shares.LATER
    shares.gone(1)  # it died, or stopped at a usage error
    assert shares.answer(0, ("steal",)) is None
