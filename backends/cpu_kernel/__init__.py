"""The CPU decode-attention kernel (decode_attention.cpp): built with the system's
C++ compiler on first use, cached on disk, called through ctypes with raw pointers.

Why a hand-written kernel: on a CPU, torch.compile's fused loops over the codes spend
their time unpacking, not reading (INT4 at 16k tokens of SmolLM2's shape ran at 7% of
a copy's bandwidth, docs/attention.md). This one dequantizes each token's row once
into a buffer that every query row of its head then reads, and splits the work across
threads by token ranges as well as heads.

Why ctypes rather than a torch extension: it includes no torch header, so it builds in
seconds where torch.utils.cpp_extension takes a minute, and a call costs little
(docs/attention.md). It links OpenMP by soname, so in a process that has imported torch it
shares torch's OpenMP runtime and threads (torch.set_num_threads applies).

A build is kept in kvquant's private cache (kvquant/_cache_dir.py: ~/.cache/kvquant/
cpu-kernel, 0700, this user's only), built under a lock so that processes starting
together compile once, and named by the hash of the source, compiler, flags and CPU. A
failed build leaves its compiler message there and is not tried again by later
processes (delete the .failed file to retry). Without a private cache (read-only home)
each process builds into a fresh private temporary directory, removed once loaded.
``load()`` returns None, with a one-line warning where something is wrong, where there
is no compiler or source, the build fails, the library's ABI is not this module's, the
platform is not x86-64 or aarch64 Linux/macOS, or KVQUANT_CPU_KERNEL=0: callers then
use torch.compile's path."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from kvquant import _cache_dir

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode_attention.cpp")
# KVQUANT_CPU_KERNEL_MARCH: another -march than native (e.g. x86-64-v3, AVX2 without
# AVX-512, to measure that path on a machine that has both).
FLAGS = ("-O3", f"-march={os.environ.get('KVQUANT_CPU_KERNEL_MARCH') or 'native'}", "-fopenmp", "-shared", "-fPIC",
         "-std=gnu++17")

# Side.kind in the C++ source.
NONE, INT8_TOKEN, FP8_TOKEN, FP8_TENSOR, PACKED_GROUP, PACKED_CHANNEL = range(6)


class Side(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32), ("bits", ctypes.c_int32), ("group", ctypes.c_int64), ("tokens", ctypes.c_int64),
        ("codes", ctypes.c_void_p), ("codes_b", ctypes.c_int64), ("codes_h", ctypes.c_int64), ("codes_t", ctypes.c_int64),
        ("scales", ctypes.c_void_p), ("scales_b", ctypes.c_int64), ("scales_h", ctypes.c_int64), ("scales_t", ctypes.c_int64),
        ("zeros", ctypes.c_void_p), ("zeros_b", ctypes.c_int64), ("zeros_h", ctypes.c_int64), ("zeros_t", ctypes.c_int64),
        ("window", ctypes.c_int64), ("window_bf16", ctypes.c_int32),
        ("win", ctypes.c_void_p), ("win_b", ctypes.c_int64), ("win_h", ctypes.c_int64), ("win_t", ctypes.c_int64),
    ]


class Problem(ctypes.Structure):
    _fields_ = [
        ("query", ctypes.c_void_p), ("batch", ctypes.c_int64), ("heads", ctypes.c_int64), ("rows", ctypes.c_int64),
        ("dim", ctypes.c_int64), ("scale", ctypes.c_float), ("chunk", ctypes.c_int64),
        ("mask", ctypes.c_void_p), ("new_tokens", ctypes.c_int64), ("causal", ctypes.c_int32),
        ("keys", Side), ("values", Side), ("out", ctypes.c_void_p),
    ]


ABI_VERSION = 2  # kvquant_decode_attention_abi() in the C++ source: Side and Problem's layout, the exports

_LOADED = {}


def _cpu() -> str:
    """What -march=native compiles for: a cache directory shared by machines of other
    CPUs (a home directory on a network disk) gets one build per CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def _compiler() -> Optional[str]:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def _compile(compiler: str, target: str) -> Optional[str]:
    """Build the library at ``target`` (atomically); the compiler's complaint, or None."""
    try:
        with _cache_dir.atomic_path(target) as tmp:
            done = subprocess.run([compiler, *FLAGS, "-o", tmp, SOURCE], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise subprocess.CalledProcessError(done.returncode, compiler, done.stdout, done.stderr)
            os.chmod(tmp, 0o700)  # the linker's mode follows the umask, which may let the group write
    except subprocess.CalledProcessError as e:
        return f"{compiler} exited with {e.returncode}: {(e.stderr or e.output or '').strip()[-2000:]}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{compiler} could not be run: {e}"
    return None


def _open(path: str):
    """The kernel's function from the library at ``path``, or None (with a warning) where
    it cannot be loaded or was built for another ABI."""
    try:
        lib = ctypes.CDLL(path)
        abi, size = lib.kvquant_decode_attention_abi, lib.kvquant_decode_attention_problem_size
        abi.restype = size.restype = ctypes.c_int64
        found = (abi(), size())
        isa = lib.kvquant_decode_attention_isa
    except (OSError, AttributeError) as e:
        _cache_dir.warn_once(f"kvquant: the C++ decode kernel at {path} cannot be loaded ({e}); "
                             "attention uses torch.compile's kernels")
        return None
    if found != (ABI_VERSION, ctypes.sizeof(Problem)):
        _cache_dir.warn_once(f"kvquant: the C++ decode kernel at {path} has ABI {found[0]} with a {found[1]}-byte "
                             f"Problem, this kvquant expects {ABI_VERSION} and {ctypes.sizeof(Problem)}; "
                             "attention uses torch.compile's kernels")
        return None
    fn = lib.kvquant_decode_attention
    fn.argtypes = [ctypes.POINTER(Problem)]
    fn.restype = ctypes.c_int
    isa.restype = ctypes.c_char_p
    _LOADED["isa"] = isa().decode()
    return fn


def _unavailable(compiler: Optional[str]) -> Optional[str]:
    """Why the kernel cannot be had here (None: it can be built); "" where that is by the
    user's choice or the platform's, which needs no warning."""
    if os.environ.get("KVQUANT_CPU_KERNEL", "1") == "0":
        return ""
    if sys.platform not in ("linux", "darwin") or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return ""
    if compiler is None:
        return ""  # no C++ compiler: torch.compile's kernels, as documented
    if not os.path.isfile(SOURCE):
        return f"its source {SOURCE} is missing from this installation"
    return None


def _build_and_open(compiler: str):
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join((compiler, *FLAGS, _cpu())).encode()).hexdigest()[:16]
    directory = _cache_dir.cache_dir("cpu-kernel")
    if directory is None:  # no private cache: a build for this process alone
        with tempfile.TemporaryDirectory(prefix="kvquant-cpu-kernel-") as private:  # mkdtemp: 0700, new
            target = os.path.join(private, "decode_attention.so")
            failure = _compile(compiler, target)
            if failure is not None:
                _cache_dir.warn_once(f"kvquant: the C++ decode kernel did not build: {failure}")
                return None
            return _open(target)  # the loaded library outlives its file
    target = os.path.join(directory, f"decode_attention_{digest}.so")
    failed = target[:-3] + ".failed"
    with _cache_dir.locked(target[:-3] + ".lock"):
        if not os.path.exists(target):
            if os.path.exists(failed):
                _cache_dir.warn_once(f"kvquant: the C++ decode kernel failed to build before (the compiler's message "
                                     f"is in {failed}; delete it to try again); attention uses torch.compile's kernels")
                return None
            failure = _compile(compiler, target)
            if failure is not None:
                _cache_dir.write_atomic(failed, failure + "\n")
                _cache_dir.warn_once(f"kvquant: the C++ decode kernel did not build (kept in {failed}, not tried "
                                     f"again): {failure}")
                return None
    if not _cache_dir.loadable(target, "the C++ decode kernel"):
        return None
    return _open(target)


def describe() -> str:
    """Which code compiled=True runs on the CPU here, for benchmarks to print: the
    kernel's vector instructions and torch's thread count, or why torch.compile's."""
    import torch

    if load() is None:
        return f"torch.compile's kernels (no C++ kernel), {torch.get_num_threads()} threads"
    return f"C++ kernel ({_LOADED['isa']}), {torch.get_num_threads()} threads"


def load():
    """The kernel's function, or None where it cannot be had (see the module's doc)."""
    if "kernel" not in _LOADED:
        compiler = _compiler()
        reason = _unavailable(compiler)
        if reason:
            _cache_dir.warn_once(f"kvquant: the C++ decode kernel cannot be built: {reason}; "
                                 "attention uses torch.compile's kernels")
        _LOADED["kernel"] = _build_and_open(compiler) if reason is None else None
    return _LOADED["kernel"]
