"""Deliberately broken backends: each is the spec transcription with one classic bug.

The conformance suite must fail every one of them, and say where. Each entry names
the operation and output where the bug must show up first.
"""
import os
import time
import types

import ml_dtypes
import numpy as np

from kvquant.conformance import transcription as spec_kernels
from kvquant._ops import CONTRACT, CONTRACT_V11, BackendOps
from kvquant.backends.numpy.runtime import NumpyRuntime

F32 = np.float32
k = spec_kernels


def _half_away(v):
    return np.sign(v) * np.floor(np.abs(v) + F32(0.5))


def int8_round_half_away(x):
    t = k._read(x)
    scale, poisoned = k._sym_scale(k._row_max_abs(t), k.R127)
    with np.errstate(all="ignore"):
        q = np.clip(_half_away(k.flush(t * (F32(1) / scale)[:, None])), -127, 127)
    return np.where(poisoned[:, None], 0, q).astype(np.int8), scale


def int8_divide(x):
    t = k._read(x)
    scale, poisoned = k._sym_scale(k._row_max_abs(t), k.R127)
    with np.errstate(all="ignore"):
        q = np.clip(np.rint(k.flush(t / scale[:, None])), -127, 127)  # x / s, not x * (1/s)
    return np.where(poisoned[:, None], 0, q).astype(np.int8), scale


def int8_full_range(x):
    t = k._read(x)
    scale, poisoned = k._sym_scale(k._row_max_abs(t), F32(1) / F32(128))
    with np.errstate(all="ignore"):
        q = np.clip(np.rint(k.flush(t * (F32(1) / scale)[:, None])), -128, 127)
    return np.where(poisoned[:, None], 0, q).astype(np.int8), scale


def int8_inf_scale(x):
    t = k._read(x)
    amax = k._row_max_abs(t)
    with np.errstate(all="ignore"):
        # +-inf tokens keep an infinite scale (only NaN makes a NaN one): never raised.
        scale = np.where(amax == 0, F32(1), np.maximum(amax * k.R127, k.S_MIN)).astype(F32)
        q = np.clip(np.rint(k.flush(t * (F32(1) / scale)[:, None])), -127, 127)
    return np.where(np.isfinite(scale)[:, None], q, 0).astype(np.int8), scale


def fp8_no_clamp(x, static_scale):
    t = k._read(x)
    if static_scale is None:
        return k.fp8_quantize_per_tensor(x, None)
    poisoned = not np.isfinite(t).all()
    scale = F32(static_scale)
    with np.errstate(all="ignore"):
        code = k.flush(t * k.flush(F32(1) / scale)).astype(ml_dtypes.float8_e4m3fn)  # no clamp
    if poisoned:
        return np.zeros_like(code), np.array(k.NAN, F32)
    return code, np.array(scale, F32)


def int4_dequant_fma(packed, scales, zeros, g, out_dtype):
    n, half = packed.shape
    d = half * 2
    q = np.empty((n, d), np.float64)
    q[:, 0::2] = packed & 0xF
    q[:, 1::2] = packed >> 4
    s = k.flush(scales).astype(np.float64)
    z = k.flush(zeros)
    idx = np.arange(d) // g
    offset = (-(z * k.flush(scales))).astype(np.float64)  # -zero*scale, rounded to float32
    with np.errstate(all="ignore"):
        v = k.flush((q * s[:, idx] + offset[:, idx]).astype(F32))  # q*scale + offset, rounded once
    return k._out(v, out_dtype)


def int4_swapped_nibbles(x, g):
    packed, scales, zeros = k.int4_quantize(x, g)
    return ((packed >> 4) | (packed << 4)).astype(np.uint8), scales, zeros


