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

    def fp8_per_token(x):
        amax = np.abs(x).max(axis=-1, keepdims=True)
        return (x * (FP8_MAX / amax)).astype(ml_dtypes.float8_e4m3fn), amax / FP8_MAX

    def fp8_per_tensor(x):
        amax = np.abs(x).max()
        return (x * (FP8_MAX / amax)).astype(ml_dtypes.float8_e4m3fn), amax / FP8_MAX

    def fp8_dequantize(codes, scales):
        return codes.astype(np.float32) * scales

    def int8(x):
        amax = np.abs(x).max(axis=-1, keepdims=True)
        return np.rint(x * (INT8_MAX / amax)).astype(np.int8), amax / INT8_MAX

    def int8_dequantize(codes, scales):
        return codes.astype(np.float32) * scales

    def int4(x):
        groups = x.reshape(-1, GROUP_SIZE)
        mn, mx = groups.min(axis=-1, keepdims=True), groups.max(axis=-1, keepdims=True)
        q = np.rint((groups - mn) * (INT4_MAX / (mx - mn))).astype(np.uint8)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        return packed.reshape(x.shape[0], -1), (mx - mn) / INT4_MAX, mn

    def int4_dequantize(packed, scales, mins):
        pairs = packed.reshape(-1, GROUP_SIZE // 2)
        q = np.stack([pairs & 15, pairs >> 4], axis=-1).reshape(-1, GROUP_SIZE).astype(np.float32)
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


def jax_quantizers():
    import jax.numpy as jnp

    def fp8_per_token(x):
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        return (x * (FP8_MAX / amax)).astype(jnp.float8_e4m3fn), amax / FP8_MAX

    def fp8_per_tensor(x):
        amax = jnp.max(jnp.abs(x))
        return (x * (FP8_MAX / amax)).astype(jnp.float8_e4m3fn), amax / FP8_MAX

    def fp8_dequantize(codes, scales):
        return codes.astype(jnp.float32) * scales

    def int8(x):
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        return jnp.round(x * (INT8_MAX / amax)).astype(jnp.int8), amax / INT8_MAX

    def int8_dequantize(codes, scales):
        return codes.astype(jnp.float32) * scales

    def int4(x):
        groups = x.reshape(-1, GROUP_SIZE)
        mn, mx = groups.min(axis=-1, keepdims=True), groups.max(axis=-1, keepdims=True)
        q = jnp.round((groups - mn) * (INT4_MAX / (mx - mn))).astype(jnp.uint8)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        return packed.reshape(x.shape[0], -1), (mx - mn) / INT4_MAX, mn

    def int4_dequantize(packed, scales, mins):
        pairs = packed.reshape(-1, GROUP_SIZE // 2)
        q = jnp.stack([pairs & 15, pairs >> 4], axis=-1).reshape(-1, GROUP_SIZE).astype(jnp.float32)
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
