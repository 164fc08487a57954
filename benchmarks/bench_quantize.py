"""Quantize, and quantize + dequantize, per format and backend, as a multiple of a
plain copy of the same array timed in the same run: each repeat times the copy and
the candidates back to back, and the median of the per-repeat ratios is reported.
The same rounds time the quantizer a user would write in that framework without
kvquant (plain_quantizers.py: same formats, none of the spec's guarantees), run the
same way (eagerly, or under the same torch.compile options or jax.jit), so each row
also says what bit-exactness costs there.

    python benchmarks/bench_quantize.py                  # every installed backend
    python benchmarks/bench_quantize.py --backend numpy --tokens 32768 --head-dim 128

Not a test: numbers depend on the machine. The closing notes of the issues record
what was measured here.

The allocator is pinned: glibc returns a freed 16 MiB block to the kernel or keeps it
depending on what else is free, so a fresh buffer is page-faulted in one repeat and not
in the next, and the copy baseline alone swung between 0.45 and 4.4 ms here (ratios
with it by 10x). The script re-runs itself with glibc's mmap and trim thresholds and
its top pad raised, so every candidate and the baseline reuse warm memory: the steady
state of a serving loop, and the strictest baseline. --no-pin-allocator measures
without it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import kvquant

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plain_quantizers import QUANTIZERS  # noqa: E402

FORMATS = [("fp8", {}), ("fp8_per_tensor", {}), ("int8", {}), ("int4", {"group_size": 64})]
# Spec v1.1 (KIVI): no plain counterpart in plain_quantizers.py, so their plain columns are "-".
V11_FORMATS = [("int2", {"group_size": 64}), ("int4_per_channel", {"group_size": 32}),
               ("int2_per_channel", {"group_size": 32})]


def _timed(fn, sync) -> float:
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def interleaved_ratios(baseline, candidates, sync, repeats: int):
    """Median over repeats of each candidate's time divided by the baseline's, timed
    back to back in the same round so that machine noise (frequency, page faults, a
    neighbour's load) hits both alike. Returns (median baseline seconds, [ratios])."""
    for fn in (baseline, *candidates):  # warm-up: compilation, allocator pools
        fn()
        sync()
    base_times, ratios = [], [[] for _ in candidates]
    for _ in range(repeats):
        tb = _timed(baseline, sync)
        base_times.append(tb)
        for i, fn in enumerate(candidates):
            ratios[i].append(_timed(fn, sync) / tb)
    return statistics.median(base_times), [statistics.median(r) for r in ratios]


def setups(names, x_np):
    """(label, ops, input, copy function, sync, plain quantizers) for every backend
    variant asked for."""
    out = []
    for name in names:
        try:
            ops = kvquant.get_backend(name)
        except kvquant.BackendNotFoundError:
            continue
        for variant, v_ops in ops.variants().items():
            rt = v_ops.runtime
            x = rt.from_numpy(x_np)
            if name == "torch":
                import torch

                copy = x.clone
                sync = (lambda: torch.cuda.synchronize()) if x.is_cuda else (lambda: None)
            elif name == "jax":
                import jax
                import jax.numpy as jnp

                jcopy = jax.jit(jnp.copy)
                copy = lambda x=x: jcopy(x).block_until_ready()  # noqa: E731
                sync = lambda: None  # noqa: E731
            else:
                copy = x.copy
                sync = lambda: None  # noqa: E731
            out.append((f"{name}/{variant}", v_ops, x, copy, sync, plain_quantizers(name, variant)))
    return out


def plain_quantizers(name, variant):
    """plain_quantizers.py's functions for this backend, run as its variant runs."""
    table = QUANTIZERS[name]()
    if variant == "compile":
        import torch

        from kvquant.backends.torch.graphs import COMPILE_OPTIONS

        wrap = lambda fn: torch.compile(fn, **COMPILE_OPTIONS)  # noqa: E731
    elif variant == "jit":
        import jax

        wrap = jax.jit
    else:
        wrap = lambda fn: fn  # noqa: E731
    return {fmt: (wrap(q), wrap(dq)) for fmt, (q, dq) in table.items()}


def block(result):
    for leaf in (result if isinstance(result, tuple) else (result,)):
        if hasattr(leaf, "block_until_ready"):
            leaf.block_until_ready()
    return result


def run(names, tokens, head_dim, repeats, formats=FORMATS + V11_FORMATS):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((tokens, head_dim)).astype(np.float32)
    rows = []
    for label, ops, x, copy, sync, plain in setups(names, x_np):
        for fmt, kw in formats:
            quant = lambda: block(kvquant.quantize(x, fmt, backend=ops, **kw).codes)  # noqa: E731
            both = lambda: block(kvquant.dequantize(kvquant.quantize(x, fmt, backend=ops, **kw), "float32", backend=ops))  # noqa: E731
            candidates = [quant, both]
            if fmt in plain:
                plain_q, plain_dq = plain[fmt]
                candidates += [lambda: block(plain_q(x)), lambda: block(plain_dq(*plain_q(x)))]
            base, ratios = interleaved_ratios(copy, candidates, sync, repeats)
            ratios += [float("nan")] * (4 - len(ratios))
            name = fmt + (f"-g{kw['group_size']}" if "group_size" in kw else "")
            rows.append((label, name, base, *ratios))
    return rows


# MALLOC_TOP_PAD_: XLA allocates its outputs on its own worker threads, whose glibc
# arenas are separate 64 MiB heaps, and glibc unmaps such a heap as soon as it is wholly
# free whatever the trim threshold says, unless the top pad forbids it. Without the pad,
# some jax.jit processes page-faulted every 16 MiB output afresh (2,000 to 4,000 minor
# faults per call, 3 to 5 ms where others took 0.5): the "swings" of earlier runs.
_PINNED_ALLOCATOR = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 32),
    "MALLOC_TOP_PAD_": str(1 << 26),
}


