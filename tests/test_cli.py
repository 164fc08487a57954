"""The kvquant command as a new user meets it: usage errors in one line with their own
exit code, the families in --help, progress while it runs, a report that can be
compared later."""
import json
import os
import subprocess
import sys

import pytest


def kvquant(*args, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "KVQUANT_BACKEND"}
    return subprocess.run([sys.executable, "-m", "kvquant.cli", *args], cwd=cwd, capture_output=True, text=True, env=env)


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
