"""The integer long-division reciprocal that JAX and torch use off the CPU (GPUs divide
float32 approximately), and the CPU divisions of XLA and of torch's compiled code,
equal IEEE division plus the spec's flush."""
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


@pytest.mark.parametrize("method", ["reciprocal_rn", "reciprocal_by_long_division"])
def test_jax_reciprocal_is_correctly_rounded_under_jit(method):
    # reciprocal_rn divides on the CPU: this proves XLA's CPU division is IEEE. The
    # long division is what other platforms run; here it runs on the CPU.
    jax = pytest.importorskip("jax")
    from kvquant.backends.jax import kernels as jax_kernels

    s, ref = samples()
    got = np.asarray(jax.jit(getattr(jax_kernels, method))(jax.numpy.asarray(s)))
    bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
    assert bad.size == 0, f"1/{s[bad[0]]!r}: expected {ref[bad[0]]!r}, got {got[bad[0]]!r}"


@pytest.mark.parametrize("method", ["reciprocal_rn", "reciprocal_by_long_division"])
def test_torch_compiled_reciprocal_is_correctly_rounded(method):
    # reciprocal_rn divides on the CPU: this proves Inductor's C++ division is IEEE.
    # The long division is what other devices run; here it runs compiled on the CPU.
    torch = pytest.importorskip("torch")
    from kvquant.backends.torch import kernels as torch_kernels

    s, ref = samples()
    got = torch.compile(getattr(torch_kernels, method), fullgraph=True)(torch.from_numpy(s)).numpy()
    bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
    assert bad.size == 0, f"1/{s[bad[0]]!r}: expected {ref[bad[0]]!r}, got {got[bad[0]]!r}"


@pytest.mark.parametrize("error", ["exact", "one_low", "one_high", "random_off_by_one"])
def test_digit_correction_repairs_any_estimate_off_by_one(error):
    """reciprocal_rn_bits takes a float guess of each quotient digit that may be one off
    either way (GPU division is approximate, XLA rewrites it); the integer correction
    must make every digit exact whatever the guess."""
    from kvquant import _spec

    s, ref = samples()
    rng = np.random.default_rng(1)

    def estimate(n, m):
        q = n // m
        if error == "one_low":
            return q - 1
        if error == "one_high":
            return q + 1
        if error == "random_off_by_one":
            return q + rng.integers(-1, 2, size=q.shape).astype(q.dtype)
        return q

    got = _spec.reciprocal_rn_bits(s.view(np.int32), np.where, estimate).astype(np.uint32)
    bad = np.flatnonzero(got != ref.view(np.uint32))
    assert bad.size == 0, f"1/{s[bad[0]]!r}: expected {ref[bad[0]]!r}, got bits {got[bad[0]]:#010x}"


def test_host_reciprocal_of_static_scales_is_correctly_rounded():
    # Static scales are known on the host: their reciprocal is a float64 division
    # rounded once to float32, which must equal float32 IEEE division, flushed.
    from kvquant import _spec

    s, ref = samples()
    picked = np.concatenate([np.arange(len(s) - len(EDGES), len(s)), np.arange(0, len(s) - len(EDGES), 15)])
    got = np.array([_spec.host_reciprocal_rn(float(v)) for v in s[picked]], np.float32)
    bad = np.flatnonzero(got.view(np.uint32) != ref[picked].view(np.uint32))
    assert bad.size == 0, f"1/{s[picked][bad[0]]!r}: expected {ref[picked][bad[0]]!r}, got {got[bad[0]]!r}"
