"""kvquant.attention against float64 attention over the spec's dequantized history: every
format (keys and values in different ones too), grouped-query heads, causal chunks, an
additive mask, adversarial scores, and NaN tokens that poison exactly what sees them.
The bound is docs/attention.md's: max |out - ref| <= 2e-5 * max|v| + ...; see BOUND."""
import os
import subprocess
import sys

import numpy as np
import pytest

import kvquant
from kvquant.attention import History, attend, reference_attention

torch = pytest.importorskip("torch")

# |out - ref| / max |v| over every test below; float32 sums of up to 4k terms, each
# product rounded once, then the softmax in float32 (docs/attention.md).
BOUND = 2e-5

FORMATS = [("fp8", {}), ("int8", {}), ("int4", {"group_size": 64}), ("int2", {"group_size": 32}),
           ("int4_per_channel", {"group_size": 32}), ("int2_per_channel", {"group_size": 64}),
           ("fp8_per_tensor", {"scale": 0.05})]


def _framework_paths():
    # torch-compiled is torch.compile's graph; torch-cpu-kernel the C++ kernel that
    # compiled=True uses on the CPU where it builds (backends/cpu_kernel/).
    paths = [("torch-eager", "torch", False), ("torch-compiled", "torch", True), ("torch-cpu-kernel", "torch", True)]
    try:
        import jax  # noqa: F401

        # jax-jit: the element-wise form XLA fuses (a GPU, a mesh); jax-cpu-kernel: the C++
        # kernel as an XLA custom call, which one CPU device uses.
        paths += [("jax-jit", "jax", None), ("jax-cpu-kernel", "jax", None)]
    except ImportError:
        pass
    return paths


PATHS = _framework_paths()
# Several query tokens go to SDPA over the history dequantized once (prefill); these
# paths force the reductions over the codes that decode uses and that run when the
# history holds a NaN or the call is itself being compiled.
CHUNK_PATHS = PATHS + [("torch-eager-reductions", "torch", False), ("torch-compiled-reductions", "torch", True),
                       ("torch-cpu-kernel-reductions", "torch", True)]


def to(framework, a):
    if framework == "torch":
        return torch.from_numpy(np.ascontiguousarray(a))
    import jax.numpy as jnp

    return jnp.asarray(a)


def history(framework, x, fmt, kw, quantized_tokens):
    q = kvquant.quantize(to(framework, x[:, :, :quantized_tokens]), fmt, on_nonfinite="propagate", **kw) \
        if quantized_tokens else None
    window = to(framework, x[:, :, quantized_tokens:]) if quantized_tokens < x.shape[2] else None
    return History(q, window)


def _not_served(*args, **kw):
    raise AssertionError("the CPU kernel did not serve this call: torch.compile's path was asked")


def run(path, query, keys, values, **kw):
    import contextlib
    from unittest import mock

    from kvquant.backends.torch import attention as torch_attention

    name, framework, compiled = path
    extra = {"compiled": compiled, "chunk_tokens": 96} if framework == "torch" else {}
    with contextlib.ExitStack() as patches:
        if framework == "jax":
            from kvquant.backends.jax import attention as jax_attention

            if name == "jax-jit":
                patches.enter_context(mock.patch.object(jax_attention, "_kernel_serves", lambda *args: False))
            else:
                from kvquant.backends.cpu_kernel import load_jax

                if not load_jax():
                    pytest.skip("the C++ kernel for JAX cannot be built here (no compiler, or KVQUANT_CPU_KERNEL=0)")
                patches.enter_context(mock.patch.object(jax_attention, "_attend", _not_served))
        if name.endswith("-reductions"):
            patches.enter_context(mock.patch.object(torch_attention, "prefill", lambda *args: None))
        if name.startswith("torch-compiled"):
            patches.enter_context(mock.patch.object(torch_attention, "CPU_KERNEL", False))
        if name.startswith("torch-cpu-kernel"):
            patches.enter_context(mock.patch.object(torch_attention, "_compiled_attend", _not_served))
        out = attend(to(framework, query), keys, values, **kw, **extra)
    return np.asarray(out.numpy() if framework == "torch" else out, np.float64)


@pytest.fixture
def no_cpu_kernel(monkeypatch):
    """compiled=True through torch.compile's graph, as on a device other than the CPU."""
    from kvquant.backends.torch import attention as torch_attention

    monkeypatch.setattr(torch_attention, "CPU_KERNEL", False)


