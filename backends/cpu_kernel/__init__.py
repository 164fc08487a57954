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
use torch.compile's path.

``load_jax()`` builds the same kernel with an XLA FFI handler around it (jax_ffi.cpp,
jaxlib's headers) and registers it, so JAX's attention under jax.jit calls it on XLA's
own buffers."""
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


def side_format(q) -> Optional[tuple]:
    """(kind, bits, group) of a Side for a QuantizedKV's format (bits and group only
    for packed codes), or None where the kernel has no kind for it."""
    from kvquant._formats import FORMATS

    info = FORMATS[q.format]
    fp8 = info.code_dtype == "float8_e4m3fn"
    if info.params == "token":
        return (FP8_TOKEN if fp8 else INT8_TOKEN), 0, 0
    if info.params == "tensor":
        return (FP8_TENSOR, 0, 0) if fp8 else None
    if info.params == "group":
        # Groups inside a token longer than it are one group of head_dim (spec section 6).
        return PACKED_GROUP, info.bits, min(q.group_size, q.shape[-1])
    if info.params == "channel":
        return PACKED_CHANNEL, info.bits, q.group_size
    return None


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


ABI_VERSION = 3  # kvquant_decode_attention_abi() in the C++ source: Side and Problem's layout, the exports

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


def _compile(compiler: str, target: str, source: str = SOURCE, extra: tuple = ()) -> Optional[str]:
    """Build the library at ``target`` (atomically); the compiler's complaint, or None."""
    try:
        with _cache_dir.atomic_path(target) as tmp:
            done = subprocess.run([compiler, *FLAGS, *extra, "-o", tmp, source], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                raise subprocess.CalledProcessError(done.returncode, compiler, done.stdout, done.stderr)
            os.chmod(tmp, 0o700)  # the linker's mode follows the umask, which may let the group write
    except subprocess.CalledProcessError as e:
        return f"{compiler} exited with {e.returncode}: {(e.stderr or e.output or '').strip()[-2000:]}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"{compiler} could not be run: {e}"
    return None


def _abi_and_isa(lib) -> tuple:
    """(the ABI version, the vector code) a kernel library reports; AttributeError where
    it lacks those exports."""
    abi, isa = lib.kvquant_decode_attention_abi, lib.kvquant_decode_attention_isa
    abi.restype, isa.restype = ctypes.c_int64, ctypes.c_char_p
    return abi(), isa().decode()


def _open(path: str):
    """The kernel's function from the library at ``path``, or None (with a warning) where
    it cannot be loaded or was built for another ABI."""
    try:
        lib = ctypes.CDLL(path)
        abi, isa = _abi_and_isa(lib)
        size = lib.kvquant_decode_attention_problem_size
        size.restype = ctypes.c_int64
        found = (abi, size())
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
    _LOADED["isa"] = isa
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


def _build(compiler: str, name: str, sources: tuple, extra: tuple, opener, what: str):
    """opener(path of the library built from sources[0] as ``name``), or None (with a
    warning) where it cannot be built: built once per source, compiler, flags and CPU,
    under a lock, a failure kept and not retried (see the module's doc)."""
    content = b""
    for source in sources:
        with open(source, "rb") as f:
            content += f.read()
    digest = hashlib.sha256(content + " ".join((compiler, *FLAGS, *extra, _cpu())).encode()).hexdigest()[:16]
    directory = _cache_dir.cache_dir("cpu-kernel")
    if directory is None:  # no private cache: a build for this process alone
        with tempfile.TemporaryDirectory(prefix="kvquant-cpu-kernel-") as private:  # mkdtemp: 0700, new
            target = os.path.join(private, f"{name}.so")
            failure = _compile(compiler, target, sources[0], extra)
            if failure is not None:
                _cache_dir.warn_once(f"kvquant: {what} did not build: {failure}")
                return None
            return opener(target)  # the loaded library outlives its file
    target = os.path.join(directory, f"{name}_{digest}.so")
    failed = target[:-3] + ".failed"
    with _cache_dir.locked(target[:-3] + ".lock"):
        if not os.path.exists(target):
            if os.path.exists(failed):
                _cache_dir.warn_once(f"kvquant: {what} failed to build before (the compiler's message is in "
                                     f"{failed}; delete it to try again)")
                return None
            failure = _compile(compiler, target, sources[0], extra)
            if failure is not None:
                _cache_dir.write_atomic(failed, failure + "\n")
                _cache_dir.warn_once(f"kvquant: {what} did not build (kept in {failed}, not tried again): {failure}")
                return None
    if not _cache_dir.loadable(target, what):
        return None
    return opener(target)


def _build_and_open(compiler: str):
    return _build(compiler, "decode_attention", (SOURCE,), (), _open, "the C++ decode kernel")


def describe() -> str:
    """Which code compiled=True runs on the CPU here, for benchmarks to print: the
    kernel's vector instructions and torch's thread count, or why torch.compile's."""
    import torch

    if load() is None:
        return f"torch.compile's kernels (no C++ kernel), {torch.get_num_threads()} threads"
    return f"C++ kernel ({_LOADED['isa']}), {torch.get_num_threads()} threads"


JAX_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jax_ffi.cpp")
JAX_TARGET = "kvquant_decode_attention"  # the XLA FFI target's name


def _register_jax(path: str) -> bool:
    """Register the handler in the library at ``path`` with XLA as JAX_TARGET (CPU)."""
    import jax

    try:
        lib = ctypes.CDLL(path)
        abi, isa = _abi_and_isa(lib)
        if abi != ABI_VERSION:
            raise OSError(f"ABI {abi}, this kvquant expects {ABI_VERSION}")
        jax.ffi.register_ffi_target(JAX_TARGET, jax.ffi.pycapsule(lib.kvquant_jax_decode_attention), platform="cpu")
        _LOADED["jax isa"] = isa
    except (OSError, AttributeError) as e:
        _cache_dir.warn_once(f"kvquant: the C++ decode kernel for JAX at {path} cannot be loaded ({e}); "
                             "JAX's attention uses its element-wise form")
        return False
    return True


def load_jax() -> bool:
    """Whether the kernel is registered with XLA as the FFI target JAX_TARGET (built
    from jax_ffi.cpp with jaxlib's FFI headers on first use, as load() builds its own);
    False where it cannot be had, for the reasons load() gives, or without the headers."""
    if "jax" not in _LOADED:
        import jax
        import jaxlib

        compiler = _compiler()
        reason = _unavailable(compiler)
        if reason is None and not os.path.isfile(JAX_SOURCE):
            reason = f"its source {JAX_SOURCE} is missing from this installation"
        include = getattr(getattr(jax, "ffi", None), "include_dir", None)
        if reason is None and (include is None or not os.path.isdir(include())):
            reason = "jaxlib's FFI headers are missing"
        if reason:
            _cache_dir.warn_once(f"kvquant: the C++ decode kernel for JAX cannot be built: {reason}; "
                                 "JAX's attention uses its element-wise form")
        _LOADED["jax"] = reason is None and bool(_build(
            compiler, "jax_decode_attention", (JAX_SOURCE, SOURCE),
            ("-I", include(), "-w", f"-DKVQUANT_JAXLIB={jaxlib.__version__}"), _register_jax,
            "the C++ decode kernel for JAX"))
    return _LOADED["jax"]


def describe_jax() -> str:
    """Which code JAX's attention runs on one CPU device here, for benchmarks to print."""
    if not load_jax():
        return "the element-wise form (no C++ kernel)"
    return f"C++ kernel ({_LOADED['jax isa']}, OpenMP's threads)"


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
