"""What kvquant writes and loads on disk (kvquant/_cache_dir.py): only private
directories, atomic writes, a lock around kernel builds, failed builds kept, and only
its own marked directories pruned. Each attack is planted and shown refused."""
from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from kvquant import _cache_dir
from kvquant.backends import cpu_kernel

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def fresh_kernel(monkeypatch):
    """cpu_kernel.load() as a new process sees it; the process's kernel put back after."""
    saved = dict(cpu_kernel._LOADED)
    cpu_kernel._LOADED.clear()
    monkeypatch.setattr(_cache_dir, "_WARNED", set())
    monkeypatch.delenv("KVQUANT_CPU_KERNEL", raising=False)
    yield
    cpu_kernel._LOADED.clear()
    cpu_kernel._LOADED.update(saved)


def _stub_compiler(tmp_path, *, abi: int = cpu_kernel.ABI_VERSION, fail: bool = False, sleep: float = 0.0) -> str:
    """A CXX that logs each call and builds, in a fraction of a second, a library with the
    kernel's three symbols (or fails, like a broken toolchain)."""
    stub = tmp_path / "stub.c"
    stub.write_text(textwrap.dedent(f"""
        #include <stdint.h>
        int64_t kvquant_decode_attention_abi(void) {{ return {abi}; }}
        int64_t kvquant_decode_attention_problem_size(void) {{ return {ctypes.sizeof(cpu_kernel.Problem)}; }}
        int kvquant_decode_attention(const void* p) {{ return 1; }}
        const char* kvquant_decode_attention_isa(void) {{ return "stub"; }}
    """))
    script = tmp_path / "fake-cxx"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import subprocess, sys, time
        open({str(tmp_path / 'compiler.log')!r}, "a").write("called\\n")
        time.sleep({sleep})
        if {fail}:
            sys.stderr.write("stub.cpp:1: error: planted compiler failure\\n")
            sys.exit(1)
        out = sys.argv[sys.argv.index("-o") + 1]
        sys.exit(subprocess.call(["gcc", "-shared", "-fPIC", "-o", out, {str(stub)!r}]))
    """))
    script.chmod(0o755)
    return str(script)


def _compiler_calls(tmp_path) -> int:
    log = tmp_path / "compiler.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _planted_library(tmp_path, path) -> str:
    """A library at ``path`` whose constructor leaves a file behind: the file exists
    exactly when someone loaded it."""
    proof = tmp_path / "planted-library-ran"
    source = tmp_path / "planted.c"
    source.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void ran(void) {{ fclose(fopen("{proof}", "w")); }}
    """))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(path), str(source)], check=True)
    return str(proof)