def data(batch=1, kv_heads=2, groups=3, new=1, tokens=320, head_dim=64, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((batch, kv_heads, tokens, head_dim)).astype(np.float32)
    k[..., 3] *= 25  # an outlier channel
    v = rng.standard_normal((batch, kv_heads, tokens, head_dim)).astype(np.float32)
    q = rng.standard_normal((batch, kv_heads * groups, new, head_dim)).astype(np.float32)
    return q, k, v


def check(out, ref, v, what):
    assert out.shape == ref.shape
    assert np.array_equal(np.isnan(out), np.isnan(ref)), f"{what}: NaN positions differ"
    finite = ~np.isnan(ref)
    err = np.max(np.abs(out[finite] - ref[finite])) if finite.any() else 0.0
    assert err <= BOUND * np.nanmax(np.abs(v)), f"{what}: max error {err:.3g}"


@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS])
@pytest.mark.parametrize("fmt, kw", FORMATS, ids=[f for f, _ in FORMATS])
def test_every_format_within_the_bound(path, fmt, kw):
    q, k, v = data(new=1)
    K = history(path[1], k, fmt, kw, 256)
    V = history(path[1], v, fmt, kw, 256)
    ref = reference_attention(to(path[1], q), K, V)
    check(run(path, q, K, V), ref, v, f"{fmt} {path[0]}")


@pytest.mark.parametrize("path", CHUNK_PATHS, ids=[p[0] for p in CHUNK_PATHS])
def test_keys_and_values_in_different_formats_and_splits(path):
    """INT4 keys per channel keep a longer window than INT8 values: the same 300 tokens,
    split 256 + 44 and 290 + 10."""
    q, k, v = data(new=3, tokens=300)
    K = history(path[1], k, "int4_per_channel", {"group_size": 128}, 256)
    V = history(path[1], v, "int8", {}, 290)
    ref = reference_attention(to(path[1], q), K, V)
    check(run(path, q, K, V), ref, v, path[0])


@pytest.mark.parametrize("path", CHUNK_PATHS, ids=[p[0] for p in CHUNK_PATHS])
def test_a_whole_prompt_at_once_is_causal(path):
    """As many query tokens as the history holds (a prompt's prefill): SDPA's own causal
    path on torch; query token i sees tokens 0..i only."""
    q, k, v = data(new=150, tokens=150)
    K, V = history(path[1], k, "int8", {}, 100), history(path[1], v, "int4", {"group_size": 32}, 100)
    out = run(path, q, K, V)
    check(out, reference_attention(to(path[1], q), K, V), v, path[0])
    k2 = k.copy()
    k2[:, :, 140:] += 5.0  # later keys change: earlier query tokens must not see it
    K2 = history(path[1], k2, "int8", {}, 100)
    assert np.array_equal(run(path, q, K2, V)[:, :, :140], out[:, :, :140])


@pytest.mark.parametrize("path", CHUNK_PATHS, ids=[p[0] for p in CHUNK_PATHS])
def test_causal_chunk_and_additive_mask(path):
    q, k, v = data(new=5, tokens=200, groups=2)
    K, V = history(path[1], k, "int8", {}, 160), history(path[1], v, "int4", {"group_size": 32}, 160)
    mask = np.zeros((1, 1, 5, 200), np.float32)
    mask[..., 10:30] = -np.inf  # padding
    mask[..., 40] = 3.0
    ref = reference_attention(to(path[1], q), K, V, mask=to(path[1], mask))
    out = run(path, q, K, V, mask=to(path[1], mask))
    check(out, ref, v, path[0])
    # The last query token sees everything; the first does not see the 4 after it.
    assert not np.allclose(out[:, :, 0], run(path, q, K, V, mask=to(path[1], mask), causal=False)[:, :, 0])


@pytest.mark.parametrize("path", CHUNK_PATHS, ids=[p[0] for p in CHUNK_PATHS])
def test_fully_masked_query_row_is_nan(path):
    """A query row whose every token is masked has no softmax: NaN on every path, as in
    the reference (SDPA, which serves prefills, returns zeros for such a row)."""
    q, k, v = data(new=3, tokens=40, kv_heads=1, groups=2)
    K, V = history(path[1], k, "int8", {}, 32), history(path[1], v, "int8", {}, 32)
    mask = np.zeros((1, 1, 3, 40), np.float32)
    mask[:, :, 1] = -np.inf
    out = run(path, q, K, V, mask=to(path[1], mask), causal=False)
    check(out, reference_attention(to(path[1], q), K, V, mask=to(path[1], mask), causal=False), v, path[0])
    assert np.isnan(out[:, :, 1]).all() and not np.isnan(out[:, :, [0, 2]]).any()


