"""Run in a subprocess with 4 host devices (XLA_FLAGS set before JAX starts): sharded
KV caches quantize to the unsharded bits, keep their sharding, and compile to no
collective except per-tensor FP8's one all-reduce. Prints a JSON report."""
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import kvquant

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo: str):
    found = {}
    for name in COLLECTIVES:
        n = len(re.findall(rf"\s{name}(?:-start)?\(", hlo))
        if n:
            found[name] = n
    return found


def padded(spec, n):
    """A PartitionSpec's first n entries, trailing unsharded axes spelt out."""
    return (tuple(spec) + (None,) * n)[:n]


def main():
    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal((2, 4, 16, 96)) * 3).astype(np.float32)
    report = []
    for axis_name, spec in (("kv_heads", P(None, "d", None, None)), ("tokens", P(None, None, "d", None))):
        sharding = NamedSharding(mesh, spec)
        x = jax.device_put(jnp.asarray(x_np), sharding)
        for fmt, kw in (("fp8", {}), ("int8", {}), ("int4", {"group_size": 64}), ("fp8_per_tensor", {})):
            fn = jax.jit(lambda t, fmt=fmt, kw=kw: kvquant.quantize(t, fmt, on_nonfinite="propagate", **kw))
            q = fn(x)
            ref = kvquant.quantize(x_np, fmt, **kw)
            same = all(
                np.array_equal(np.asarray(a).reshape(-1).view(np.uint8), np.asarray(b).reshape(-1).view(np.uint8))
                for a, b in ((q.codes, ref.codes), (q.scales, ref.scales)) + (((q.zeros, ref.zeros),) if fmt == "int4" else ())
            )
            deq = jax.jit(lambda r: kvquant.dequantize(r, "float32"))(q)
            same_deq = np.array_equal(np.asarray(deq).view(np.uint32), kvquant.dequantize(ref, "float32").view(np.uint32))
            hlo = fn.lower(x).compile().as_text()
            deq_hlo = jax.jit(lambda r: kvquant.dequantize(r, "float32")).lower(q).compile().as_text()
            report.append({
                "axis": axis_name, "format": fmt, "same_bits": bool(same), "same_dequant": bool(same_deq),
                "codes_sharding_kept": q.codes.sharding.is_equivalent_to(x.sharding, x.ndim) if fmt != "int4" else q.codes.sharding.spec == x.sharding.spec,
                "scales_sharded_like_input": (fmt == "fp8_per_tensor") or padded(q.scales.sharding.spec, 3) == padded(spec, 3),
                "dequant_sharding_kept": deq.sharding.is_equivalent_to(x.sharding, x.ndim),
                "quantize_collectives": collectives(hlo),
                "dequantize_collectives": collectives(deq_hlo),
            })
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
