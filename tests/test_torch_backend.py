"""PyTorch specifics: torch.compile without graph breaks, threads, views, autograd."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import kvquant  # noqa: E402
from conftest import FIDS, FORMATS, assert_same_bits, check_e4m3_encoder, shape_for  # noqa: E402

# pytest imported kvquant (through the conformance plugin) before torch, so the torch
# backend was not preloaded; torch.compile cannot trace its import (see README).
kvquant.get_backend("torch")


def np_ref(x, fmt, kw):
    q = kvquant.quantize(x.detach().cpu().numpy() if x.dtype != torch.bfloat16 else kvquant.get_backend("torch").runtime.to_numpy(x), fmt, **kw)
    return q, kvquant.dequantize(q, "float32")


def np_of(t):
    return kvquant.get_backend("torch").runtime.to_numpy(t)


def sample(shape=(2, 4, 8, 64), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("fmt, kw", FORMATS, ids=FIDS)
def test_user_level_compile_fullgraph_has_no_graph_break(fmt, kw):
    torch._dynamo.reset()
    # The first dispatch of a torch.Tensor happens inside the trace, with entry points
    # not yet discovered: the state a user's first call meets (an earlier regression
    # passed only when another test had warmed these caches).
    kvquant._registry._by_type.clear()
    kvquant._registry._entry_points_cache = None

    def roundtrip(x):
        q = kvquant.quantize(x, fmt, **kw)
        return q.codes, q.scales, kvquant.dequantize(q, torch.float32)

    compiled = torch.compile(roundtrip, fullgraph=True)  # a graph break raises
    x = sample(shape_for(fmt, (2, 4, 8, 64)))
    codes, scales, out = compiled(x)
    q_ref, out_ref = np_ref(x, fmt, kw)
    assert_same_bits(q_ref.codes, np_of(codes), "codes")
    assert_same_bits(q_ref.scales, np_of(scales), "scales")
    assert_same_bits(out_ref, np_of(out), "dequant")


def test_raise_becomes_propagate_while_compiling():
    torch._dynamo.reset()
    x = sample((3, 64))
    x[1, 7] = float("nan")
    compiled = torch.compile(lambda t: kvquant.quantize(t, "int8").scales, fullgraph=True)
    scales = compiled(x)
    assert torch.isnan(scales[1]) and torch.isfinite(scales[[0, 2]]).all()
    with pytest.raises(kvquant.NonFiniteInputError) as e:
        kvquant.quantize(x, "int8")
    assert e.value.index == (1,)


@pytest.mark.parametrize("saved", [True, False], ids=["saved-graph", "dynamo"])
def test_compiled_kernel_first_called_on_few_tokens_keeps_a_parallel_loop(saved, tmp_path, monkeypatch):
    # Inductor picks serial or parallel CPU code from the first call's token count and
    # reuses it for every later count (and from its disk cache in later processes): a
    # first call with four tokens once left 32768-token dequantizations serial.
    if torch.get_num_threads() < 2:
        pytest.skip("one intra-op thread: nothing to run in parallel")
    from torch._inductor.utils import run_and_get_code

    from kvquant.backends.torch import graphs, kernels

    torch._dynamo.reset()
    monkeypatch.setenv("KVQUANT_TORCH_GRAPHS_DIR", str(tmp_path))  # compiled here, not loaded
    monkeypatch.setattr(graphs, "SAVE_COMPILED", saved)
    graphs.saved_graphs_dir.cache_clear()
    try:
        kernel = graphs.compile_unit(kernels.int8_dequantize)
        # Dynamo's path would read Inductor's cache; a saved graph's compile never does.
        with torch._inductor.config.patch(force_disable_caches=not saved):
            _, sources = run_and_get_code(kernel, torch.ones((4, 64), dtype=torch.int8), torch.ones((4, 1)), "float32")
    finally:
        graphs.saved_graphs_dir.cache_clear()
    assert sources and all("#pragma omp parallel" in src for src in sources)
    assert bool(list(tmp_path.glob("*/*.pt2"))) == saved


@pytest.mark.parametrize("fmt, kw", FORMATS, ids=FIDS)
@pytest.mark.parametrize("view", ["transpose", "slice"])
def test_non_contiguous_views_match_contiguous_copies(fmt, kw, view):
    base = sample(shape_for(fmt, (2, 8, 4, 64)))
    x = base.transpose(1, 2) if view == "transpose" else base[:, ::2]
    assert not x.is_contiguous()
    a, b = kvquant.quantize(x, fmt, **kw), kvquant.quantize(x.contiguous(), fmt, **kw)
    for p, q in ((a.codes, b.codes), (a.scales, b.scales)):
        assert_same_bits(np_of(q), np_of(p))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt, kw", FORMATS, ids=FIDS)
def test_thread_count_does_not_change_bits(fmt, kw, threads):
    x = sample(shape_for(fmt, (64, 128)), seed=3)
    q_ref, out_ref = np_ref(x, fmt, kw)
    with kvquant.get_backend("torch").runtime.num_threads(threads):
        q = kvquant.quantize(x, fmt, **kw)
        out = kvquant.dequantize(q, torch.float32)
    assert_same_bits(q_ref.codes, np_of(q.codes))
    assert_same_bits(out_ref, np_of(out))


def test_requires_grad_is_accepted_and_detached():
    x = sample((4, 64)).requires_grad_(True)
    q = kvquant.quantize(x, "int4")
    out = kvquant.dequantize(q)
    assert not q.codes.requires_grad and not q.scales.requires_grad and not out.requires_grad


@pytest.mark.parametrize("fmt, dtype", [("fp8", torch.float8_e4m3fn), ("fp8_per_tensor", torch.float8_e4m3fn), ("int8", torch.int8), ("int4", torch.uint8)])
def test_code_dtypes(fmt, dtype):
    q = kvquant.quantize(sample((2, 64)), fmt)
    assert q.codes.dtype == dtype and q.scales.dtype == torch.float32


@pytest.mark.parametrize("out", [torch.float32, torch.float16, torch.bfloat16, "bfloat16"])
def test_output_dtype_choices(out):
    x = sample((2, 64), dtype=torch.bfloat16)
    q = kvquant.quantize(x, "int8")
    want = torch.float32 if out == torch.float32 else (torch.bfloat16 if out in (torch.bfloat16, "bfloat16") else torch.float16)
    assert kvquant.dequantize(q, out).dtype == want
    assert kvquant.dequantize(q).dtype == torch.bfloat16  # the source dtype by default


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("codes_per_byte", [2, 4], ids=["nibbles", "crumbs"])
@pytest.mark.parametrize("width", [4, 6, 8, 12, 128], ids=lambda w: f"width{w}")
def test_code_packing_gives_the_spec_bytes(width, codes_per_byte, compiled):
    # The torch packers take shortcuts by 16- and 32-bit words, with a fallback where
    # the width is not a multiple of four; kvquant/_formulas.py writes the spec's packing.
    # Every code value at every position within a word, in both directions.
    from kvquant import _formulas
    from kvquant.backends.torch import kernels

    levels = 1 << (8 // codes_per_byte)
    if width % codes_per_byte:
        pytest.skip("not a packable width")
    rows = torch.arange(levels ** 4 * 4)
    codes = torch.stack([(rows // levels ** (i % 4)) % levels for i in range(width)], dim=-1).to(torch.uint8)
    codes = torch.cat([codes, codes.flip(-1)]).reshape(-1, 2, width)  # leading axes too
    spec = _formulas.pack_codes(kernels.M, codes, codes_per_byte)
    pack, unpack = kernels.pack_codes, kernels.unpack_codes
    if compiled:
        torch._dynamo.reset()
        pack = torch.compile(pack, fullgraph=True, dynamic=False)
        unpack = torch.compile(unpack, fullgraph=True, dynamic=False)
    assert_same_bits(np_of(spec), np_of(pack(codes, codes_per_byte)), "packed")
    assert_same_bits(np_of(codes), np_of(unpack(spec, codes_per_byte)), "unpacked")


def _encode_compiled(values):
    from kvquant.backends.torch.kernels import encode_e4m3_words

    encode = torch.compile(lambda y: encode_e4m3_words(y).to(torch.uint8), fullgraph=True, dynamic=True)
    return encode(torch.from_numpy(values)).numpy()


def test_compiled_bit_encoder_on_every_rounding_boundary():
    check_e4m3_encoder(_encode_compiled)


@pytest.mark.exhaustive
def test_compiled_bit_encoder_on_every_float32_up_to_448():
    check_e4m3_encoder(_encode_compiled, every_float32=True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("subnormal_floats", [True, False], ids=["through-subnormal-floats", "rebiased"])
def test_e4m3_bit_decoder_is_exact_on_every_code(subnormal_floats, compiled):
    """The integer decoder that replaces torch's slow float8 cast (both ways: through
    float32 subnormals, and the one a flushing CPU needs), against ml_dtypes on all 256
    codes: 254 values, and the two NaN codes flagged."""
    import ml_dtypes

    from kvquant.backends.torch.kernels import decode_e4m3, e4m3_values

    codes = np.arange(256, dtype=np.uint8)
    expected = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    decode = torch.compile(decode_e4m3, fullgraph=True) if compiled else decode_e4m3
    v, factor, nan_codes = decode(torch.from_numpy(codes).view(torch.float8_e4m3fn), subnormal_floats)
    finite = ~np.isnan(expected)
    assert_same_bits(expected[finite], (v * factor).numpy()[finite], "decoded codes")
    assert_same_bits(~finite, nan_codes.numpy(), "NaN codes flagged")
    assert_same_bits(expected[finite], e4m3_values(torch.from_numpy(codes).view(torch.float8_e4m3fn), subnormal_floats).numpy()[finite], "e4m3_values")
    if not compiled:
        assert decode_e4m3(torch.from_numpy(codes[finite]).view(torch.float8_e4m3fn), subnormal_floats)[2] is None


# A later process's view of the compiled variant: its graphs come from the directory
# an earlier process saved them in, not from Dynamo.
_SAVED_GRAPHS_CHILD = r"""
import json, sys
import numpy as np, torch, kvquant
from torch._dynamo.utils import counters
ops = kvquant.get_backend("torch").variants()["compile"]
out = {}
for dtype in ("float32", "bfloat16"):
    x = torch.from_numpy(np.load(sys.argv[1])).to(getattr(torch, dtype))
    for fmt in ("int8", "fp8"):
        q = kvquant.quantize(x, fmt, backend=ops)
        d = kvquant.dequantize(q, "float32", backend=ops)
        out[f"{fmt}/{dtype}"] = [ops.runtime.to_numpy(a).tobytes().hex() for a in (q.codes, q.scales, d)]