@pytest.mark.parametrize("path", PATHS, ids=[p[0] for p in PATHS])
def test_adversarial_scores(path):
    """A single huge score (the softmax is one-hot), and all-equal scores (a plain mean)."""
    q, k, v = data(new=1, tokens=128, kv_heads=1, groups=1)
    k[:, :, 77] = q[0, 0, 0] * 40  # its score dominates every other by far
    K, V = history(path[1], k, "int8", {}, 100), history(path[1], v, "int8", {}, 100)
    out = run(path, q, K, V)
    check(out, reference_attention(to(path[1], q), K, V), v, "huge score")
    v77 = kvquant.dequantize(kvquant.quantize(v[:, :, :100], "int8"))[0, 0, 77]
    np.testing.assert_allclose(out[0, 0, 0], v77, atol=BOUND * np.abs(v).max())
    zero_q = np.zeros_like(q)
    out = run(path, zero_q, K, V)
    ref = reference_attention(to(path[1], zero_q), K, V)
    check(out, ref, v, "equal scores")


@pytest.mark.parametrize("path", CHUNK_PATHS, ids=[p[0] for p in CHUNK_PATHS])
def test_nan_tokens_poison_exactly_what_sees_them(path):
    q, k, v = data(new=4, tokens=160, kv_heads=1, groups=2)
    k[0, 0, 50, 7] = np.nan      # a quantized key: every query row that sees it is NaN
    v[0, 0, 158, 9] = np.nan     # a window value after the first query token: causally hidden from it
    v[0, 0, 20, 11] = np.nan     # a quantized value: channel 11 (group of 32: channels 0-31 for int4)
    K, V = history(path[1], k, "int8", {}, 128), history(path[1], v, "int8", {}, 128)
    out = run(path, q, K, V)
    ref = reference_attention(to(path[1], q), K, V)
    check(out, ref, v, path[0])
    assert np.isnan(out).all()  # the NaN key at 50 is seen by every query
    # Keys clean: only the values' NaN reach outputs, per channel and causally.
    k[0, 0, 50, 7] = 0.0
    K = history(path[1], k, "int8", {}, 128)
    out = run(path, q, K, V)
    ref = reference_attention(to(path[1], q), K, V)
    check(out, ref, v, path[0])
    nan = np.isnan(out[0])  # [heads, new, head_dim]
    assert nan[:, :, 11].all()  # int8 per token: token 20's whole row is NaN -> every channel
    # query token 0 sits at position 156 and cannot see token 158; tokens 1-3 can
    assert not nan[:, 0, 9].any() if not nan[:, 0, :].all() else True


@pytest.mark.parametrize("path", CHUNK_PATHS, ids=[p[0] for p in CHUNK_PATHS])
def test_masked_nan_keys_touch_nothing(path):
    """A -inf mask entry hides its token even where the key is NaN (a padding slot that
    holds garbage, a poisoned token): its score is -inf, not NaN + -inf. One NaN key in
    the quantized part and one in the window, both masked for every query."""
    q, k, v = data(new=2, tokens=200, kv_heads=1, groups=2)
    k[0, 0, 40, 3] = np.nan
    k[0, 0, 190, 5] = np.nan
    mask = np.zeros((1, 1, 2, 200), np.float32)
    mask[..., [40, 190]] = -np.inf
    K, V = history(path[1], k, "int8", {}, 160), history(path[1], v, "int4", {"group_size": 64}, 160)
    out = run(path, q, K, V, mask=to(path[1], mask))
    check(out, reference_attention(to(path[1], q), K, V, mask=to(path[1], mask)), v, path[0])
    assert not np.isnan(out).any()


def test_bad_shapes_are_refused():
    q, k, v = data()
    K = history("torch", k, "int8", {}, 256)
    with pytest.raises(ValueError, match="multiple of the keys' kv_heads"):
        attend(torch.zeros(1, 5, 1, 64), K, K)
    with pytest.raises(ValueError, match="keys hold 320 tokens and values 256"):
        attend(torch.from_numpy(q), K, History(K.quantized, None))
    with pytest.raises(ValueError, match="query must be"):
        attend(torch.zeros(5, 1, 64), K, K)


@pytest.mark.parametrize("keys_format, values_format", [("int4", "int8"), (None, "int8"), ("fp8", None),
                                                         ({"format": "int4_per_channel", "group_size": 32}, "int8")],
                         ids=["int4-int8", "full-int8", "fp8-full", "kivi-int8"])
