"""Argument checking shared by every backend, and the seed's ``KvCacheQuantOps`` surface.

A backend supplies a ``Runtime`` (what its arrays look like) and a kernels object
(the arithmetic of docs/spec.md on a validated ``[tokens, head_dim]`` view). This
class checks every argument before any kernel runs, so that bad input is reported
the same way, with the same words, by every backend.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence, Tuple

from . import _spec
from ._formats import FORMATS, parse_group_size
from ._types import Format, Int4GroupSize, NonFiniteInputError, ON_NONFINITE_CHOICES



TRACED = "traced"  # what Runtime.device says of an array that has no device yet


def canonical_dtype_name(dtype: Any) -> str:
    """Name of a dtype given as a string, a NumPy/JAX/ml_dtypes type or a torch.dtype.

    Never imports a framework: torch dtypes are recognised by their ``repr``.
    """
    if isinstance(dtype, str):
        name = dtype.strip().lower()
        return name[len("torch."):] if name.startswith("torch.") else name
    text = repr(dtype)
    if text.startswith("torch."):
        return text[len("torch."):]
    try:
        import numpy as np

        return np.dtype(dtype).name
    except TypeError:
        pass
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None)
    if isinstance(name, str):
        return name.lower()
    raise TypeError(f"cannot interpret {dtype!r} as a dtype")


def parse_output_dtype(dtype: Any) -> str:
    name = canonical_dtype_name(dtype) if dtype is not None else "float32"
    if name not in _spec.OUTPUT_DTYPES:
        raise TypeError(
            f"output_dtype {dtype!r} is not supported; expected one of "
            + ", ".join(_spec.OUTPUT_DTYPES)
        )
    return name


def parse_on_nonfinite(on_nonfinite: Any) -> str:
    if on_nonfinite not in ON_NONFINITE_CHOICES:
        raise ValueError(
            f"on_nonfinite must be 'raise' or 'propagate', got {on_nonfinite!r}"
        )
    return on_nonfinite


def parse_static_scale(scale: Any) -> float:
    """A caller-given FP8 scale as an exact float32 value (held in a Python float).

    Python floats are rounded to the nearest float32: a checkpoint's k_scale is
    stored as float32 anyway, and that is the value every backend then uses.
    """
    if isinstance(scale, (bool, str, bytes)):
        raise TypeError(f"static scale must be a number, got {scale!r}")
    try:
        value = float(scale)
    except Exception as exc:  # tracers, strings, arrays of several elements
        raise TypeError(
            f"static scale must be a concrete real number, got {type(scale).__name__}: {exc}"
        ) from None
    problem = f"static scale must be a finite, positive, normal float32 (2^-126 to 3.4028235e38), got {scale!r}"
    if not math.isfinite(value) or value <= 0:
        raise ValueError(problem)
    try:
        as_f32 = _spec.f32_from_bits(_spec.f32_bits(value))
    except OverflowError:  # rounds past the largest float32
        raise ValueError(problem) from None
    if as_f32 < _spec.f32_from_bits(_spec.MIN_NORMAL_BITS):
        raise ValueError(problem)
    return as_f32


def _as_count(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__}") from None


def _prod(dims: Sequence[int]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def num_groups(head_dim: int, group_size: int) -> int:
    return -(-head_dim // group_size)


class KernelSet:
    """Kernels built the same way in every backend (kvquant.protocols.Kernels).

    ``UNITS`` maps each traced unit, a module-level function of the backend named in
    ``functions``, to its static argument positions; ``wrap(fn, static_argnums)``, if
    given, compiles each one (torch.compile, jax.jit). A unit named like a member of
    the contract is that member; a subclass adds the host-side members that choose
    between units (a static scale made an array, a look at the parameters first)."""

    UNITS: dict = {}

    def __init__(self, functions: Any, wrap: Any = None):
        self.wrapped = wrap is not None
        # Compiled units specialise on each input shape and dtype; a backend whose eager
        # operations compile too (JAX op by op) says so itself.
        self.compiles_per_shape = self.wrapped
        self.units = {name: (wrap(functions[name], static) if wrap else functions[name])
                      for name, static in self.UNITS.items()}
        for name, fn in self.units.items():
            if not name.startswith("_") and not hasattr(type(self), name):
                setattr(self, name, fn)


def _kernels_of(spec_version: str) -> Tuple[str, ...]:
    names = (n for info in FORMATS.values() if info.spec_version == spec_version for n in info.kernel_names)
    return tuple(dict.fromkeys(names))


# The kernels every backend provides, named by the format table.
CONTRACT = _kernels_of("1")
# Spec v1.1's kernels, optional: a backend without them is reported as not implementing
# those formats (BackendOps._kernel).
CONTRACT_V11 = _kernels_of("1.1")


class BackendOps:
    """``KvCacheQuantOps`` for one backend: validation here, arithmetic in ``kernels``.

    ``variant`` names how the kernels run (``"eager"``, ``"compile"``, ``"jit"``...):
    the conformance suite reports each variant on its own row.
    """

    def __init__(self, name: str, runtime: Any, kernels: Any, variant: str = "eager"):
        self.name = name
        self.runtime = runtime
        self.kernels = kernels
        self.variant = variant
        # Kernels that reduce over the last axis of any rank (JAX) get arrays in the
        # caller's shape, so that a sharded leading axis is never merged by a reshape;
        # the others get a [tokens, head_dim] view.
        self._any_rank = bool(getattr(kernels, "accepts_any_rank", False))

    def _view(self, arr, lead, tail):
        """arr as lead + tail (any-rank kernels) or as (prod(lead),) + tail."""
        shape = tuple(lead) + tuple(tail) if self._any_rank else (_prod(lead),) + tuple(tail)
        return self.runtime.reshape(arr, shape)

    def __repr__(self) -> str:
        return f"<kvquant backend {self.name!r} ({self.variant})>"

    def variants(self) -> dict:
        """Every way this backend can run, each an object with the same methods."""
        extra = getattr(self.kernels, "variants", None)
        out = {self.variant: self}
        if extra is not None:
            for variant, kernels in extra().items():
                out[variant] = BackendOps(self.name, self.runtime, kernels, variant)
        return out

    # ---------------------------------------------------------------- checks
    def _check_array(self, arr: Any, what: str) -> None:
        if not self.runtime.is_array(arr):
            raise TypeError(
                f"{what} must be a {self.runtime.name} array for the {self.name!r} backend, "
                f"got {type(arr).__module__}.{type(arr).__name__}"
            )
        why_not = getattr(self.runtime, "unsupported", None)
        reason = why_not(arr) if why_not is not None else None
        if reason:
            raise TypeError(f"{what}: {reason}")

    def _check_same_device(self, reference: Any, *others: Tuple[str, Any]) -> None:
        # A traced JAX array has no device yet (inside jit, or a JVP tracer under grad
        # beside concrete integer codes): nothing to compare until it is concrete.
        device = self.runtime.device(reference)
        for what, arr in others:
            other = self.runtime.device(arr)
            if other != device and TRACED not in (device, other):
                raise ValueError(
                    f"{what} is on device {other} but the codes are on {device}; "
                    "kvquant never moves arrays between devices for you"
                )

    def _check_input(self, x: Any, num_tokens: Any, head_dim: Any) -> Tuple[int, ...]:
        self._check_array(x, "input")
        dtype = self.runtime.dtype_name(x)
        if dtype not in _spec.INPUT_DTYPES:
            raise TypeError(
                f"input dtype {dtype} is not supported; expected one of "
                + ", ".join(_spec.INPUT_DTYPES)
            )
        shape = tuple(self.runtime.shape(x))
        self._check_token_shape(shape, num_tokens, head_dim, "input", shape[-1] if shape else None)
        return shape

    def _detached(self, x: Any) -> Any:
        """Quantization is not differentiable: the input is cut from any autodiff trace
        (JAX: under jax.grad the codes then come back concrete, with the scales)."""
        detach = getattr(self.runtime, "detach", None)
        return detach(x) if detach is not None else x

    def _check_token_shape(self, shape, num_tokens, head_dim, what, last_dim) -> None:
        num_tokens = _as_count(num_tokens, "num_tokens")
        head_dim = _as_count(head_dim, "head_dim")
        if len(shape) < 2:
            raise ValueError(
                f"{what} must have rank 2 or more ([num_tokens, head_dim], "
                f"[batch, kv_heads, seq_len, head_dim] or any [..., head_dim]), got shape {shape}"
            )
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        if last_dim != head_dim:
            raise ValueError(f"{what} has last dimension {shape[-1]}, but head_dim={head_dim}")
        tokens = _prod(shape[:-1])
        if tokens != num_tokens:
            raise ValueError(
                f"{what} of shape {shape} holds {tokens} tokens, but num_tokens={num_tokens}"
            )

    def _check_codes(self, codes, code_dtype, num_tokens, head_dim, packed=False):
        self._check_array(codes, "quantized codes")
        dtype = self.runtime.dtype_name(codes)
        if dtype != code_dtype:
            raise TypeError(f"quantized codes must have dtype {code_dtype}, got {dtype}")
        shape = tuple(self.runtime.shape(codes))
        head_dim_i = _as_count(head_dim, "head_dim")
        if packed:
            per = packed.codes_per_byte
            name = packed.format.value
            if head_dim_i <= 0 or head_dim_i % per:
                raise ValueError(f"{name} needs a positive head_dim that is a multiple of {per}, got {head_dim_i}")
            self._check_token_shape(shape, num_tokens, head_dim, f"packed {name} codes", shape[-1] * per if shape else None)
        else:
            self._check_token_shape(shape, num_tokens, head_dim, "quantized codes", shape[-1] if shape else None)
        return shape

    def _check_params(self, arr, what, accepted_shapes, reference) -> None:
        self._check_array(arr, what)
        dtype = self.runtime.dtype_name(arr)
        if dtype != "float32":
            raise TypeError(f"{what} must have dtype float32, got {dtype}")
        shape = tuple(self.runtime.shape(arr))
        # Element by element: dynamo mis-evaluated `shape in accepted_shapes` once the
        # same code had been compiled for other group sizes ([12, 1] scales "not in"
        # ((12, 1), (12,), (12, 1)), torch 2.13), and then failed on the error message.
        if not any(len(shape) == len(a) and all(d == e for d, e in zip(shape, a)) for a in accepted_shapes):
            allowed = " or ".join(str(s) for s in dict.fromkeys(accepted_shapes))
            raise ValueError(f"{what} has shape {shape}; expected {allowed}")
        self._check_same_device(reference, (what, arr))

    def _finish_nonfinite(self, scales, on_nonfinite, lead_shape, groups: Optional[int], info=None):
        """Raise for the first poisoned token or group if the caller asked and values are concrete.

        ``scales`` as the kernel returned them, not reshaped: a JAX reshape of an array
        still being computed is one more dispatch to wait for."""
        if on_nonfinite != "raise" or not self.runtime.is_concrete(scales):
            return
        first = self.runtime.first_nan_index(scales)
        if first is None:
            return
        if info is not None and info.per_channel:
            index = _unravel(first, lead_shape)
            raise NonFiniteInputError(
                f"{info.format.value}: channel {index[-1]} of token block {index[-2]} (of {index[:-2] or 'the input'}) "
                "holds NaN or +-inf, or its range overflows float32; pass on_nonfinite='propagate' to store NaN "
                "scale and zero for it instead", index
            )
        if groups is None:
            if not lead_shape:
                raise NonFiniteInputError(
                    "input tensor holds NaN or +-inf; pass on_nonfinite='propagate' to "
                    "store a NaN scale instead", ()
                )
            index = _unravel(first, lead_shape)
            raise NonFiniteInputError(
                f"token {index} holds NaN or +-inf; pass on_nonfinite='propagate' to store "
                "a NaN scale for it instead", index
            )
        token, group = divmod(first, groups)
        index = _unravel(token, lead_shape) + (group,)
        raise NonFiniteInputError(
            f"{'INT4' if info is None else info.format.value} group {group} of token {index[:-1]} holds NaN or +-inf, or its range "
            "overflows float32; pass on_nonfinite='propagate' to store NaN scale and zero "
            "for it instead", index
        )

    # ------------------------------------------------------------- FP8 token
    def quantize_kv_fp8_per_token(self, input, num_tokens, head_dim, *, on_nonfinite="raise"):
        on_nonfinite = parse_on_nonfinite(on_nonfinite)
        shape = self._check_input(input, num_tokens, head_dim)
        rt = self.runtime
        codes, scales = self.kernels.fp8_quantize_per_token(self._view(self._detached(input), shape[:-1], (head_dim,)))
        self._finish_nonfinite(scales, on_nonfinite, shape[:-1], None)
        return rt.reshape(codes, shape), rt.reshape(scales, shape[:-1])

    def dequantize_kv_fp8_per_token(self, quantized, scales, num_tokens, head_dim, output_dtype="float32"):
        out_dtype = parse_output_dtype(output_dtype)
        shape = self._check_codes(quantized, "float8_e4m3fn", num_tokens, head_dim)
        self._check_params(scales, "scales", (shape[:-1], (num_tokens,)), quantized)
        rt = self.runtime
        out = self.kernels.fp8_dequantize(
            self._view(quantized, shape[:-1], (head_dim,)),
            self._view(scales, shape[:-1], (1,)),
            out_dtype,
        )
        return rt.reshape(out, shape)

    # ------------------------------------------------------------ FP8 tensor
    def quantize_kv_fp8_per_tensor(self, input, num_tokens, head_dim, scale=None, *, on_nonfinite="raise"):
        """One scale for the whole tensor: dynamic (from max |x|) or the caller's ``scale``."""
        on_nonfinite = parse_on_nonfinite(on_nonfinite)
        shape = self._check_input(input, num_tokens, head_dim)
        static = None if scale is None else parse_static_scale(scale)
        rt = self.runtime
        codes, scale_out = self.kernels.fp8_quantize_per_tensor(
            self._view(self._detached(input), shape[:-1], (head_dim,)), static
        )
        self._finish_nonfinite(scale_out, on_nonfinite, (), None)
        return rt.reshape(codes, shape), scale_out

    def dequantize_kv_fp8_per_tensor(self, quantized, scale, num_tokens, head_dim, output_dtype="float32"):
        out_dtype = parse_output_dtype(output_dtype)
        shape = self._check_codes(quantized, "float8_e4m3fn", num_tokens, head_dim)
        self._check_params(scale, "scale", ((), (1,)), quantized)
        rt = self.runtime
        ones = (1,) * (len(shape) if self._any_rank else 2)
        out = self.kernels.fp8_dequantize(
            self._view(quantized, shape[:-1], (head_dim,)), rt.reshape(scale, ones), out_dtype
        )
        return rt.reshape(out, shape)

    # ------------------------------------------------------------------ INT8
    def quantize_kv_int8(self, input, num_tokens, head_dim, *, on_nonfinite="raise"):
        on_nonfinite = parse_on_nonfinite(on_nonfinite)
        shape = self._check_input(input, num_tokens, head_dim)
        rt = self.runtime
        codes, scales = self.kernels.int8_quantize(self._view(self._detached(input), shape[:-1], (head_dim,)))
        self._finish_nonfinite(scales, on_nonfinite, shape[:-1], None)
        return rt.reshape(codes, shape), rt.reshape(scales, shape[:-1])

    def dequantize_kv_int8(self, quantized, scales, num_tokens, head_dim, output_dtype="float32"):
        out_dtype = parse_output_dtype(output_dtype)
        shape = self._check_codes(quantized, "int8", num_tokens, head_dim)
        self._check_params(scales, "scales", (shape[:-1], (num_tokens,)), quantized)
        rt = self.runtime
        out = self.kernels.int8_dequantize(
            self._view(quantized, shape[:-1], (head_dim,)),
            self._view(scales, shape[:-1], (1,)),
            out_dtype,
        )
        return rt.reshape(out, shape)

    # ------------------------------------------------- INT4, INT2 (spec v1, v1.1)
    # One path for every asymmetric format: groups inside a token (INT4, INT2) or
    # blocks of tokens per channel (spec v1.1); the format table says which.
    def quantize_kv_int4(self, input, num_tokens, head_dim, group_size=Int4GroupSize.G64, *, on_nonfinite="raise"):
        return self._quantize_asymmetric(Format.INT4, input, num_tokens, head_dim, group_size, on_nonfinite)

    def dequantize_kv_int4(self, packed, scales, zeros, num_tokens, head_dim, group_size=Int4GroupSize.G64, output_dtype="float32"):
        return self._dequantize_asymmetric(Format.INT4, packed, scales, zeros, num_tokens, head_dim, group_size, output_dtype)

    def _kernel(self, info, stage: str):
        """The kernels' function for a format, or NotImplementedError naming the spec
        version: a backend written for v1 is still checked on v1 (the suite reports the
        v1.1 formats it lacks as not implemented)."""
        name = info.kernel_names[("quantize", "dequantize").index(stage)]
        fn = getattr(self.kernels, name, None)
        if fn is None:
            raise NotImplementedError(
                f"the {self.name!r} backend does not implement {info.format.value} "
                f"(spec v{info.spec_version}): its kernels have no {name}")
        return fn

    def _check_packing(self, info, head_dim: int) -> None:
        per = info.codes_per_byte
        if head_dim % per:
            need = "even" if per == 2 else f"a multiple of {per}"
            raise ValueError(f"{info.format.value} packs {per} codes per byte, so head_dim must be {need}, got {head_dim}")

    def _check_blocks(self, info, shape, group: int, what: str) -> None:
        """Per-channel formats: the token axis (-2) in whole blocks of G tokens."""
        tokens = shape[-2]
        if tokens % group:
            raise ValueError(
                f"{info.format.value} quantizes blocks of {group} tokens per channel, so the token axis "
                f"(dimension -2) of the {what} must be a multiple of {group}, got shape {shape}; keep an "
                "incomplete block in full precision until it fills (kvquant.cache does)")

    def _quantize_asymmetric(self, fmt, input, num_tokens, head_dim, group_size, on_nonfinite):
        info = FORMATS[fmt]
        on_nonfinite = parse_on_nonfinite(on_nonfinite)
        group = parse_group_size(group_size)
        shape = self._check_input(input, num_tokens, head_dim)
        self._check_packing(info, head_dim)
        kernel = self._kernel(info, "quantize")
        if info.per_channel:
            self._check_blocks(info, shape, group, "input")
        rt = self.runtime
        lead = shape[:-1]
        packed, scales, zeros = kernel(self._view(self._detached(input), lead, (head_dim,)), group)
        param_shape = info.param_shape(shape, group)
        if info.per_channel:  # the first poisoned (block, channel), in the scales' layout
            self._finish_nonfinite(scales, on_nonfinite, param_shape, None, info)
        else:
            self._finish_nonfinite(scales, on_nonfinite, lead, param_shape[-1], info)
        return (rt.reshape(packed, lead + (head_dim // info.codes_per_byte,)),
                rt.reshape(scales, param_shape), rt.reshape(zeros, param_shape))

    def _dequantize_asymmetric(self, fmt, packed, scales, zeros, num_tokens, head_dim, group_size, output_dtype):
        info = FORMATS[fmt]
        out_dtype = parse_output_dtype(output_dtype)
        group = parse_group_size(group_size)
        shape = self._check_codes(packed, "uint8", num_tokens, head_dim, packed=info)
        kernel = self._kernel(info, "dequantize")
        width = head_dim // info.codes_per_byte
        if info.per_channel:
            self._check_blocks(info, shape, group, "packed codes")
            blocks = num_tokens // group
            accepted = (shape[:-2] + (shape[-2] // group, head_dim), (blocks, head_dim), (blocks * head_dim,))
            param_lead, param_tail = shape[:-2] + (shape[-2] // group,), (head_dim,)
        else:
            groups = num_groups(head_dim, group)
            accepted = (shape[:-1] + (groups,), (num_tokens * groups,), (num_tokens, groups))
            param_lead, param_tail = shape[:-1], (groups,)
        self._check_params(scales, "scales", accepted, packed)
        self._check_params(zeros, "zeros", accepted, packed)
        out = kernel(self._view(packed, shape[:-1], (width,)), self._view(scales, param_lead, param_tail),
                     self._view(zeros, param_lead, param_tail), group, out_dtype)
        return self.runtime.reshape(out, shape[:-1] + (head_dim,))



def _grouped_seed_methods(info):
    """quantize_kv_<name> and dequantize_kv_<name> for a grouped or per-channel format of
    the table (spec v1.1's and any added later), in the seed's style: the checks and
    kernels are BackendOps' shared ones, so such a format needs no methods of its own."""
    fmt = info.format
    where = ("one scale and zero per channel and block of G tokens along the token axis; ``input`` is "
             "``[..., tokens, head_dim]`` with tokens a multiple of G" if info.per_channel
             else "a scale and zero per group of G elements inside a token")

    def quantize(self, input, num_tokens, head_dim, group_size=Int4GroupSize.G64, *, on_nonfinite="raise"):
        return self._quantize_asymmetric(fmt, input, num_tokens, head_dim, group_size, on_nonfinite)

    def dequantize(self, packed, scales, zeros, num_tokens, head_dim, group_size=Int4GroupSize.G64,
                   output_dtype="float32"):
        return self._dequantize_asymmetric(fmt, packed, scales, zeros, num_tokens, head_dim, group_size,
                                           output_dtype)

    for method, name, doc in ((quantize, info.quantize_method, f"Spec v{info.spec_version}: {info.bits}-bit codes, "
                               f"{info.codes_per_byte} per byte, with {where}."),
                              (dequantize, info.dequantize_method, f"The inverse of {info.quantize_method}.")):
        method.__name__, method.__qualname__, method.__doc__ = name, f"BackendOps.{name}", doc
    return quantize, dequantize


for _info in FORMATS.values():
    if _info.group_sizes and not hasattr(BackendOps, _info.quantize_method):
        for _method in _grouped_seed_methods(_info):
            setattr(BackendOps, _method.__name__, _method)


def _unravel(flat: int, dims: Tuple[int, ...]) -> Tuple[int, ...]:
    index = []
    for d in reversed(dims):
        flat, r = divmod(flat, d)
        index.append(r)
    return tuple(reversed(index))