out["dynamo_graphs"] = counters["stats"]["unique_graphs"]
print(json.dumps(out))
"""


def test_compiled_graphs_saved_by_one_process_serve_the_next(tmp_path):
    """The compiled variant saves each graph (aot_compile) and a new process loads it
    instead of tracing again with Dynamo: the second process traces nothing, and both
    give the reference's bits."""
    import json
    import os
    import subprocess
    import sys

    x = (np.random.default_rng(7).standard_normal((33, 96)) * 2.0 ** np.arange(-60, 36, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, KVQUANT_TORCH_GRAPHS_DIR=str(tmp_path / "graphs"))
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _SAVED_GRAPHS_CHILD, str(tmp_path / "x.npy")],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    (saved,) = list((tmp_path / "graphs").iterdir())
    assert len(list(saved.glob("*.pt2"))) >= 4
    assert runs[0]["dynamo_graphs"] > 0 and runs[1]["dynamo_graphs"] == 0
    for dtype in ("float32", "bfloat16"):
        xd = torch.from_numpy(x).to(getattr(torch, dtype))
        for fmt in ("int8", "fp8"):
            q = kvquant.quantize(np_of(xd).astype(np.float32), fmt)
            expected = [np.asarray(a) for a in (q.codes, q.scales, kvquant.dequantize(q, "float32"))]
            for run in runs:
                for name, want, got in zip(("codes", "scales", "dequant"), expected, run[f"{fmt}/{dtype}"]):
                    assert_same_bits(want, np.frombuffer(bytes.fromhex(got), want.dtype).reshape(want.shape),
                                     f"{fmt}/{dtype} {name}")