def test_jax_cache_attention_inputs_hide_empty_slots(keys_format, values_format):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from kvquant.cache import JaxLayerCache

    q, k, v = data(new=1, tokens=40, kv_heads=2, groups=2)
    cache = JaxLayerCache.create(1, 2, 64, capacity=64, keys=keys_format, values=values_format, residual=8)
    cache, *_ = jax.jit(JaxLayerCache.append)(cache, jnp.asarray(k), jnp.asarray(v))
    keys, values, mask = cache.attention_inputs()
    out = np.asarray(attend(jnp.asarray(q), keys, values, mask=mask, causal=False), np.float64)

    # The same 40 tokens: 32 quantized (or kept in full precision: every token), 8 in the window.
    def held(x, fmt):
        x = jnp.asarray(x)
        if fmt is None:
            return History(None, x)
        kw = {k: v for k, v in fmt.items() if k != "format"} if isinstance(fmt, dict) else {}
        return History(kvquant.quantize(x[:, :, :32], fmt["format"] if kw else fmt, **kw), x[:, :, 32:])

    ref = reference_attention(jnp.asarray(q), held(k, keys_format), held(v, values_format))
    check(out, ref, v, "jax cache")


@pytest.mark.parametrize("keys, values, every", [("int8", "int8", 1), ("int4", "fp8", 32)], ids=["int8-int8", "int4-fp8-q32"])
def test_compiled_attention_compiles_once_for_decode(keys, values, every, no_cpu_kernel):
    # Over a cache that grows (its buffers double at 256 and 512 tokens, the window is
    # sliced when tokens leave it), torch.compile must not recompile: each recompile
    # cost about 3 s per format on the development VM, inside the decode loop. Found by
    # profiling bench_generate at a 512-token prompt. Prefills (300 and 77 tokens) go
    # to SDPA and compile nothing.
    from torch._dynamo.utils import counters

    from kvquant.backends.torch import attention as torch_attention
    from kvquant.cache import LayerCache

    torch_attention.reset_compiled()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    cache = LayerCache(keys, values, residual=128, quantize_every=every)
    want = []
    for new in [300] + [1] * 230 + [77] + [1] * 3:
        k, v = (torch.randn(1, 2, new, 64, generator=g) for _ in range(2))
        q = torch.randn(1, 6, new, 64, generator=g)
        cache.append(k, v, history=False)
        out = attend(q, *cache.attention_inputs(), compiled=True)
        want.append(out.shape == q.shape)
    assert all(want)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1, f"{graphs} graphs compiled; one, for decode, expected"


def test_compiled_attention_guards_what_a_call_can_change(no_cpu_kernel):
    """The compiled function keeps no guards on module globals or its own closure; the
    guards on its arguments stay. After a decode call without a mask, over a contiguous
    window, the same function (same formats and scale) must not reuse that graph for a
    mask, a window of other strides, or another dtype of query."""
    q, k, v = data(new=1, tokens=300)
    K, V = history("torch", k, "int8", {}, 256), history("torch", v, "int8", {}, 256)
    path = ("torch-compiled", "torch", True)
    check(run(path, q, K, V), reference_attention(to("torch", q), K, V), v, "no mask")
    mask = np.zeros((1, 1, 1, 300), np.float32)
    mask[..., 40:] = -np.inf  # only the first 40 tokens are seen
    ref = reference_attention(to("torch", q), K, V, mask=to("torch", mask))
    check(run(path, q, K, V, mask=to("torch", mask)), ref, v, "additive mask")
    strided = torch.from_numpy(np.ascontiguousarray(k[:, :, 256:].transpose(2, 0, 1, 3))).permute(1, 2, 0, 3)
    K2 = History(K.quantized, strided)  # token-major, as the cache holds its windows
    check(run(path, q, K2, V), reference_attention(to("torch", q), K2, V), v, "token-major window")
    out = attend(to("torch", q).to(torch.bfloat16), K, V, compiled=True)
    assert out.dtype == torch.bfloat16


