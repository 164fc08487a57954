"""One rank of a tensor-parallel run (started by torch.distributed.run with 2 processes,
gloo on the CPU): a saved tiny Llama loaded with transformers' ``tp_plan="auto"``,
greedy generation through KvquantCache with kvquant's attention. Writes
<out>/rank<r>.json: the tokens, each layer's stored codes and window, the keys and
values the model handed each layer, and how often kvquant's attention ran.

    python -m torch.distributed.run --standalone --nproc_per_node 2 torch_tp_check.py MODEL_DIR OUT_DIR
"""
import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import transformers

from kvquant.backends.torch import attention as torch_attention
from kvquant.integrations.transformers import KvquantCache

# (name, KvquantCache options): INT8 with the tokens in the window, as issue 35 asks,
# and INT4 with every token quantized, so that stored codes are compared too.
CACHES = [("int8-residual128", dict(keys="int8", values="int8", residual=128)),
          ("int4-residual0", dict(keys={"format": "int4", "group_size": 32}, values="int8", residual=0,
                                  quantize_every=1))]
NEW_TOKENS = 12


def prompt():
    return torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))


def record_updates(cache):
    """Every key and value tensor the model hands each layer, as local plain tensors."""
    seen = [([], []) for _ in cache.layers]
    for i, layer in enumerate(cache.layers):
        original = layer.update

        def spy(k, v, *a, _i=i, _orig=original, **kw):
            seen[_i][0].append((type(k).__name__, k.clone()))
            seen[_i][1].append((type(v).__name__, v.clone()))
            return _orig(k, v, *a, **kw)

        layer.update = spy
    return seen


def as_list(t):
    return None if t is None else t.tolist()


def generate_with_each_cache(model) -> dict:
    """{cache name: tokens, per-layer record, kvquant attention calls} for ``model``,
    with or without tensor parallelism (the test runs it on one process too)."""
    calls = {"n": 0}
    original_attend, original_decode = torch_attention.attend, torch_attention.KernelCall.decode

    def counting_attend(*args, **kw):
        calls["n"] += 1
        return original_attend(*args, **kw)

    def counting_decode(*args, **kw):  # the decode lane: a step like the layer's last, on its kept kernel call
        out = original_decode(*args, **kw)
        calls["n"] += out is not None
        return out

    torch_attention.attend, torch_attention.KernelCall.decode = counting_attend, counting_decode
    try:
        report = {}
        for name, options in CACHES:
            calls["n"] = 0
            cache = KvquantCache(model.config, **options)
            seen = record_updates(cache)
            with torch.no_grad():
                tokens = model.generate(prompt(), cache=cache, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                        do_sample=False)
            layers = []
            for layer, (keys, values) in zip(cache.layers, seen):
                q = layer.kv.quantized("keys")
                layers.append({
                    "handed_types": sorted({t for t, _ in keys + values}),
                    "keys_handed": [as_list(k) for _, k in keys], "values_handed": [as_list(v) for _, v in values],
                    "stored_key_codes": None if q is None else as_list(q.codes.contiguous().view(torch.uint8)),
                    "stored_key_scales": None if q is None else as_list(q.scales.contiguous().view(torch.int32)),
                    "stored_key_zeros": None if q is None else as_list(q.zeros.contiguous().view(torch.int32)),
                    "kv_heads_held": layer.kv.signature[4],
                })
            report[name] = {"tokens": tokens.tolist(), "layers": layers, "kvquant_attention_calls": calls["n"]}
        return report
    finally:
        torch_attention.attend, torch_attention.KernelCall.decode = original_attend, original_decode


def main(model_dir: str, out_dir: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tp_plan= moves to DistributedConfig later
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, tp_plan="auto", dtype=torch.float32)
    model.eval()
    report = {"rank": dist.get_rank(), "world": dist.get_world_size(),
              "k_proj_weight": type(model.model.layers[0].self_attn.k_proj.weight).__name__,
              "caches": generate_with_each_cache(model)}
    with open(os.path.join(out_dir, f"rank{report['rank']}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
