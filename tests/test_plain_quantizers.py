"""benchmarks/plain_quantizers.py, the framework-native quantizers the benchmark times
beside kvquant: for the comparison to mean anything they must produce what kvquant
produces (codes of the same dtype and shape, one float32 scale per token or group)
and be real quantizers (a round trip within one quantization step)."""
import importlib.util
import pathlib

import numpy as np
import pytest

import kvquant

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "plain_quantizers.py"
_spec = importlib.util.spec_from_file_location("plain_quantizers", _PATH)
plain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plain)

FORMATS = ["fp8", "fp8_per_tensor", "int8", "int4"]
# Largest round-trip error as a fraction of the per-token or per-group scale: half a
# step for the integer formats; e4m3's step near 448 is 32, so 16 scales.
STEP_FRACTION = {"fp8": 16.0, "fp8_per_tensor": 16.0, "int8": 0.5, "int4": 0.5}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("framework", sorted(plain.QUANTIZERS))
def test_plain_quantizer_matches_kvquant_layout_and_round_trips(framework, fmt):
    pytest.importorskip(framework)
    ops = kvquant.get_backend(framework)
    x_np = np.random.default_rng(1).standard_normal((48, 128)).astype(np.float32)
    x = ops.runtime.from_numpy(x_np)
    quantize, dequantize = plain.QUANTIZERS[framework]()[fmt]
    out = quantize(x)
    ours = kvquant.quantize(x, fmt, **({"group_size": plain.GROUP_SIZE} if fmt == "int4" else {}))
    rt = ops.runtime
    assert rt.dtype_name(out[0]) == rt.dtype_name(ours.codes)
    assert tuple(rt.shape(out[0])) == tuple(rt.shape(ours.codes))
    assert rt.dtype_name(out[1]) == "float32"
    assert int(np.prod(rt.shape(out[1]))) == int(np.prod(rt.shape(ours.scales)))
    back = rt.to_numpy(dequantize(*out))
    assert back.shape == x_np.shape and back.dtype == np.float32
    rows = back.size // (plain.GROUP_SIZE if fmt == "int4" else back.shape[-1])  # tokens or groups
    scale = np.broadcast_to(rt.to_numpy(out[1]).reshape(-1, 1), (rows, 1))
    err = np.abs(back - x_np).reshape(rows, -1)
    assert np.all(err <= STEP_FRACTION[fmt] * scale * (1 + 1e-5)), float((err / scale).max())