def test_compiled_attention_calls_its_graph_without_dynamo_and_falls_back_to_it(monkeypatch, no_cpu_kernel):
    """After a decode call, the compiled function is its graph behind a check of
    Dynamo's own guards (_AheadOfTime): later decode steps, one token longer each time,
    never reach Dynamo and agree with it bit for bit; a call the graph was not made
    for (a mask) fails the check and is Dynamo's, and still honours the mask, until
    enough such calls get a graph of their own; where torch cannot compile ahead of
    time, Dynamo serves every call."""
    from kvquant.backends.torch import attention as torch_attention

    q, k, v = data(new=1, tokens=300)
    tq = to("torch", q)

    def decode_steps(fn_calls):
        outs = []
        for tokens in (290, 291, 292, 300):
            K = history("torch", k[:, :, :tokens], "int8", {}, 256)
            V = history("torch", v[:, :, :tokens], "int4", {"group_size": 64}, 256)
            outs.append(attend(tq, K, V, compiled=True))
            fn_calls.append(len(dynamo_calls))
        return outs, K, V

    dynamo_calls = []
    torch_attention.reset_compiled()
    direct, K, V = decode_steps([])
    (made,) = torch_attention._COMPILED.values()
    assert len(made.graphs) == 1
    real = made.dynamo

    def counted(*args):
        dynamo_calls.append(1)
        return real(*args)

    counted.aot_compile = real.aot_compile
    made.dynamo = counted
    seen = []
    again, _, _ = decode_steps(seen)
    assert seen == [0, 0, 0, 0], "a decode step went through Dynamo"
    mask = np.zeros((1, 1, 1, 300), np.float32)
    mask[..., 40:] = -np.inf
    masked = [attend(tq, K, V, mask=to("torch", mask), compiled=True) for _ in range(10)]
    # The first MISSES_BEFORE_ANOTHER calls with a mask are Dynamo's; the next gets a
    # graph of its own, and the call without a mask keeps the first.
    assert len(dynamo_calls) == made.MISSES_BEFORE_ANOTHER and len(made.graphs) == 2
    assert torch.equal(attend(tq, K, V, compiled=True), direct[-1]) and len(dynamo_calls) == made.MISSES_BEFORE_ANOTHER
    ref = reference_attention(tq, K, V, mask=to("torch", mask))
    for out in masked:
        check(out.numpy().astype(np.float64), ref, v, "mask")

    monkeypatch.setattr(torch_attention, "AHEAD_OF_TIME", False)
    torch_attention.reset_compiled()
    through_dynamo, _, _ = decode_steps([])
    assert not next(iter(torch_attention._COMPILED.values())).graphs
    for a, b, c in zip(direct, again, through_dynamo):
        assert torch.equal(a, b) and torch.equal(a, c)
    check(direct[-1].numpy().astype(np.float64), reference_attention(tq, K, V), v, "ahead of time")

    compile_with_aot = torch.compile
    # A torch whose compiled functions have no aot_compile (before 2.10, say).
    monkeypatch.setattr(torch, "compile", lambda *a, **kw: (lambda f: lambda *x: f(*x))(compile_with_aot(*a, **kw)))
    monkeypatch.setattr(torch_attention, "AHEAD_OF_TIME", True)
    torch_attention.reset_compiled()
    fallback, _, _ = decode_steps([])
    assert not next(iter(torch_attention._COMPILED.values())).graphs
    assert all(torch.equal(a, b) for a, b in zip(fallback, through_dynamo))


def test_detached_arrays_live_as_long_as_their_history():
    """The compiled path detaches a QuantizedKV's arrays once and reuses them while that
    QuantizedKV lives (a cache's history between two quantize calls); they must go with
    it, or every history a cache ever handed out would keep its buffers alive."""
    import gc

    from kvquant.backends.torch import attention as torch_attention

    q = kvquant.quantize(torch.randn(1, 2, 64, 64), "int4")
    first = torch_attention._detached(q)
    assert torch_attention._detached(q) is first
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(first, (q.codes, q.scales, q.zeros)))
    key = id(q)
    del q
    gc.collect()
    assert key not in torch_attention._DETACHED


@pytest.mark.parametrize("path", [("torch-compiled", "torch", True), ("torch-cpu-kernel", "torch", True)],
                         ids=["torch-compiled", "torch-cpu-kernel"])
def test_compiled_fp8_reads_subnormal_codes_under_flush_denormal(path):
    """The compiled path reads FP8 codes through float32 subnormals where the CPU keeps
    them; under torch.set_flush_denormal(True) that would read e4m3 subnormal codes as
    0 (an error of up to 7 * 2^-9 * scale = 3e-5 * max|v|, above the bound), so attend
    must pick the other reading there. The CPU kernel reads them through float16, whose
    widening keeps subnormals under any flush setting. One token's value holds
    subnormal codes and its key takes nearly all the weight."""
    q, k, v = data(new=1, tokens=64, kv_heads=1, groups=1)
    k[:, :, 10] = q[0, 0, 0] * 40
    v *= np.float32(0.5) / np.abs(v).max()  # max |v| is token 10's 1.0: the bound is 2e-5
    v[:, :, 10] = 7 * 2.0 ** -9 / 448  # e4m3 subnormal code 7 under the token's scale
    v[:, :, 10, 0] = 1.0  # the token's max: scale 1/448
    K, V = history("torch", k, "fp8", {}, 64), history("torch", v, "fp8", {}, 64)
    assert (V.quantized.codes[0, 0, 10, 1:].view(torch.uint8) == 7).all()
    ref = reference_attention(to("torch", q), K, V)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        out = run(path, q, K, V)
    finally:
        torch.set_flush_denormal(False)
    check(out, ref, v, "fp8 under flush_denormal")
    check(run(path, q, K, V), ref, v, "fp8")


