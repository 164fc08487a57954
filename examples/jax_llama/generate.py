"""Greedy decoding of a Llama-architecture model (SmolLM2-135M, the offline GGUF weights
kvquant eval uses) in JAX, with one kvquant JaxLayerCache per layer, under jax.jit:

    HF_HUB_OFFLINE=1 python examples/jax_llama/generate.py --prompt 512 --new 64

The forward is kvquant.integrations.jax_llama (a small JAX forward of the Llama
architecture; kvquant eval --framework jax runs it too). The prefill compiles once,
each decode step once (one compile per new-token count); reported: tokens/s of the
decode steps for an unquantized cache (the same loop, ``keys=None, values=None``) and
for kvquant INT8 and INT4 caches, and how many greedy tokens agree with transformers'
own generate.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from kvquant.integrations.jax_llama import greedy, params_of


def load(model_path=None):
    """(params, config, tokenizer, torch model) from kvquant eval's default model."""
    from kvquant.evaluate import load_model

    lm, tok, _ = load_model(model_path)
    return (*params_of(lm), tok, lm)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    import torch

    params, config, tok, lm = load(args.model)
    text = " ".join(["The quick brown fox jumps over the lazy dog."] * 200)
    ids = tok(text, return_tensors="np")["input_ids"][:, :args.prompt]
    with torch.no_grad():
        want = lm.generate(torch.from_numpy(ids), max_new_tokens=args.new, do_sample=False,
                           attention_mask=torch.ones_like(torch.from_numpy(ids)))[0, ids.shape[1]:].tolist()
    print(f"{args.prompt}-token prompt, {args.new} new tokens, jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"{'cache':<34}{'decode tok/s':>13}{'ratio':>8}{'tokens = transformers':>24}")
    base = None
    for name, keys, values in (("unquantized (same loop)", None, None), ("kvquant int8", "int8", "int8"),
                               ("kvquant int4 g64", {"format": "int4", "group_size": 64},
                                {"format": "int4", "group_size": 64})):
        tokens, speed = greedy(params, config, jnp.asarray(ids), args.new, keys, values, progress=name)
        base = base or speed
        agree = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), len(tokens))
        print(f"{name:<34}{speed:>13.1f}{speed / base:>7.2f}x{f'first {agree} of {len(tokens)}':>24}")


if __name__ == "__main__":
    main()
