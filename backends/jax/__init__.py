"""The JAX backend: kernels.py (docs/spec.md on jax.Array, eagerly and under jit, vmap
and sharding), runtime.py (arrays, dtypes, devices, pytrees) and attention.py
(kvquant.attention under jit). The same file names in backends/numpy/ and
backends/torch/."""
from __future__ import annotations

import functools

import jax

from kvquant._ops import CONTRACT_V11, BackendOps, KernelSet

from . import kernels
from .runtime import runtime


class _Kernels(KernelSet):
    """Kernels run op by op (``eager``) or each under jax.jit (``jit``), with their
    static argument positions. fp8_quantize_per_tensor, fp8_dequantize and
    int4_dequantize are host-side members around units."""

    accepts_any_rank = True
    UNITS = {
        "fp8_quantize_per_token": (),
        "_fp8_per_tensor_dynamic": (),
        "_fp8_per_tensor_static": (3,),
        "fp8_dequantize": (2, 3),
        "int8_quantize": (),
        "int8_dequantize": (2,),
        "int4_quantize": (1,),
        "int4_dequantize": (3, 4, 5),
        **{name: ((1,) if name.endswith("_quantize") else (3, 4)) for name in CONTRACT_V11},
    }

    def __init__(self, jit: bool):
        super().__init__(vars(kernels), (lambda fn, static: jax.jit(fn, static_argnums=static)) if jit else None)
        self.compiles_per_shape = True  # op by op, JAX compiles each operation per shape

    def fp8_quantize_per_tensor(self, x, static_scale):
        if static_scale is None:
            return self.units["_fp8_per_tensor_dynamic"](x)
        return self.units["_fp8_per_tensor_static"](x, *kernels.static_scale_args(static_scale))

    def fp8_dequantize(self, codes, scales, out_dtype):
        checked = _host_check_allowed(scales) and bool(kernels.fp8_scales_checked(scales))
        return self.units["fp8_dequantize"](codes, scales, out_dtype, checked)

    def int4_dequantize(self, packed, scales, zeros, group_size, out_dtype):
        checked = _host_check_allowed(scales, zeros) and bool(kernels.int4_params_checked(scales, zeros))
        return self.units["int4_dequantize"](packed, scales, zeros, group_size, out_dtype, checked)

    def variants(self):
        return {"eager": _eager_kernels()} if self.wrapped else {}

    def trace(self, fn):
        """A caller's whole function under the framework's compiler, as users write it
        (jax.jit around code that calls kvquant): the conformance suite's seed-types
        check runs the seed calls through it."""
        return jax.jit(fn)

    def release(self):
        """Forget every executable compiled so far, for any shape (op by op, JAX
        compiles each operation per shape too)."""
        jax.clear_caches()


def _host_check_allowed(*params) -> bool:
    """A host-side look at the (small) per-token or per-group parameters may pick a
    kernel only for concrete arrays on the CPU, where reading one flag costs no device
    synchronisation; traced (under an outer jit or vmap) or elsewhere the kernel that
    checks every element is used. The look is a computation of its own, so a sharded
    dequantization still compiles to one with no collective."""
    for p in params:
        if isinstance(p, jax.core.Tracer) or any(d.platform != "cpu" for d in p.devices()):
            return False
    return True


@functools.lru_cache(maxsize=None)
def _eager_kernels():
    return _Kernels(jit=False)


def create_backend() -> BackendOps:
    """The jitted kernels by default, the op-by-op ones as the "eager" variant (which
    the conformance suite holds to the same bits). Op by op is about ten times slower,
    and a first call on a new shape compiles every one of some fifty operations on its
    own for the shape (docs/performance.md)."""
    return BackendOps(kernels.NAME, runtime, _Kernels(jit=True), variant="jit")