def test_cpu_kernel_builds_where_there_is_a_compiler():
    """compiled=True on the CPU is the C++ kernel wherever a C++ compiler is found; a
    build that fails there would silently leave every call on torch.compile's path."""
    import shutil

    from kvquant.backends import cpu_kernel

    if cpu_kernel._compiler() is None or shutil.which(cpu_kernel._compiler()) is None:
        pytest.skip("no C++ compiler here")
    assert cpu_kernel.load() is not None


def test_cpu_kernel_builds_elsewhere_or_steps_aside(monkeypatch, tmp_path):
    """A cache directory that cannot be written (here: a file where the directory would
    be) moves the build to a private temporary directory of this process's; a compiler
    that fails leaves compiled=True to torch.compile, with the same accuracy."""
    from kvquant.backends import cpu_kernel

    if cpu_kernel._compiler() is None:
        pytest.skip("no C++ compiler here")
    (tmp_path / "not-a-directory").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-directory"))
    monkeypatch.setattr(cpu_kernel, "_LOADED", {})
    with pytest.warns(RuntimeWarning, match="not keeping"):
        assert cpu_kernel.load() is not None
    monkeypatch.setattr(cpu_kernel, "_LOADED", {})
    monkeypatch.setattr(cpu_kernel, "_compiler", lambda: "false")  # exits 1: the build fails
    with pytest.warns(RuntimeWarning, match="did not build"):
        assert cpu_kernel.load() is None
    q, k, v = data(new=1, tokens=80)
    K, V = history("torch", k, "int8", {}, 64), history("torch", v, "int4", {"group_size": 64}, 64)
    check(run(("torch-compiled", "torch", True), q, K, V), reference_attention(to("torch", q), K, V), v, "fallback")


KERNEL = ("torch-cpu-kernel-reductions", "torch", True)  # the kernel for any number of query tokens

# (id, head_dim, keys (format, kwargs), values (format, kwargs), tokens, quantized, window dtype, batch)
KERNEL_LAYOUTS = [
    ("head_dim-40-not-a-multiple-of-16", 40, ("int8", {}), ("fp8", {}), 300, 256, "float32", 1),
    ("per-channel-planes-of-20-and-10-bytes", 40, ("int4_per_channel", {"group_size": 32}),
     ("int2_per_channel", {"group_size": 32}), 300, 256, "float32", 1),
    ("int2-g32-head_dim-96-planes-of-24-bytes", 96, ("int2", {"group_size": 32}), ("int2", {"group_size": 32}), 300,
     256, "float32", 1),
    ("int2-g32-runs-of-8-bytes", 64, ("int2", {"group_size": 32}), ("int2", {"group_size": 32}), 300, 256, "float32", 1),
    ("int4-g32-two-groups-a-row", 64, ("int4", {"group_size": 32}), ("int4", {"group_size": 32}), 300, 256, "float32", 1),
    ("int4-g128-one-group-head_dim-128", 128, ("int4", {"group_size": 128}), ("int4", {"group_size": 128}), 300, 256,
     "float32", 1),
    ("int4-g64-head_dim-128", 128, ("int4", {"group_size": 64}), ("int8", {}), 300, 256, "float32", 1),
    ("head_dim-256", 256, ("int4", {"group_size": 128}), ("fp8", {}), 300, 256, "float32", 1),
    ("bfloat16-window", 64, ("int4", {"group_size": 64}), ("fp8", {}), 300, 256, "bfloat16", 1),
    ("float16-window", 64, ("int4_per_channel", {"group_size": 32}), ("int4", {"group_size": 64}), 300, 256,
     "float16", 1),
    ("batch-2", 64, ("fp8", {}), ("int4", {"group_size": 64}), 300, 256, "float32", 2),
    ("window-only", 64, ("int8", {}), ("int8", {}), 100, 0, "float32", 1),
    ("quantized-only", 64, ("int4", {"group_size": 64}), ("fp8_per_tensor", {"scale": 0.05}), 256, 256, "float32", 1),
    ("int4-g64-head_dim-96-a-shorter-last-group", 96, ("int4", {"group_size": 64}), ("int4", {"group_size": 64}),
     300, 256, "float32", 1),
    ("int2-g32-head_dim-80-a-shorter-last-group", 80, ("int2", {"group_size": 32}), ("int4", {"group_size": 32}),
     300, 256, "float32", 1),
    ("int4-g128-longer-than-head_dim-64", 64, ("int4", {"group_size": 128}), ("int2", {"group_size": 128}), 300,
     256, "float32", 1),
    ("3000-tokens-many-ranges-a-head", 64, ("int8", {}), ("int4", {"group_size": 64}), 3000, 2944, "float32", 1),
]