def _kernel_name(tmp_path, monkeypatch, compiler) -> str:
    """The file name load() builds and looks for with this compiler (public inputs: an
    attacker can compute it too)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "learn"))
    monkeypatch.setenv("CXX", compiler)
    assert cpu_kernel.load() is not None
    cpu_kernel._LOADED.clear()
    (name,) = [n for n in os.listdir(tmp_path / "learn" / "kvquant" / "cpu-kernel") if n.endswith(".so")]
    return name


# ---------------------------------------------------------------- directories
def test_cache_directories_are_created_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg" / "cache"))
    path = _cache_dir.cache_dir("cpu-kernel")
    assert path == str(tmp_path / "xdg" / "cache" / "kvquant" / "cpu-kernel")
    for p in (path, os.path.dirname(path), str(tmp_path / "xdg" / "cache"), str(tmp_path / "xdg")):
        assert _mode(p) == 0o700, p


@pytest.mark.parametrize("attack", ["writable-by-others", "owned-by-another-user", "parent-writable-not-sticky"])
def test_a_directory_that_is_not_private_is_refused_with_one_warning(tmp_path, monkeypatch, attack):
    if attack == "owned-by-another-user" and not IS_ROOT:
        pytest.skip("planting another user's directory needs root")
    monkeypatch.setattr(_cache_dir, "_WARNED", set())
    root = tmp_path / "xdg"
    (root / "kvquant" / "jax").mkdir(parents=True, mode=0o700)
    if attack == "writable-by-others":
        os.chmod(root / "kvquant" / "jax", 0o777)
    elif attack == "owned-by-another-user":
        os.chown(root / "kvquant", NOBODY, NOBODY)
    else:
        os.chmod(root / "kvquant", 0o777)
    monkeypatch.setenv("XDG_CACHE_HOME", str(root))
    with pytest.warns(RuntimeWarning, match="not keeping") as seen:
        assert _cache_dir.cache_dir("jax") is None
        assert _cache_dir.cache_dir("jax") is None
    assert len(seen) == 1 and "\n" not in str(seen[0].message)


def test_a_file_others_can_write_is_not_loaded(tmp_path, monkeypatch):
    monkeypatch.setattr(_cache_dir, "_WARNED", set())
    path = tmp_path / "graph.pt2"
    path.write_bytes(b"x")
    os.chmod(path, 0o600)
    assert _cache_dir.loadable(str(path), "a graph")
    os.chmod(path, 0o666)
    with pytest.warns(RuntimeWarning, match="writable by other users"):
        assert not _cache_dir.loadable(str(path), "a graph")


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    target = tmp_path / "report.json"
    _cache_dir.write_atomic(str(target), "old")
    with pytest.raises(RuntimeError):
        with _cache_dir.atomic_path(str(target)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left


def test_pruning_removes_only_marked_directories(tmp_path):
    root = tmp_path / "root"
    root.mkdir(mode=0o700)
    users = []
    for i in range(5):  # a user's folders, with hex names and old times: never ours
        folder = root / f"{i:024x}"
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
        os.utime(folder, (1, 1))
        users.append(folder)
    ours = []
    for i in range(4):
        path = _cache_dir.owned_subdir(str(root), f"{i + 10:024x}")
        os.utime(path, (100 + i, 100 + i))
        ours.append(path)
    forged = root / f"{99:024x}"  # a marker someone else could write is not ours either
    forged.mkdir()
    (forged / _cache_dir.MARKER).write_text("x")
    os.chmod(forged / _cache_dir.MARKER, 0o666)
    os.utime(forged, (1, 1))
    _cache_dir.prune_owned(str(root), 2, "[0-9a-f]{24}")
    assert all(f.exists() and (f / "notes.txt").read_text() == "mine" for f in users)
    assert forged.exists()
    assert [os.path.exists(p) for p in ours] == [False, False, True, True]


# ---------------------------------------------------------------- the C++ kernel
@pytest.mark.parametrize("attack", ["cache-owned-by-another-user", "cache-writable-by-others",
                                    "old-temp-fallback-with-unusable-home"])
def test_a_planted_kernel_library_is_never_loaded(tmp_path, monkeypatch, fresh_kernel, attack):
    if attack == "cache-owned-by-another-user" and not IS_ROOT:
        pytest.skip("planting another user's directory needs root")
    compiler = _stub_compiler(tmp_path)
    name = _kernel_name(tmp_path, monkeypatch, compiler)
    if attack == "old-temp-fallback-with-unusable-home":
        # Earlier kvquant fell back to <tmp>/kvquant-cpu-kernel-<uid>, whoever made it.
        monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null/cache")
        monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
        planted_dir = tmp_path / "tmp" / f"kvquant-cpu-kernel-{os.geteuid()}"
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "attacked"))
        planted_dir = tmp_path / "attacked" / "kvquant" / "cpu-kernel"
    planted_dir.mkdir(parents=True)
    os.chmod(planted_dir.parent, 0o700)
    proof = _planted_library(tmp_path, planted_dir / name)
    if attack == "cache-owned-by-another-user":
        os.chown(planted_dir, NOBODY, NOBODY)
        os.chown(planted_dir / name, NOBODY, NOBODY)
    elif attack == "cache-writable-by-others":
        os.chmod(planted_dir, 0o777)
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    with pytest.warns(RuntimeWarning, match="not keeping"):
        fn = cpu_kernel.load()
    assert not os.path.exists(proof), "kvquant loaded a library another user planted"
    assert fn is not None  # built for this process alone instead
    assert os.listdir(planted_dir) == [name]  # nothing written where others can reach
    if attack == "old-temp-fallback-with-unusable-home":
        assert sorted(os.listdir(tmp_path / "tmp")) == [planted_dir.name]  # the private build dir is gone


def test_a_failed_build_is_reported_once_and_not_retried(tmp_path, monkeypatch, fresh_kernel):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CXX", _stub_compiler(tmp_path, fail=True))
    with pytest.warns(RuntimeWarning, match="planted compiler failure"):
        assert cpu_kernel.load() is None
    (failed,) = [p for p in os.listdir(tmp_path / "xdg" / "kvquant" / "cpu-kernel") if p.endswith(".failed")]
    assert _compiler_calls(tmp_path) == 1
    # A new process: no second build, and it says where the compiler's message is.
    code = "import warnings; warnings.simplefilter('always'); from kvquant.backends import cpu_kernel; " \
           "assert cpu_kernel.load() is None"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert failed in done.stderr and "delete it to try again" in done.stderr
    assert _compiler_calls(tmp_path) == 1


def test_processes_building_at_once_compile_once(tmp_path, monkeypatch):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"), CXX=_stub_compiler(tmp_path, sleep=1.0))
    env.pop("KVQUANT_CPU_KERNEL", None)
    code = "from kvquant.backends import cpu_kernel; print(cpu_kernel.load() is not None)"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["True"] * 3
    assert _compiler_calls(tmp_path) == 1


def test_a_library_of_another_abi_is_refused(tmp_path, monkeypatch, fresh_kernel):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CXX", _stub_compiler(tmp_path, abi=cpu_kernel.ABI_VERSION + 98))
    with pytest.warns(RuntimeWarning, match="ABI"):
        assert cpu_kernel.load() is None


def test_a_missing_source_falls_back_with_a_warning(tmp_path, monkeypatch, fresh_kernel):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cpu_kernel, "SOURCE", str(tmp_path / "missing.cpp"))
    with pytest.warns(RuntimeWarning, match="missing from this installation"):
        assert cpu_kernel.load() is None


def test_a_compiler_that_cannot_run_falls_back_with_a_warning(tmp_path, monkeypatch, fresh_kernel):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.warns(RuntimeWarning, match="could not be run"):
        assert cpu_kernel.load() is None


def test_the_real_kernel_builds_with_an_unusable_home_and_leaves_nothing(tmp_path, monkeypatch, fresh_kernel):
    if cpu_kernel._compiler() is None:
        pytest.skip("no C++ compiler")
    monkeypatch.setenv("XDG_CACHE_HOME", "/dev/null/cache")  # cannot be created
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.warns(RuntimeWarning, match="not keeping"):
        assert cpu_kernel.load() is not None
    assert os.listdir(tmp_path / "tmp") == []


# ---------------------------------------------------------------- saved torch graphs
def test_saved_graphs_never_delete_a_users_folders(tmp_path, monkeypatch):
    torch_graphs = pytest.importorskip("kvquant.backends.torch.graphs")
    root = tmp_path / "projects"  # KVQUANT_TORCH_GRAPHS_DIR pointed at a folder of the user's
    root.mkdir(mode=0o700)
    for i in range(5):
        (root / f"project-{i}").mkdir()
        (root / f"project-{i}" / "main.py").write_text("print('mine')")
        os.utime(root / f"project-{i}", (1, 1))
    old = [_cache_dir.owned_subdir(str(root), f"{i:024x}") for i in range(4)]  # kvquant's, older
    for i, path in enumerate(old):
        os.utime(path, (10 + i, 10 + i))
    monkeypatch.setenv("KVQUANT_TORCH_GRAPHS_DIR", str(root))
    torch_graphs.saved_graphs_dir.cache_clear()
    try:
        current = torch_graphs.saved_graphs_dir()
    finally:
        torch_graphs.saved_graphs_dir.cache_clear()
    assert current is not None and _cache_dir.is_owned(current)
    assert all((root / f"project-{i}" / "main.py").read_text() == "print('mine')" for i in range(5))
    kept = torch_graphs.GRAPH_DIRS_KEPT - 1
    assert [os.path.exists(p) for p in old] == [False] * (4 - kept) + [True] * kept


def test_saved_graphs_refuse_a_shared_root(tmp_path, monkeypatch):
    torch_graphs = pytest.importorskip("kvquant.backends.torch.graphs")
    monkeypatch.setattr(_cache_dir, "_WARNED", set())
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    monkeypatch.setenv("KVQUANT_TORCH_GRAPHS_DIR", str(shared))
    torch_graphs.saved_graphs_dir.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="writable by other users"):
            assert torch_graphs.saved_graphs_dir() is None
    finally:
        torch_graphs.saved_graphs_dir.cache_clear()
    assert os.listdir(shared) == []
