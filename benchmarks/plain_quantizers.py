"""The quantizers a user would write in each framework without kvquant: the same
formats and outputs (codes of the same dtype and shape, float32 scales), fast and
short, with none of the spec's guarantees: no flush of subnormals, no exact
reciprocal (a multiply by 448 / amax or 15 / range, as fast code does it), no NaN or
zero-range handling, no promise of the same bits anywhere. bench_quantize.py times
them beside kvquant in the same run, so the table says what bit-exactness costs in
each framework, or saves.

Each framework is imported only when its quantizers are asked for.
"""
from __future__ import annotations

FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_MAX = 15.0
GROUP_SIZE = 64


def numpy_quantizers():
    import ml_dtypes
    import numpy as np

    return _namespace_quantizers(np, ml_dtypes.float8_e4m3fn)


def jax_quantizers():
    import jax.numpy as jnp

    return _namespace_quantizers(jnp, jnp.float8_e4m3fn)


def _namespace_quantizers(xp, float8_e4m3fn):
    """NumPy's and JAX's, written once: jax.numpy spells every call here as NumPy does."""

    def fp8_per_token(x):
        amax = xp.abs(x).max(axis=-1, keepdims=True)
        return (x * (FP8_MAX / amax)).astype(float8_e4m3fn), amax / FP8_MAX

    def fp8_per_tensor(x):
        amax = xp.abs(x).max()
        return (x * (FP8_MAX / amax)).astype(float8_e4m3fn), amax / FP8_MAX

    def fp8_dequantize(codes, scales):
        return codes.astype(xp.float32) * scales

    def int8(x):
        amax = xp.abs(x).max(axis=-1, keepdims=True)
        return xp.rint(x * (INT8_MAX / amax)).astype(xp.int8), amax / INT8_MAX

    def int8_dequantize(codes, scales):
        return codes.astype(xp.float32) * scales

    def int4(x):
        groups = x.reshape(-1, GROUP_SIZE)
        mn, mx = groups.min(axis=-1, keepdims=True), groups.max(axis=-1, keepdims=True)
        q = xp.rint((groups - mn) * (INT4_MAX / (mx - mn))).astype(xp.uint8)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        return packed.reshape(x.shape[0], -1), (mx - mn) / INT4_MAX, mn

    def int4_dequantize(packed, scales, mins):
        pairs = packed.reshape(-1, GROUP_SIZE // 2)
        q = xp.stack([pairs & 15, pairs >> 4], axis=-1).reshape(-1, GROUP_SIZE).astype(xp.float32)
        return (q * scales + mins).reshape(packed.shape[0], -1)

    return _table(fp8_per_token, fp8_per_tensor, fp8_dequantize, int8, int8_dequantize, int4, int4_dequantize)


def torch_quantizers():
    import torch

    def fp8_per_token(x):
        amax = x.abs().amax(-1, keepdim=True)
        return (x * (FP8_MAX / amax)).to(torch.float8_e4m3fn), amax / FP8_MAX

    def fp8_per_tensor(x):
        amax = x.abs().amax()
        return (x * (FP8_MAX / amax)).to(torch.float8_e4m3fn), amax / FP8_MAX

    def fp8_dequantize(codes, scales):
        return codes.to(torch.float32) * scales

    def int8(x):
        amax = x.abs().amax(-1, keepdim=True)
        return torch.round(x * (INT8_MAX / amax)).to(torch.int8), amax / INT8_MAX

    def int8_dequantize(codes, scales):
        return codes.to(torch.float32) * scales

    def int4(x):
        groups = x.reshape(-1, GROUP_SIZE)
        mn, mx = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        q = torch.round((groups - mn) * (INT4_MAX / (mx - mn))).to(torch.uint8)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        return packed.reshape(x.shape[0], -1), (mx - mn) / INT4_MAX, mn

    def int4_dequantize(packed, scales, mins):
        pairs = packed.reshape(-1, GROUP_SIZE // 2)
        q = torch.stack([pairs & 15, pairs >> 4], dim=-1).reshape(-1, GROUP_SIZE).to(torch.float32)
        return (q * scales + mins).reshape(packed.shape[0], -1)

    return _table(fp8_per_token, fp8_per_tensor, fp8_dequantize, int8, int8_dequantize, int4, int4_dequantize)


def _table(fp8_per_token, fp8_per_tensor, fp8_dequantize, int8, int8_dequantize, int4, int4_dequantize):
    """{kvquant format name: (quantize(x) -> tuple, dequantize(*that tuple) -> float32)},
    for [tokens, head_dim] float32 input (INT4: head_dim a multiple of GROUP_SIZE)."""
    return {
        "fp8": (fp8_per_token, fp8_dequantize),
        "fp8_per_tensor": (fp8_per_tensor, fp8_dequantize),
        "int8": (int8, int8_dequantize),
        "int4": (int4, int4_dequantize),
    }


QUANTIZERS = {"numpy": numpy_quantizers, "torch": torch_quantizers, "jax": jax_quantizers}