@pytest.mark.parametrize("new", [1, 3], ids=["decode", "chunk-of-3"])
@pytest.mark.parametrize("case", KERNEL_LAYOUTS, ids=[c[0] for c in KERNEL_LAYOUTS])
def test_cpu_kernel_layouts(case, new):
    """The layouts the kernel reads by other code than the common one (a head_dim that
    is not a multiple of 16, packed runs that cross groups, windows in 16-bit floats,
    batches, one side empty, many token ranges per head combined), each against the
    float64 reference."""
    _, head_dim, (kf, kkw), (vf, vkw), tokens, quantized, window_dtype, batch = case
    q, k, v = data(batch=batch, new=new, tokens=tokens, head_dim=head_dim)
    if window_dtype != "float32":
        # the reference sees the same rounded window the kernel reads
        k[:, :, quantized:] = torch.from_numpy(k[:, :, quantized:]).to(getattr(torch, window_dtype)).float().numpy()
        v[:, :, quantized:] = torch.from_numpy(v[:, :, quantized:]).to(getattr(torch, window_dtype)).float().numpy()
    K, V = history("torch", k, kf, kkw, quantized), history("torch", v, vf, vkw, quantized)
    if window_dtype != "float32":
        K = History(K.quantized, K.window.to(getattr(torch, window_dtype)))
        V = History(V.quantized, V.window.to(getattr(torch, window_dtype)))
    check(run(KERNEL, q, K, V), reference_attention(to("torch", q), K, V), v, case[0])


def test_cpu_kernel_reads_a_cache_in_place():
    """A cache's histories are views into buffers with room to grow (strides that are
    not the shape's): the kernel reads them where they lie."""
    from kvquant.cache import LayerCache

    q, k, v = data(new=1, tokens=300)
    cache = LayerCache({"format": "int4_per_channel", "group_size": 32}, {"format": "int4", "group_size": 64},
                       residual=40)
    cache.append(torch.from_numpy(k[:, :, :200]), torch.from_numpy(v[:, :, :200]), history=False)
    cache.append(torch.from_numpy(k[:, :, 200:]), torch.from_numpy(v[:, :, 200:]), history=False)
    K, V = cache.attention_inputs()
    assert not K.quantized.codes.is_contiguous() or not V.window.is_contiguous()
    check(run(KERNEL, q, K, V), reference_attention(to("torch", q), K, V), v, "cache views")


def test_cpu_kernel_nan_rules():
    """The spec's NaN rules on the kernel's own code: an FP8 NaN code (never stored by
    quantize, but a kernel author's buffer may hold one) is NaN where it is seen; a key
    whose score is +inf makes its rows NaN, as softmax does; a NaN value behind a -inf
    mask entry touches nothing."""
    q, k, v = data(new=1, tokens=200, kv_heads=1, groups=2)
    K, V = history("torch", k, "fp8", {}, 160), history("torch", v, "fp8", {}, 160)
    V.quantized.codes.view(torch.uint8)[0, 0, 30, 5] = 0x7F
    out = run(KERNEL, q, K, V)
    ref = reference_attention(to("torch", q), K, V)
    check(out, ref, v, "fp8 NaN code")
    assert np.isnan(out[..., 5]).all() and not np.isnan(np.delete(out, 5, axis=-1)).any()
    k2 = k.copy()
    k2[0, 0, 180] = np.where(q[0, 0, 0] > 0, np.inf, -np.inf)  # q . k = +inf for both rows
    K2 = history("torch", k2, "fp8", {}, 160)
    out = run(KERNEL, q, K2, history("torch", v, "fp8", {}, 160))
    assert np.isnan(out).all()
    v3 = v.copy()
    v3[0, 0, 190, :] = np.nan
    mask = np.zeros((1, 1, 1, 200), np.float32)
    mask[..., 190] = -np.inf
    V3 = history("torch", v3, "fp8", {}, 160)
    out = run(KERNEL, q, K, V3, mask=to("torch", mask))
    check(out, reference_attention(to("torch", q), K, V3, mask=to("torch", mask)), v, "masked NaN value")
    assert not np.isnan(out).any()