def test_a_saved_graph_serves_only_calls_its_guards_accept(tmp_path, monkeypatch):
    """Every call whose file name is the same (forced here) but whose dtype, width,
    output dtype or token count 0/1 differ is compiled anew, not served by the graph
    saved on disk for another: each gives the reference's bits."""
    from kvquant.backends.torch import graphs

    monkeypatch.setenv("KVQUANT_TORCH_GRAPHS_DIR", str(tmp_path / "graphs"))
    monkeypatch.setattr(graphs, "_specialisation", lambda args: "one file for every call")
    graphs.saved_graphs_dir.cache_clear()
    ops = kvquant.get_backend("torch").variants()["compile"]
    ops.kernels.release()
    try:
        for shape, dtype, out in [((8, 64), torch.float32, "float32"), ((8, 64), torch.float16, "float32"),
                                  ((8, 96), torch.float32, "float32"), ((8, 64), torch.float32, "bfloat16"),
                                  ((1, 64), torch.float32, "float32"), ((8, 64), torch.float32, "float32")]:
            x = sample(shape, dtype, seed=shape[0])
            ops.kernels.release()  # from disk, not from this process's memory
            q = kvquant.quantize(x, "int8", backend=ops)
            ref = kvquant.quantize(np_of(x).astype(np.float32), "int8")
            assert_same_bits(np.asarray(ref.codes), np_of(q.codes), f"{shape} {dtype} codes")
            assert_same_bits(np.asarray(kvquant.dequantize(ref, out)), np_of(kvquant.dequantize(q, out, backend=ops)),
                             f"{shape} {dtype} dequantized to {out}")
        files = list((tmp_path / "graphs").glob("*/*.pt2"))
        assert {f.name.split("-")[0] for f in files} == {"int8_quantize", "int8_dequantize"}
    finally:
        graphs.saved_graphs_dir.cache_clear()
        ops.kernels.release()


