"""One decode step of attention (new_tokens = 1, batch 1) over a long history, every
candidate timed in the same rounds, reported as a ratio to SDPA over the float32
history (issue 18's benchmark):

    python benchmarks/bench_attention.py                       # both shapes, 1k to 64k
    python benchmarks/bench_attention.py --shape smollm2 --tokens 16384 --repeats 9

Candidates: torch's scaled_dot_product_attention over a float32 and over a bfloat16
history; dequantize-then-SDPA (what a cache that hands attention a dequantized copy
does); kvquant.attention over the codes with compiled=True (on the CPU: kvquant's C++
kernel, backends/cpu_kernel/decode_attention.cpp), the same through torch.compile's fused
loops (what compiled=True runs on other devices, or where no C++ compiler is found),
and eager (chunks), for INT8, FP8 and INT4 g64. Also: bytes each reads per step and the
bandwidth it achieves as a fraction of a same-run copy of the float32 history (the
physical limit here: a copy reads and writes, so the fraction counts bytes read
against the copy's bytes read).

``--framework jax``: the same step in JAX under jax.jit, as a ratio to
jax.nn.dot_product_attention over the float32 history: that over a bfloat16 history,
dequantize-then-dot_product_attention, and kvquant.attention over the codes: on one
CPU device the C++ kernel as an XLA custom call, and the element-wise form XLA fuses
(what a GPU or a mesh runs).

Not a test: numbers depend on the machine. docs/attention.md records a run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tqdm import tqdm

import kvquant
from kvquant.attention import History, attend
from kvquant.backends.torch import attention as torch_attention

SHAPES = {"smollm2": (9, 3, 64), "llama8b": (32, 8, 128)}
FORMATS = [("int8", {}), ("fp8", {}), ("int4", {"group_size": 64})]


SYNC = lambda: None  # noqa: E731 - torch.cuda.synchronize on a GPU: its calls return before the work ends


def _time(fn, repeats: int) -> float:
    fn()
    fn()
    SYNC()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        SYNC()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _torch_compile(q, keys, values):
    torch_attention.CPU_KERNEL = False
    try:
        return attend(q, keys, values, compiled=True)
    finally:
        torch_attention.CPU_KERNEL = True


def _nbytes(*arrays) -> int:
    return sum(a.numel() * a.element_size() for a in arrays if a is not None)


def bench(shape: str, tokens: int, repeats: int, only=(), device: str = "cpu"):
    q_heads, kv_heads, head_dim = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(device)
    v = torch.randn(1, kv_heads, tokens, head_dim, generator=gen).to(device)
    q = torch.randn(1, q_heads, 1, head_dim, generator=gen).to(device)
    kb, vb = k.to(torch.bfloat16), v.to(torch.bfloat16)
    qb = q.to(torch.bfloat16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    f32_bytes = _nbytes(k, v)
    dst = torch.empty(2 * k.numel(), device=device)
    src = torch.cat([k.reshape(-1), v.reshape(-1)])
    rows = []
    copy = _time(lambda: dst.copy_(src), repeats)
    base = _time(lambda: sdpa(q, k, v, enable_gqa=True), repeats)
    rows.append(("sdpa float32", base, f32_bytes))
    rows.append(("sdpa bfloat16", _time(lambda: sdpa(qb, kb, vb, enable_gqa=True), repeats), _nbytes(kb, vb)))
    wanted = (lambda name: not only or any(w in name for w in only))
    for fmt, kw in FORMATS:
        kq, vq = kvquant.quantize(k, fmt, **kw), kvquant.quantize(v, fmt, **kw)
        held = _nbytes(kq.codes, kq.scales, kq.zeros, vq.codes, vq.scales, vq.zeros)
        label = fmt + ("-g64" if fmt == "int4" else "")
        keys, values = History(kq, None), History(vq, None)
        candidates = [
            (f"{label} dequantize+sdpa", lambda: sdpa(q, kvquant.dequantize(kq), kvquant.dequantize(vq), enable_gqa=True)),
            # Off the CPU compiled=True is torch.compile's path: one row for it.
            (f"{label} kvquant cpu kernel" if device == "cpu" else f"{label} kvquant compiled",
             lambda: attend(q, keys, values, compiled=True)),
            *([(f"{label} kvquant torch.compile", lambda: _torch_compile(q, keys, values))] if device == "cpu" else []),
            (f"{label} kvquant eager", lambda: attend(q, keys, values))]
        rows += [(name, _time(fn, repeats), held) for name, fn in candidates if wanted(name)]
    copy_bandwidth = f32_bytes / copy  # bytes read per second by the copy
    return [{"shape": shape, "tokens": tokens, "candidate": name, "ms": t * 1e3, "ratio_to_sdpa_f32": t / base,
             "bytes_read": nbytes, "bandwidth_fraction_of_copy": (nbytes / t) / copy_bandwidth}
            for name, t, nbytes in rows]


def bench_jax(shape: str, tokens: int, repeats: int, only=()):
    """The decode step in JAX, every candidate jitted, against dot_product_attention
    over the float32 history (the keys' heads repeated for GQA inside the jit)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    q_heads, kv_heads, head_dim = SHAPES[shape]
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((1, kv_heads, tokens, head_dim)).astype(np.float32))
    v = jnp.asarray(rng.standard_normal((1, kv_heads, tokens, head_dim)).astype(np.float32))
    q = jnp.asarray(rng.standard_normal((1, q_heads, 1, head_dim)).astype(np.float32))

    def block(fn):
        return lambda: jax.block_until_ready(fn())

    @jax.jit
    def dot(q, k, v):  # [B, T, H, D] is dot_product_attention's layout
        out = jax.nn.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        return out.transpose(0, 2, 1, 3)

    nbytes = lambda *arrays: sum(a.size * a.dtype.itemsize for a in arrays if a is not None)  # noqa: E731
    f32_bytes = nbytes(k, v)
    copy = jax.jit(lambda a, b: (a + 0, b + 0))
    copy_time = _time(block(lambda: copy(k, v)), repeats)
    base = _time(block(lambda: dot(q, k, v)), repeats)
    rows = [("jax dot_product_attention float32", base, f32_bytes)]
    kb, vb = k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)
    rows.append(("jax dot_product_attention bfloat16",
                 _time(block(lambda: dot(q.astype(jnp.bfloat16), kb, vb)), repeats), nbytes(kb, vb)))
    wanted = (lambda name: not only or any(w in name for w in only))
    step = jax.jit(lambda q, keys, values: attend(q, keys, values, causal=False))
    from kvquant.backends.jax import attention as jax_attention
    from kvquant.backends.cpu_kernel import load_jax

    # the element-wise form (what a GPU or a mesh runs), beside the C++ kernel's custom call
    elementwise = jax.jit(lambda q, keys, values: jax_attention._attend(q, keys, values, q.shape[-1] ** -0.5,
                                                                        False, None))
    deq_dot = jax.jit(lambda q, kq, vq: dot(q, kvquant.dequantize(kq, "float32"), kvquant.dequantize(vq, "float32")))
    for fmt, kw in FORMATS:
        kq, vq = kvquant.quantize(k, fmt, **kw), kvquant.quantize(v, fmt, **kw)
        held = nbytes(kq.codes, kq.scales, kq.zeros, vq.codes, vq.scales, vq.zeros)
        label = fmt + ("-g64" if fmt == "int4" else "")
        keys, values = History(kq, None), History(vq, None)
        candidates = [(f"{label} dequantize+dot_product_attention", lambda: deq_dot(q, kq, vq)),
                      (f"{label} kvquant jit" + (" (C++ kernel)" if load_jax() else ""), lambda: step(q, keys, values)),
                      (f"{label} kvquant jit element-wise", lambda: elementwise(q, keys, values))]
        rows += [(name, _time(block(fn), repeats), held) for name, fn in candidates if wanted(name)]
    copy_bandwidth = f32_bytes / copy_time
    return [{"shape": shape, "tokens": tokens, "candidate": name, "ms": t * 1e3, "ratio_to_sdpa_f32": t / base,
             "bytes_read": b, "bandwidth_fraction_of_copy": (b / t) / copy_bandwidth} for name, t, b in rows]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), default=[])
    parser.add_argument("--tokens", action="append", type=int, default=[])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cpu", help="e.g. cuda:0 (scripts/device_check.sh)")
    parser.add_argument("--only", action="append", default=[],
                        help="only the candidates whose name contains this (repeatable); SDPA always runs")
    parser.add_argument("--framework", choices=["torch", "jax"], default="torch")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        global SYNC
        SYNC = torch.cuda.synchronize
    shapes = args.shape or ["smollm2", "llama8b"]
    lengths = args.tokens or [1024, 4096, 16384, 65536]
    results = []
    for shape in shapes:
        for tokens in tqdm(lengths, desc=shape, unit="length"):
            if args.framework == "jax":
                results += bench_jax(shape, tokens, args.repeats, args.only)
            else:
                results += bench(shape, tokens, args.repeats, args.only, args.device)
    if args.framework == "jax":
        import jax

        from kvquant.backends import cpu_kernel

        kernel = cpu_kernel.describe_jax()
        print(f"one decode step, batch 1, jax {jax.__version__} on {jax.devices()[0].platform}; median of "
              f"{args.repeats}; ratio to jax.nn.dot_product_attention over the float32 history; {kernel}")
    else:
        from kvquant.backends import cpu_kernel

        ran = cpu_kernel.describe() if args.device == "cpu" else f"torch.compile's kernels on {args.device}"
        print(f"one decode step, batch 1; median of {args.repeats}; ratio to SDPA over the float32 history; "
              f"{torch.get_num_threads()} threads; compiled=True ran: {ran}")
    print(f"{'shape':<9}{'tokens':>7}  {'candidate':<44}{'ms':>9}{'ratio':>8}{'MB read':>9}{'bw/copy':>9}")
    for r in results:
        print(f"{r['shape']:<9}{r['tokens']:>7}  {r['candidate']:<44}{r['ms']:>9.3f}{r['ratio_to_sdpa_f32']:>7.2f}x"
              f"{r['bytes_read'] / 2**20:>9.1f}{r['bandwidth_fraction_of_copy']:>9.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