def test_cpu_kernel_avx2_build_within_the_bound():
    """The kernel as an AVX2 machine without AVX-512 builds it (-march=x86-64-v3, its
    own vector width in the hot loops), in a subprocess, every format against the
    float64 reference: this machine may itself have AVX-512."""
    import platform
    import subprocess
    import sys

    from kvquant.backends import cpu_kernel

    if platform.machine() not in ("x86_64", "AMD64") or cpu_kernel._compiler() is None \
            or "avx2" not in cpu_kernel._cpu():
        pytest.skip("needs an x86-64 CPU with AVX2 and a C++ compiler")
    code = """
import numpy as np, torch, kvquant
from kvquant.attention import History, reference_attention
from kvquant.backends import cpu_kernel
from kvquant.backends.torch import attention as torch_attention
assert "avx2" in cpu_kernel.describe(), cpu_kernel.describe()
rng = np.random.default_rng(0)
worst = 0.0
for d in (64, 128):
    for fmt, kw in [("int8", {}), ("fp8", {}), ("int4", {"group_size": 64}), ("int2", {"group_size": 32}),
                    ("int4_per_channel", {"group_size": 32}), ("int4", {"group_size": 32})]:
        k = torch.from_numpy(rng.standard_normal((1, 2, 300, d)).astype(np.float32))
        v = torch.from_numpy(rng.standard_normal((1, 2, 300, d)).astype(np.float32))
        for n in (1, 3):
            q = torch.from_numpy(rng.standard_normal((1, 6, n, d)).astype(np.float32))
            K = History(kvquant.quantize(k[:, :, :256], fmt, **kw), k[:, :, 256:])
            V = History(kvquant.quantize(v[:, :, :256], fmt, **kw), v[:, :, 256:])
            out = torch_attention.cpu_kernel_attend(q, K, V, d ** -0.5, True, None)
            assert out is not None, (d, fmt)
            ref = reference_attention(q, K, V)
            worst = max(worst, float(np.abs(out.double().numpy() - ref).max() / v.abs().max()))
print(worst)
"""
    import os

    env = dict(os.environ, KVQUANT_CPU_KERNEL_MARCH="x86-64-v3")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip()) <= BOUND


def test_jax_attention_without_the_cpu_kernel_uses_the_element_wise_form():
    """KVQUANT_CPU_KERNEL=0 (or no compiler): JAX's attention on the CPU runs the
    element-wise form, with no warning, and within the accuracy bound."""
    pytest.importorskip("jax")
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import numpy as np, jax.numpy as jnp, kvquant\n"
        "from kvquant.backends import cpu_kernel\n"
        "from kvquant.backends.jax import attention as ja\n"
        "rng = np.random.default_rng(0)\n"
        "k, v = (jnp.asarray(rng.standard_normal((1, 2, 64, 64), np.float32)) for _ in range(2))\n"
        "q = jnp.asarray(rng.standard_normal((1, 4, 1, 64), np.float32))\n"
        "K, V = (kvquant.attention.History(kvquant.quantize(t, 'int8'), None) for t in (k, v))\n"
        "assert not cpu_kernel.load_jax() and not ja._kernel_serves(K, V)\n"
        "out = np.asarray(kvquant.attention.attend(q, K, V), np.float64)\n"
        "err = np.abs(out - kvquant.attention.reference_attention(q, K, V)).max()\n"
        "assert err <= 2e-5 * float(np.abs(np.asarray(v)).max()), err\n"
        "print('ok')\n")
    env = dict(os.environ, KVQUANT_CPU_KERNEL="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("fmt, kw", [("int8", {}), ("int4", {"group_size": 32})])
def test_jax_gradients_through_the_cpu_kernel_are_the_element_wise_forms(fmt, kw):
    """The kernel's custom call has no derivative of its own: jax.grad through attend
    takes the element-wise form's, with respect to the query and the windows (before
    the kernel served JAX, the element-wise form was all there was, and differentiable)."""
    jax = pytest.importorskip("jax")
    from kvquant.backends.cpu_kernel import load_jax
    from kvquant.backends.jax import attention as jax_attention

    if not load_jax():
        pytest.skip("the C++ kernel for JAX cannot be built here")
    q, k, v = data(tokens=96, new=2)
    K = History(kvquant.quantize(jax.numpy.asarray(k[:, :, :64]), fmt, **kw), jax.numpy.asarray(k[:, :, 64:]))
    V = History(kvquant.quantize(jax.numpy.asarray(v[:, :, :64]), fmt, **kw), jax.numpy.asarray(v[:, :, 64:]))

    weights = jax.numpy.asarray(np.random.default_rng(1).standard_normal(q.shape).astype(np.float32))

    def loss(query, k_window, v_window, form):  # linear in the output: the same cotangent for both forms
        keys, values = History(K.quantized, k_window), History(V.quantized, v_window)
        return (form(query, keys, values, 0.125, True, None) * weights).sum()

    args = (jax.numpy.asarray(q), K.window, V.window)
    got = jax.grad(loss, argnums=(0, 1, 2))(*args, jax_attention._kernel_attend)
    want = jax.grad(loss, argnums=(0, 1, 2))(*args, jax_attention._attend)
    # The same backward formulas, compiled into two programs (XLA fuses the element-wise
    # form's forward and backward together), so they agree to float32 rounding, as
    # attention's paths do (docs/attention.md: its bits are not promised across paths).
    for g, w in zip(got, want):
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-6 * float(np.abs(w).max()))
