"""The CPU decode-attention kernel (cpu_decode_attention.cpp): built with the system's
C++ compiler on first use, cached on disk, called through ctypes with raw pointers.

Why a hand-written kernel: on a CPU, torch.compile's fused loops over the codes spend
their time unpacking, not reading (INT4 at 16k tokens of SmolLM2's shape ran at 7% of
a copy's bandwidth, docs/attention.md). This one dequantizes each token's row once
into a buffer that every query row of its head then reads, and splits the work across
threads by token ranges as well as heads.

Why ctypes rather than a torch extension: it includes no torch header, so it builds in
about 4 s where torch.utils.cpp_extension takes a minute, and a call costs a few
microseconds. It links OpenMP by soname, so in a process that has imported torch it
shares torch's OpenMP runtime and threads (torch.set_num_threads applies).

A build goes to ~/.cache/kvquant/cpu-kernel (XDG_CACHE_HOME), or where that cannot be
written to the temp directory. ``load()`` returns None where there is no compiler, the
build fails, the platform is not x86-64 or aarch64 Linux/macOS, or KVQUANT_CPU_KERNEL=0:
callers then use torch.compile's path."""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional

from kvquant._cache_dir import user_cache_dir

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_decode_attention.cpp")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu++17")

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


_LOADED = {}


def _cache_dirs() -> List[str]:
    """Where a build is kept: the user's cache, or (read-only home) the temp directory."""
    user = getattr(os, "getuid", lambda: 0)()
    return [user_cache_dir("cpu-kernel"), os.path.join(tempfile.gettempdir(), f"kvquant-cpu-kernel-{user}")]


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


def _build(compiler: str, target: str) -> None:
    """Into a temporary file, then renamed: processes building at once never load a
    half-written library."""
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(target))
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, "-o", tmp, SOURCE], check=True, capture_output=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load():
    """The kernel's function, or None where it cannot be had (see the module's doc)."""
    if "kernel" in _LOADED:
        return _LOADED["kernel"]
    fn = None
    compiler = _compiler()
    if (os.environ.get("KVQUANT_CPU_KERNEL", "1") != "0" and compiler is not None
            and sys.platform in ("linux", "darwin") and platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64")):
        with open(SOURCE, "rb") as f:
            digest = hashlib.sha256(f.read() + " ".join((compiler, *FLAGS, _cpu())).encode()).hexdigest()[:16]
        for directory in _cache_dirs():
            target = os.path.join(directory, f"decode_attention_{digest}.so")
            try:
                if not os.path.exists(target):
                    _build(compiler, target)
                fn = ctypes.CDLL(target).kvquant_decode_attention
            except subprocess.SubprocessError:
                break  # the compiler failed: another directory would not help
            except OSError:
                continue
            fn.argtypes = [ctypes.POINTER(Problem)]
            fn.restype = ctypes.c_int
            break
    _LOADED["kernel"] = fn
    return fn
