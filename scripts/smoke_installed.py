"""kvquant as a user installs it: run by scripts/check_wheel.sh with the wheel installed
in a fresh virtual environment, from a directory outside the checkout. Each check
fails loudly; the last line says what ran."""
import os
import warnings

import numpy as np

import kvquant
import kvquant._cache_dir

checkout = os.environ.get("KVQUANT_CHECKOUT")
assert checkout is None or not os.path.abspath(kvquant.__file__).startswith(os.path.abspath(checkout)), \
    f"kvquant was imported from the checkout ({kvquant.__file__}), not from the installed wheel"
assert "site-packages" in kvquant.__file__, kvquant.__file__

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

rng = np.random.default_rng(0)
x = rng.standard_normal((2, 4, 96, 64)).astype(np.float32)
for fmt, extra in [("fp8", {}), ("int8", {}), ("int4", {"group_size": 32}), ("int2_per_channel", {"group_size": 32})]:
    ref = kvquant.quantize(x, fmt, **extra)
    for name, array, back in [("torch", torch.from_numpy(x), 
                               lambda t: (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).numpy()),
                              ("jax", jnp.asarray(x), np.asarray)]:
        got = kvquant.quantize(array, fmt, **extra)
        for part in ("codes", "scales", "zeros"):
            a, b = getattr(ref, part), getattr(got, part)
            if a is None:
                continue
            a, b = np.asarray(a), np.asarray(back(b))
            assert a.shape == b.shape and a.tobytes() == b.tobytes(), (fmt, name, part)

# A cache read by compiled attention: on the CPU, the C++ kernel built from the shipped source.
from kvquant.backends import cpu_kernel  # noqa: E402

assert os.path.isfile(cpu_kernel.SOURCE), f"the kernel's source did not ship: {cpu_kernel.SOURCE}"
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a warning here (no private cache, a failed build) is a failure
    fn = cpu_kernel.load()
assert fn is not None, "the C++ decode kernel did not build from the installed source"
cache = kvquant.cache.LayerCache(keys="int8", values={"format": "int4", "group_size": 32}, residual=16)
k, v = torch.randn(1, 2, 80, 64), torch.randn(1, 2, 80, 64)
cache.append(k, v, history=False)
q = torch.randn(1, 4, 1, 64)
out = kvquant.attention.attend(q, *cache.attention_inputs(), compiled=True)
ref = kvquant.attention.reference_attention(q, *cache.attention_inputs())
err = float(np.abs(out.double().numpy() - ref).max())
assert err < 1e-4, err

# JAX's attention on one CPU device: the same kernel as an XLA custom call, built from
# the shipped jax_ffi.cpp with jaxlib's headers.
assert os.path.isfile(cpu_kernel.JAX_SOURCE), f"the JAX kernel's source did not ship: {cpu_kernel.JAX_SOURCE}"
with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert cpu_kernel.load_jax(), "the C++ decode kernel for JAX did not build from the installed source"
jq = jnp.asarray(q.numpy())
jk, jv = (kvquant.attention.History(kvquant.quantize(jnp.asarray(t[:, :, :64].numpy()), fmt, **extra), jnp.asarray(t[:, :, 64:].numpy()))
          for t, fmt, extra in ((k, "int8", {}), (v, "int4", {"group_size": 32})))
jax_ref = kvquant.attention.reference_attention(jq, jk, jv)
jax_err = float(np.abs(np.asarray(kvquant.attention.attend(jq, jk, jv), np.float64) - jax_ref).max())
assert jax_err < 1e-4, jax_err
built = sorted(n for n in os.listdir(kvquant._cache_dir.cache_dir("cpu-kernel")) if n.endswith(".so"))
assert {n.split("_")[0] for n in built} >= {"decode", "jax"}, f"the kernels were not kept in the user's cache: {built}"
print(f"smoke: quantize bits equal on numpy/torch/jax for 4 formats; C++ kernels {', '.join(built)} built from the "
      f"installed source; compiled attention within {err:.1e} of the float64 reference, JAX's {jax_err:.1e}")
