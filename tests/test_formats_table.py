"""The format table (kvquant/_formats.py FORMATS) drives the rest: every backend's
declared kernels, the seed methods, the conformance cases and golden vectors, the
caches and attention cover exactly the formats it lists (docs/formats.md, "Adding a
format", says what a new entry needs besides)."""
import json
import os

import numpy as np
import pytest

import kvquant
import kvquant.conformance
from kvquant._formats import FORMATS
from kvquant._ops import CONTRACT, CONTRACT_V11, BackendOps
from kvquant._types import Format

ALL_FORMATS = set(FORMATS)


def _backends():
    names = ["numpy", "example"]
    for framework in ("torch", "jax"):
        try:
            __import__(framework)
            names.append(framework)
        except ImportError:
            pass
    return names


def test_the_table_lists_every_format_once():
    assert ALL_FORMATS == set(Format)
    assert all(info.format is fmt for fmt, info in FORMATS.items())


def test_the_contract_is_the_tables_kernels():
    named = {n for info in FORMATS.values() for n in info.kernel_names}
    assert set(CONTRACT) | set(CONTRACT_V11) == named
    assert not set(CONTRACT) & set(CONTRACT_V11)
    v1 = {n for info in FORMATS.values() if info.spec_version == "1" for n in info.kernel_names}
    assert set(CONTRACT) == v1


@pytest.mark.parametrize("backend", _backends())
def test_every_backend_declares_every_formats_kernels(backend):
    ops = kvquant.get_backend(backend)
    for variant, each in ops.variants().items():
        missing = [(info.format.value, name) for info in FORMATS.values() for name in info.kernel_names
                   if not callable(getattr(each.kernels, name, None))]
        assert not missing, f"{backend} ({variant}) lacks {missing}"


@pytest.mark.parametrize("fmt", sorted(ALL_FORMATS, key=lambda f: f.value), ids=lambda f: f.value)
def test_every_format_has_seed_methods_and_round_trips(fmt):
    info = FORMATS[fmt]
    assert callable(getattr(BackendOps, info.quantize_method)) and callable(getattr(BackendOps, info.dequantize_method))
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    kw = {"scale": 0.02} if info.static_scale else {"group_size": 32} if info.group_sizes else {}
    q = kvquant.quantize(x, fmt, **kw)
    assert tuple(np.asarray(q.codes).shape) == info.code_shape(x.shape)
    # Half a step: e4m3's 3 mantissa bits; an integer format's range over its levels.
    step = 2.0 ** -4 if info.code_dtype == "float8_e4m3fn" else 2.0 ** (1 - info.bits)
    assert np.abs(kvquant.dequantize(q, "float32") - x).max() < step * np.abs(x).max()


def test_every_format_has_conformance_cases_and_golden_vectors():
    from kvquant.conformance.suite import CASE_FAMILIES, all_cases

    assert {c.spec.format for c in all_cases(tuple(CASE_FAMILIES))} == ALL_FORMATS
    root = os.path.join(os.path.dirname(kvquant.conformance.__file__), "vectors")
    in_vectors = set()
    for name in os.listdir(root):
        with open(os.path.join(root, name)) as f:
            in_vectors |= {Format.parse(t["format"]) for t in json.load(f)["testGroups"]}
    assert in_vectors == ALL_FORMATS


def test_every_format_is_stored_by_the_cache_and_read_by_attention():
    from test_attention import FORMATS as ATTENTION_FORMATS

    from kvquant.cache import LayerCache

    assert {Format.parse(f) for f, _ in ATTENTION_FORMATS} == ALL_FORMATS
    for fmt, kw in ATTENTION_FORMATS:
        spec = dict(kw, format=fmt)
        cache = LayerCache(keys=spec, values=spec, residual=0, quantize_every=1)
        x = np.random.default_rng(1).standard_normal((1, 2, 64, 64)).astype(np.float32)
        cache.append(x, x, history=False)
        assert cache.quantized("keys").format is Format.parse(fmt)
