"""JAX specifics: jit, vmap, pytrees, x64, XLA's rewrites, sharding."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

import kvquant  # noqa: E402
from conftest import FIDS, FORMATS, assert_same_bits, check_e4m3_encoder, shape_for  # noqa: E402

HERE = os.path.dirname(__file__)


def sample(shape=(2, 4, 8, 64), seed=0, scale=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def same_record(ref, got):
    assert_same_bits(ref.codes, np.asarray(got.codes), "codes")
    assert_same_bits(ref.scales, np.asarray(got.scales), "scales")
    if ref.zeros is not None:
        assert_same_bits(ref.zeros, np.asarray(got.zeros), "zeros")


@pytest.mark.parametrize("fmt, kw", FORMATS, ids=FIDS)
def test_eager_and_jit_give_reference_bits(fmt, kw):
    x = sample(shape_for(fmt, (2, 4, 8, 64)))
    ref = kvquant.quantize(x, fmt, **kw)
    eager = kvquant.quantize(jnp.asarray(x), fmt, backend=kvquant.get_backend("jax").variants()["eager"], **kw)
    jitted = jax.jit(lambda t: kvquant.quantize(t, fmt, **kw))(jnp.asarray(x))
    same_record(ref, eager)
    same_record(ref, jitted)
    out_ref = kvquant.dequantize(ref, "bfloat16")
    assert_same_bits(out_ref, np.asarray(jax.jit(lambda q: kvquant.dequantize(q, "bfloat16"))(jitted)))


@pytest.mark.parametrize("fmt, kw", FORMATS, ids=FIDS)
def test_vmap_equals_per_element(fmt, kw):
    x = sample(shape_for(fmt, (3, 5, 64)), seed=1)
    batched = jax.vmap(lambda t: kvquant.quantize(t, fmt, **kw))(jnp.asarray(x))
    for i in range(3):
        ref = kvquant.quantize(x[i], fmt, **kw)
        assert_same_bits(ref.codes, np.asarray(batched.codes[i]))
        assert_same_bits(ref.scales, np.asarray(batched.scales[i]))


def test_quantized_kv_is_a_pytree_usable_in_scan():
    x = jnp.asarray(sample((6, 64)))
    q = kvquant.quantize(x, "int4")
    leaves, treedef = jax.tree_util.tree_flatten(q)
    assert len(leaves) == 3 and jax.tree_util.tree_unflatten(treedef, leaves).group_size == 64

    def step(carry, token):
        # Streaming: each token quantized alone and written into the carried cache.
        qt = kvquant.quantize(token[None, :], "int4")
        i = carry[1]
        codes = jax.lax.dynamic_update_slice(carry[0].codes, qt.codes, (i, 0))
        scales = jax.lax.dynamic_update_slice(carry[0].scales, qt.scales, (i, 0))
        zeros = jax.lax.dynamic_update_slice(carry[0].zeros, qt.zeros, (i, 0))
        return (kvquant.QuantizedKV(codes, scales, zeros, q.format, q.group_size, q.shape, q.source_dtype, q.backend), i + 1), None

    empty = jax.tree_util.tree_map(jnp.zeros_like, q)
    (streamed, _), _ = jax.lax.scan(step, (empty, 0), x)
    same_record(kvquant.quantize(np.asarray(x), "int4"), streamed)


def test_raise_where_concrete_propagate_where_traced():
    x = sample((3, 64))
    x[2, 5] = np.inf
    with pytest.raises(kvquant.NonFiniteInputError) as e:
        kvquant.quantize(jnp.asarray(x), "int8")
    assert e.value.index == (2,)
    scales = jax.jit(lambda t: kvquant.quantize(t, "int8").scales)(jnp.asarray(x))
    assert np.isnan(np.asarray(scales)[2]) and np.isfinite(np.asarray(scales)[:2]).all()


def test_concrete_calls_run_the_jitted_kernels_by_default():
    # Op by op, every one of some fifty operations compiled on its own for each new
    # shape: a first call took 1.3 s against 0.15, later ones 3.7 ms against 0.55.
    ops = kvquant.get_backend("jax")
    assert ops.variant == "jit" and set(ops.variants()) == {"jit", "eager"}
    assert ops.variants()["eager"].variant == "eager"


@pytest.mark.parametrize("fmt, kw", [("fp8", {}), ("fp8_per_tensor", {}), ("int8", {}), ("int4", {"group_size": 32})], ids=["fp8", "fp8_per_tensor", "int8", "int4-g32"])
@pytest.mark.parametrize("column", [0, 31, 32, 100, 127])
def test_a_single_nan_in_a_cache_sized_input_is_found(fmt, kw, column):
    # XLA on the CPU hands reductions this large to YNNPACK, whose max and min drop NaN
    # (docs/spec.md, findings): a NaN token came back with a finite scale. A lone NaN,
    # with no infinity anywhere that a NaN-dropping maximum would still see.
    x = sample((4096, 128))
    x[2049, column] = np.nan
    with pytest.raises(kvquant.NonFiniteInputError) as e:
        kvquant.quantize(jnp.asarray(x), fmt, **kw)
    expected = {"fp8_per_tensor": (), "int4": (2049, column // 32)}.get(fmt, (2049,))
    assert e.value.index == expected
    ref = kvquant.quantize(x, fmt, on_nonfinite="propagate", **kw)
    for run in (lambda t: kvquant.quantize(t, fmt, on_nonfinite="propagate", **kw),
                jax.jit(lambda t: kvquant.quantize(t, fmt, on_nonfinite="propagate", **kw))):
        same_record(ref, run(jnp.asarray(x)))


X64_SCRIPT = r"""
import jax, json, numpy as np, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
import kvquant
rng = np.random.default_rng(5)
x = (rng.standard_normal((4, 96)) * 7).astype(np.float32)
x[1, :3] = [1e-40, -3e-39, 2.0**-126]
ok = {}
eager = kvquant.get_backend("jax").variants()["eager"]
for fmt, kw in [("fp8", {}), ("fp8_per_tensor", {"scale": 0.1}), ("int8", {}), ("int4", {"group_size": 64})]:
    ref = kvquant.quantize(x, fmt, **kw)
    for mode, fn in (("eager", lambda t: kvquant.quantize(t, fmt, backend=eager, **kw)),
                     ("default", lambda t: kvquant.quantize(t, fmt, **kw)),
                     ("jit", jax.jit(lambda t: kvquant.quantize(t, fmt, **kw)))):
        q = fn(jnp.asarray(x))
        d = kvquant.dequantize(q, "float32")
        ok[f"{fmt}-{mode}"] = (str(q.scales.dtype), bool(np.array_equal(np.asarray(q.codes).view(np.uint8), ref.codes.view(np.uint8))
            and np.array_equal(np.asarray(q.scales).view(np.uint32), ref.scales.view(np.uint32))
            and np.array_equal(np.asarray(d).view(np.uint32), kvquant.dequantize(ref, "float32").view(np.uint32))))