def test_saved_graphs_are_kept_apart_by_kvquant_source(tmp_path, monkeypatch):
    """The saved graphs' directory is named by the source the kernels import: a change
    there compiles everything anew instead of loading graphs of the old code, one
    elsewhere keeps them; saving off (KVQUANT_TORCH_GRAPHS_DIR=0) saves nothing."""
    import shutil

    from kvquant.backends.torch import graphs

    copy = tmp_path / "kvquant"
    shutil.copytree(os.path.dirname(kvquant.__file__), copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(kvquant, "__file__", str(copy / "__init__.py"))
    monkeypatch.setenv("KVQUANT_TORCH_GRAPHS_DIR", str(tmp_path / "graphs"))
    try:
        graphs.saved_graphs_dir.cache_clear()
        before = graphs.saved_graphs_dir()
        with open(copy / "cli.py", "a") as f:
            f.write("\n# no kernel reads the command's code\n")
        graphs.saved_graphs_dir.cache_clear()
        assert graphs.saved_graphs_dir() == before
        with open(copy / "_spec.py", "a") as f:  # imported by the kernels
            f.write("\n# a changed constant would change the graphs\n")
        graphs.saved_graphs_dir.cache_clear()
        after = graphs.saved_graphs_dir()
        assert before != after and os.path.dirname(before) == os.path.dirname(after)
        monkeypatch.setenv("KVQUANT_TORCH_GRAPHS_DIR", "0")
        graphs.saved_graphs_dir.cache_clear()
        assert graphs.saved_graphs_dir() is None
    finally:
        graphs.saved_graphs_dir.cache_clear()


def _golden(formats):
    from kvquant.conformance.vectors import golden_cases

    return [c for c in golden_cases() if c.spec.format.value in formats]


@pytest.mark.parametrize("backend, variant", [("numpy", "eager"), ("torch", "eager"), ("torch", "compile")])
def test_golden_vectors_under_flush_denormal(backend, variant):
    """torch.set_flush_denormal(True) makes the CPU treat float32 subnormal inputs as
    zero (DAZ) and flush subnormal results (FTZ), for NumPy's code in this thread too:
    a decoder that reads e4m3 subnormal codes through float32 subnormals gives 0 for
    them (31 vectors did, before). Every golden vector must still come out bit for bit
    (compiled: the FP8 formats, whose decoder is the one at risk; the rest compile the
    same arithmetic)."""
    from kvquant.conformance.runner import run_case

    ops = kvquant.get_backend(backend)
    if variant == "compile":
        ops = ops.variants()["compile"]
    cases = _golden({"fp8", "fp8_per_tensor"} if variant == "compile" else
                    {"fp8", "fp8_per_tensor", "int8", "int4", "int2", "int4_per_channel", "int2_per_channel"})
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        probe = torch.tensor(2.0 ** -140) * 2.0
        assert probe == 0, "flush_denormal did not take effect"
        failed = [(c.id, r.mismatches[0]) for c in cases for r in [run_case(ops, c)] if not r.passed]
    finally:
        torch.set_flush_denormal(False)
    assert not failed, f"{len(failed)} of {len(cases)} cases differ, first {failed[0]}"
