"""Run in a subprocess with 8 host devices (XLA_FLAGS set before JAX starts): a
JaxLayerCache sharded over batch and/or kv_heads on a device mesh, appended to under
jax.jit and read by kvquant.attention.attend, against the same cache on one device.
Prints a JSON report: one row per (layout, formats), with --time also the median
append and attention times sharded and unsharded (informative only); and what
``create`` says to placements it refuses."""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_sharding_check import collectives  # this script's folder is on sys.path
from kvquant.attention import attend, reference_attention
from kvquant.cache import JaxLayerCache

# (name, mesh shape, mesh axis names, cache spec, batch, kv_heads, query heads per kv head)
LAYOUTS = [
    ("kv_heads", (8,), ("heads",), P(None, "heads"), 1, 8, 2),
    ("batch", (8,), ("batch",), P("batch", None), 8, 2, 3),
    ("batch_and_kv_heads", (2, 4), ("batch", "heads"), P("batch", "heads"), 2, 4, 3),
]
FORMATS = [
    ("int8+int4", "int8", {"format": "int4", "group_size": 32}),
    ("fp8+int2", "fp8", {"format": "int2", "group_size": 32}),
    ("fp8_per_tensor+none", {"format": "fp8_per_tensor", "scale": 0.05}, None),
    ("kivi+int8", {"format": "int4_per_channel", "group_size": 32}, "int8"),
]
HEAD_DIM, CAPACITY, RESIDUAL = 64, 96, 16
STEPS = (40, 1, 1, 1, 7, 1)  # a prefill, decode steps, a chunk: tokens cross the window every time


def same_bits(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8))


def expected_spec(spec, ndim):
    return tuple(spec)[:2] + (None,) * (ndim - 2) if ndim >= 2 else ()


def spec_of(a):
    s = tuple(a.sharding.spec)
    return s + (None,) * (a.ndim - len(s))


def median_time(fn, *args, repeats=20):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run(layout, formats, timed):
    name, mesh_shape, axis_names, spec, batch, kv_heads, groups = layout
    fname, keys_format, values_format = formats
    mesh = Mesh(np.array(jax.devices()).reshape(mesh_shape), axis_names)
    per_token = NamedSharding(mesh, P(*expected_spec(spec, 4)))
    rng = np.random.default_rng(0)
    kwargs = dict(keys=keys_format, values=values_format, residual=RESIDUAL)
    sharded = JaxLayerCache.create(batch, kv_heads, HEAD_DIM, CAPACITY, sharding=NamedSharding(mesh, spec), **kwargs)
    single = JaxLayerCache.create(batch, kv_heads, HEAD_DIM, CAPACITY, **kwargs)
    append = jax.jit(JaxLayerCache.append)
    row = {"layout": name, "formats": fname, "cache_sharding_kept": True, "history_sharding_kept": True,
           "same_bits": True, "same_history_bits": True, "append_collectives": {},
           "appends": len(STEPS), "mesh_axes": len(axis_names)}
    for new in STEPS:
        k = (rng.standard_normal((batch, kv_heads, new, HEAD_DIM)) * 2).astype(np.float32)
        v = rng.standard_normal((batch, kv_heads, new, HEAD_DIM)).astype(np.float32)
        ks, vs = jax.device_put(jnp.asarray(k), per_token), jax.device_put(jnp.asarray(v), per_token)
        for c in collectives(append.lower(sharded, ks, vs).compile().as_text()).items():
            row["append_collectives"][c[0]] = row["append_collectives"].get(c[0], 0) + c[1]
        sharded, k_all, v_all, _ = append(sharded, ks, vs)
        single, k_one, v_one, _ = append(single, jnp.asarray(k), jnp.asarray(v))
        for a in jax.tree_util.tree_leaves(sharded):
            row["cache_sharding_kept"] &= spec_of(a) == expected_spec(spec, a.ndim) and a.sharding.mesh == mesh
        for a in (k_all, v_all):
            row["history_sharding_kept"] &= spec_of(a) == expected_spec(spec, 4)
        row["same_bits"] &= all(same_bits(a, b) for a, b in zip(jax.tree_util.tree_leaves(sharded),
                                                                 jax.tree_util.tree_leaves(single)))
        row["same_history_bits"] &= same_bits(k_all, k_one) and same_bits(v_all, v_one)

    # Decode attention: query head h reads kv head h // groups, on the device holding both.
    q = rng.standard_normal((batch, kv_heads * groups, 1, HEAD_DIM)).astype(np.float32)
    q_sharded = jax.device_put(jnp.asarray(q), per_token)

    @jax.jit
    def decode_attention(query, cache):
        keys, values, mask = cache.attention_inputs()
        return attend(query, keys, values, mask=mask, causal=False)

    out = decode_attention(q_sharded, sharded)
    keys, values, mask = single.attention_inputs()
    ref = reference_attention(q, keys, values, mask=mask, causal=False)
    held_v = np.asarray(v_one)[:, :, np.isfinite(np.asarray(mask))]  # the values of the slots holding tokens
    row["attention_sharding_kept"] = spec_of(out) == expected_spec(spec, 4)
    row["attention_error_over_max_v"] = float(np.max(np.abs(np.asarray(out, np.float64) - ref))
                                              / np.max(np.abs(held_v)))
    row["attention_collectives"] = collectives(decode_attention.lower(q_sharded, sharded).compile().as_text())
    if timed:
        k1 = jax.device_put(jnp.zeros((batch, kv_heads, 1, HEAD_DIM), jnp.float32), per_token)
        row["append_ms"] = {"sharded": 1e3 * median_time(append, sharded, k1, k1),
                            "one_device": 1e3 * median_time(append, single, jnp.asarray(k1), jnp.asarray(k1))}
        row["attention_ms"] = {"sharded": 1e3 * median_time(decode_attention, q_sharded, sharded),
                               "one_device": 1e3 * median_time(decode_attention, jnp.asarray(q), single)}
    return row


def refusals():
    """{what: the error create raises} for placements a cache cannot keep."""
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("batch", "heads"))
    asked = {"tokens split": (1, 4, NamedSharding(mesh, P(None, "heads", "batch"))),
             "kv_heads 6 over 4 devices": (2, 6, NamedSharding(mesh, P("batch", "heads"))),
             "not a NamedSharding": (2, 4, jax.devices()[0])}
    said = {}
    for what, (batch, kv_heads, sharding) in asked.items():
        try:
            JaxLayerCache.create(batch, kv_heads, HEAD_DIM, CAPACITY, sharding=sharding)
            said[what] = None
        except (TypeError, ValueError) as e:
            said[what] = f"{type(e).__name__}: {e}"
    return said


def main():
    assert len(jax.devices()) == 8, jax.devices()
    timed = "--time" in sys.argv
    json.dump({"rows": [run(layout, formats, timed) for layout in LAYOUTS for formats in FORMATS],
               "refusals": refusals()}, sys.stdout)


if __name__ == "__main__":
    main()