print(json.dumps(ok))
"""


def test_same_bits_with_x64_enabled():
    out = subprocess.run([sys.executable, "-c", X64_SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result and all(v == ["float32", True] for v in result.values()), result


# ------------------------------------------------------------- e4m3 encoder
def _encode_under_jit(values):
    from kvquant.backends.jax.kernels import encode_e4m3

    return np.asarray(jax.jit(lambda f: jax.lax.bitcast_convert_type(encode_e4m3(f), jnp.uint8))(jnp.asarray(values)))


def test_encoder_under_jit_on_every_rounding_boundary():
    check_e4m3_encoder(_encode_under_jit)


@pytest.mark.exhaustive
def test_encoder_under_jit_on_every_float32_up_to_448():
    check_e4m3_encoder(_encode_under_jit, every_float32=True)


# ---------------------------------------------------------- XLA's rewrites
def xla_cpu():
    return jax.default_backend() == "cpu"


def test_division_by_broadcast_scale_is_rewritten_here_but_not_used():
    # Inputs built so that x / s and x * (1/s) differ for many elements.
    rng = np.random.default_rng(3)
    x = rng.uniform(-448, 448, (256, 128)).astype(np.float32)
    s = rng.uniform(0.5, 3.0, 256).astype(np.float32)
    div = np.asarray(jax.jit(lambda a, b: a / b[:, None])(jnp.asarray(x), jnp.asarray(s)))
    ieee = x / s[:, None]
    if xla_cpu():
        assert (div.view(np.uint32) != ieee.view(np.uint32)).mean() > 0.05, "XLA no longer rewrites division here"
    xs = x * s[:, None]  # tokens whose scale is s (amax * R(448) lands near s)
    for fmt in ("fp8", "int8", "int4"):
        same_record(kvquant.quantize(xs, fmt), jax.jit(lambda t: kvquant.quantize(t, fmt))(jnp.asarray(xs)))


def test_fma_contraction_happens_here_but_cannot_touch_dequantization():
    rng = np.random.default_rng(4)
    q = rng.integers(0, 16, (512, 128)).astype(np.float32)
    s = rng.uniform(1e-3, 1.0, (512, 1)).astype(np.float32)
    z = rng.uniform(-20, 20, (512, 1)).astype(np.float32)
    fused = np.asarray(jax.jit(lambda a, b, c: a * b + c)(jnp.asarray(q), jnp.asarray(s), jnp.asarray(z)))
    if xla_cpu():
        assert (fused.view(np.uint32) != (q * s + z).view(np.uint32)).mean() > 0.01, "XLA no longer contracts into FMA here"
    x = (rng.standard_normal((512, 128)) * rng.uniform(0.01, 100, (512, 1))).astype(np.float32)
    ref = kvquant.quantize(x, "int4", group_size=32)
    got = jax.jit(lambda t: kvquant.dequantize(kvquant.quantize(t, "int4", group_size=32), "float32"))(jnp.asarray(x))
    assert_same_bits(kvquant.dequantize(ref, "float32"), np.asarray(got))


def test_subnormals_flushed_here_and_spec_agrees():
    tiny = np.float32(1e-40)
    flushed = np.asarray(jax.jit(lambda a: a * 2)(jnp.asarray(np.full(4, tiny))))
    if xla_cpu():
        assert (flushed == 0).all(), "XLA no longer flushes subnormals here"
    x = np.zeros((5, 64), np.float32)
    x[0] = tiny * np.arange(64)           # all subnormal: counts as an all-zero token
    x[1, ::2] = np.float32(2.0**-126)     # smallest normal, beside subnormals
    x[1, 1::2] = -tiny
    x[2] = np.float32(2.0**-110) * np.arange(-32, 32)  # scale floored at S_MIN
    x[3, :32] = np.float32(-2.0**-126)    # INT4 zero*scale near 2^-126: dequantization flushes
    x[3, 32:] = np.float32(2.0**-120)
    x[4] = np.float32(2.0**-125) * np.linspace(-1, 1, 64, dtype=np.float32)
    for fmt, kw in [("fp8", {}), ("int8", {}), ("int4", {"group_size": 32}), ("fp8_per_tensor", {"scale": 2.0**-124})]:
        ref = kvquant.quantize(x, fmt, **kw)
        for fn in (lambda t: kvquant.quantize(t, fmt, **kw), jax.jit(lambda t: kvquant.quantize(t, fmt, **kw))):
            got = fn(jnp.asarray(x))
            same_record(ref, got)
            assert_same_bits(kvquant.dequantize(ref, "float32"), np.asarray(jax.jit(lambda q: kvquant.dequantize(q, "float32"))(got)))


def test_sharded_caches_keep_bits_and_sharding_with_no_collectives():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, os.path.join(HERE, "jax_sharding_check.py")], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert len(report) == 8
    for row in report:
        where = f"{row['format']} sharded over {row['axis']}"
        assert row["same_bits"] and row["same_dequant"], where
        assert row["codes_sharding_kept"] and row["scales_sharded_like_input"] and row["dequant_sharding_kept"], where
        assert row["dequantize_collectives"] == {}, where
        if row["format"] == "fp8_per_tensor":
            assert sum(row["quantize_collectives"].values()) == 1 and list(row["quantize_collectives"]) == ["all-reduce"], where
        else:
            assert row["quantize_collectives"] == {}, f"{where}: {row['quantize_collectives']}"


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("codes_per_byte", [2, 4], ids=["nibbles", "crumbs"])
@pytest.mark.parametrize("width", [1, 2, 3, 4, 8, 32], ids=lambda w: f"bytes{w}")
def test_code_unpacking_gives_the_spec_codes(width, codes_per_byte, jitted):
    # The JAX unpacker reads four bytes as one word, with fallbacks for other widths;
    # kvquant/_formulas.py writes the spec's unpacking. Every byte at every position.
    from kvquant import _formulas
    from kvquant.backends.jax import kernels as jax_kernels

    rows = np.arange(256 * 4)
    packed = np.stack([(rows >> (2 * (i % 4))) % 256 for i in range(width)], axis=-1).astype(np.uint8)
    packed = jnp.asarray(np.concatenate([packed, packed[::-1]]).reshape(-1, 2, width))  # leading axes too
    unpack = jax_kernels.unpack_codes
    if jitted:
        unpack = jax.jit(unpack, static_argnums=1)
    want = _formulas.unpack_codes(jax_kernels.M, packed, codes_per_byte)
    assert_same_bits(np.asarray(want), np.asarray(unpack(packed, codes_per_byte)), "codes")


def test_a_jax_cache_history_is_a_pytree_in_a_fresh_process():
    """History (what attention_inputs returns) is a pytree as soon as the JAX backend
    loads, not after a first eager attend: a fresh process jits attention over a cache."""
    import subprocess
    import sys

    code = """
import jax, jax.numpy as jnp, kvquant
from kvquant.cache import JaxLayerCache
c = JaxLayerCache.create(1, 2, 64, 256, keys="int8", values="int4", residual=16)
c = jax.jit(JaxLayerCache.append)(c, jnp.ones((1, 2, 40, 64)), jnp.ones((1, 2, 40, 64)))[0]
keys, values, mask = c.attention_inputs()
out = jax.jit(lambda q, k, v, m: kvquant.attention.attend(q, k, v, mask=m, causal=False))(
    jnp.ones((1, 4, 1, 64)), keys, values, mask)
print(out.shape)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(1, 4, 1, 64)"
