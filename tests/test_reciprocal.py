"""The integer long-division reciprocal that torch.compile and JAX use (GPUs divide
float32 approximately) equals IEEE division plus the spec's flush."""
import numpy as np
import pytest

EDGES = [0x00800000, 0x00800001, 0x3F800000, 0x3F800001, 0x3FFFFFFF, 0x40400000, 0x0D800000, 0x7E800000,
         0x7E800001, 0x7E7FFFFF, 0x7EFFFFFF, 0x7F000000, 0x7F7FFFFF, 0x7F000001]


def samples():
    rng = np.random.default_rng(0)
    bits = np.concatenate([rng.integers(0x00800000, 0x7F800000, 300_000), EDGES]).astype(np.uint32)
    s = bits.view(np.float32)
    with np.errstate(all="ignore"):
        ref = np.float32(1) / s
    ref = np.where(np.abs(ref) < np.float32(2.0**-126), np.float32(0), ref)
    return s, ref


def test_jax_reciprocal_is_correctly_rounded():
    jnp = pytest.importorskip("jax.numpy")
    from kvquant.backends.jax_backend import reciprocal_rn

    s, ref = samples()
    got = np.asarray(reciprocal_rn(jnp.asarray(s)))
    bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
    assert bad.size == 0, f"1/{s[bad[0]]!r}: expected {ref[bad[0]]!r}, got {got[bad[0]]!r}"


def test_torch_compiled_reciprocal_is_correctly_rounded():
    torch = pytest.importorskip("torch")
    from kvquant.backends.torch_backend import reciprocal_rn

    s, ref = samples()
    got = torch.compile(reciprocal_rn, fullgraph=True)(torch.from_numpy(s)).numpy()
    bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
    assert bad.size == 0, f"1/{s[bad[0]]!r}: expected {ref[bad[0]]!r}, got {got[bad[0]]!r}"