def main():
    if "--no-pin-allocator" not in sys.argv and any(os.environ.get(k) != v for k, v in _PINNED_ALLOCATOR.items()):
        # glibc reads these once, at start-up: run again with them set.
        sys.exit(subprocess.call([sys.executable, *sys.argv], env={**os.environ, **_PINNED_ALLOCATOR}))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-pin-allocator", action="store_true", help="measure with glibc's default thresholds")
    parser.add_argument("--backend", action="append", default=[])
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--format", action="append", default=[],
                        help="only these formats (fp8, fp8_per_tensor, int8, int4, int2, int4_per_channel, int2_per_channel)")
    args = parser.parse_args()
    names = args.backend or ["numpy", "torch", "jax"]
    formats = [(f, kw) for f, kw in FORMATS + V11_FORMATS if not args.format or f in args.format]
    rows = run(names, args.tokens, args.head_dim, args.repeats, formats)
    pinned = "allocator pinned" if not args.no_pin_allocator else "default allocator"
    print(f"float32 [{args.tokens}, {args.head_dim}]; median of {args.repeats} per-repeat ratios to a copy timed in the same repeat; {pinned}")
    print("plain: the same formats written plainly in that framework (benchmarks/plain_quantizers.py), not bit-exact")
    print(f"{'backend':<16}{'format':<22}{'copy ms':>9}{'quantize':>10}{'quant+deq':>11}{'plain q':>10}{'plain q+dq':>12}")
    for label, fmt, base, rq, rb, pq, pb in rows:
        plain = f"{pq:>9.2f}x{pb:>11.2f}x" if pq == pq else f"{'-':>10}{'-':>12}"
        print(f"{label:<16}{fmt:<22}{base * 1e3:>9.3f}{rq:>9.2f}x{rb:>10.2f}x{plain}")


if __name__ == "__main__":
    main()