def int4_groups_span_tokens(x, g):
    n, d = x.shape
    flat = np.asarray(x).reshape(1, n * d)
    packed, scales, zeros = k.int4_quantize(flat, g)
    ng = -(-d // g)
    # Spread the flat groups back over tokens as if they were per token.
    s = np.resize(scales.reshape(-1), n * ng).reshape(n, ng)
    z = np.resize(zeros.reshape(-1), n * ng).reshape(n, ng)
    return packed.reshape(n, d // 2), s.astype(F32), z.astype(F32)


def int4_channel_reshape_not_transpose(x, g):
    """Each block [G, D] read as [D, G] and transposed: the classic reshape-for-transpose
    bug. Every shape is right; the (block, channel) groups hold the wrong elements."""
    n, d = x.shape
    scrambled = np.asarray(x).reshape(n // g, d, g).transpose(0, 2, 1).reshape(n, d)
    return k.int4_channel_quantize(scrambled, g)


def int4_channel_whole_history(x, g):
    """Per-channel statistics over every token at once, repeated for each block: right
    shapes, and right whenever there is one block; streaming by blocks breaks it."""
    n, d = x.shape
    if n == 0:
        return k.int4_channel_quantize(x, g)
    packed, scales, zeros = k._channel_quantize(x, n, k.R15, 15, 2)
    return packed, np.repeat(scales, n // g, axis=0), np.repeat(zeros, n // g, axis=0)


def int2_packed_high_first(x, g):
    """Element 4j in bits 6-7 instead of 0-1 (the order of some other libraries)."""
    packed, scales, zeros = k.int2_quantize(x, g)
    crumbs = [(packed >> (2 * i)) & 3 for i in range(4)]
    return (crumbs[3] | (crumbs[2] << 2) | (crumbs[1] << 4) | (crumbs[0] << 6)).astype(np.uint8), scales, zeros


BROKEN = {
    # name: (overrides, operation where it must show, output)
    "round-half-away": ({"int8_quantize": int8_round_half_away}, "quantize_kv_int8", "codes"),
    "divide-not-multiply": ({"int8_quantize": int8_divide}, "quantize_kv_int8", "codes"),
    "fused-dequant": ({"int4_dequantize": int4_dequant_fma}, "dequantize_kv_int4", "dequant[float32]"),
    "cast-without-clamp": ({"fp8_quantize_per_tensor": fp8_no_clamp}, "quantize_kv_fp8_per_tensor", "codes"),
    "swapped-nibbles": ({"int4_quantize": int4_swapped_nibbles}, "quantize_kv_int4", "codes"),
    "int8-full-range": ({"int8_quantize": int8_full_range}, "quantize_kv_int8", "codes"),
    "groups-span-tokens": ({"int4_quantize": int4_groups_span_tokens}, "quantize_kv_int4", "codes"),
    "inf-scale-not-nan": ({"int8_quantize": int8_inf_scale}, "quantize_kv_int8", "scales"),
    # spec v1.1
    "channel-token-axes-swapped": ({"int4_channel_quantize": int4_channel_reshape_not_transpose},
                                   "quantize_kv_int4_per_channel", "codes"),
    "channel-stats-over-history": ({"int4_channel_quantize": int4_channel_whole_history},
                                   "quantize_kv_int4_per_channel", "codes"),
    "int2-packed-high-first": ({"int2_quantize": int2_packed_high_first}, "quantize_kv_int2", "codes"),
}


def make_broken(name: str, versions=("1", "1.1")) -> BackendOps:
    """The spec transcription with one bug (``name``; "none" for none), implementing
    the kernels of the given spec versions only."""
    overrides = BROKEN[name][0] if name != "none" else {}
    names = CONTRACT + (CONTRACT_V11 if "1.1" in versions else ())
    kernels = types.SimpleNamespace(**{fn: getattr(k, fn) for fn in names})
    for fn, impl in overrides.items():
        setattr(kernels, fn, impl)

    class BrokenRuntime(NumpyRuntime):
        pass

    BrokenRuntime.name = f"broken-{name}"
    return BackendOps(f"broken-{name}", BrokenRuntime(), kernels, variant="eager")


# Entry points for tests of the command, which runs backends in processes of its own:
# a backend with one bug, the same slowed down, and one whose process dies inside a kernel.
def round_half_away_backend() -> BackendOps:
    return make_broken("round-half-away")


def slow_round_half_away_backend() -> BackendOps:
    """Slow enough that a process checking the reference beside it runs out of work
    first and takes shares of this one's."""
    ops = make_broken("round-half-away")
    for fn in CONTRACT + CONTRACT_V11:
        def slowed(*args, _impl=getattr(ops.kernels, fn), **kwargs):
            time.sleep(0.1)
            return _impl(*args, **kwargs)
        setattr(ops.kernels, fn, slowed)
    return ops


def dying_backend() -> BackendOps:
    ops = make_broken("none")

    def die(*args, **kwargs):
        os._exit(3)

    ops.kernels.int8_quantize = die
    return ops


def _mark(kind: str) -> None:
    """An empty file KVQUANT_TEST_MARKS/<kind>.<pid>: what a test's backend process did."""
    with open(os.path.join(os.environ["KVQUANT_TEST_MARKS"], f"{kind}.{os.getpid()}"), "w"):
        pass


def slow_to_exit_backend() -> BackendOps:
    """A correct backend whose process takes a while to exit, as one with a framework's
    exit handlers and compile workers does; it marks when it was made and when it exited."""
    import atexit

    _mark("made")

    def exit_slowly():
        time.sleep(2)
        _mark("exited")

    atexit.register(exit_slowly)
    return make_broken("none")


def hanging_backend() -> BackendOps:
    """A backend whose process marks itself and then spends minutes inside a kernel, as
    a long compile does."""
    _mark("made")
    ops = make_broken("none")

    def hang(*args, **kwargs):
        time.sleep(300)

    for fn in CONTRACT + CONTRACT_V11:
        setattr(ops.kernels, fn, hang)
    return ops
