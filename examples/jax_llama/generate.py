"""Greedy decoding of a Llama-architecture model (SmolLM2-135M, the offline GGUF weights
kvquant eval uses) in JAX, with one kvquant JaxLayerCache per layer, under jax.jit:

    HF_HUB_OFFLINE=1 python examples/jax_llama/generate.py --prompt 512 --new 64

No maintained JAX model library here loads the GGUF offline (keras-hub and Flax's model
code are not installed), so this is a small forward of the Llama architecture written
for the example: RMSNorm, rotary embeddings, grouped-query attention over the cache
(kvquant.attention.attend), a SwiGLU MLP. The weights come from transformers (which
reads the GGUF), moved to jax arrays. The prefill compiles once, each decode step once
(one compile per new-token count); reported: tokens/s of the decode steps for an
unquantized cache (the same loop, ``keys=None, values=None``) and for kvquant INT8 and
INT4 caches, and how many greedy tokens agree with transformers' own generate.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from kvquant.attention import attend
from kvquant.cache import JaxLayerCache


def load(model_path=None):
    """(params, config, tokenizer, torch model) from kvquant eval's default model."""
    from kvquant.evaluate import load_model

    lm, tok, _ = load_model(model_path)
    return (*params_of(lm), tok, lm)


def params_of(lm):
    """(params, config) of a transformers Llama-architecture model, as jax arrays."""
    sd = {k: jnp.asarray(v.detach().float().numpy()) for k, v in lm.state_dict().items()}
    c = lm.config
    layers = [{name: sd[f"model.layers.{i}.{name}.weight"] for name in (
        "input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        for i in range(c.num_hidden_layers)]
    params = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"], "layers": layers,
              "lm_head": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    config = dict(heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                  head_dim=c.hidden_size // c.num_attention_heads, eps=c.rms_norm_eps,
                  theta=getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    return params, config


def rms_norm(x, w, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotary(x, positions, theta):
    """Llama's rotate-half rotary embedding on [batch, heads, tokens, head_dim]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions[:, None].astype(jnp.float32) * inv[None, :]
    cos, sin = jnp.cos(jnp.concatenate([angles] * 2, -1)), jnp.sin(jnp.concatenate([angles] * 2, -1))
    half = jnp.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
    return x * cos + half * sin


def forward(params, caches, ids, start, config):
    """Logits of the last token and the updated caches; ids [1, n], start: their first position."""
    n = ids.shape[1]
    positions = start + jnp.arange(n)
    x = params["embed"][ids]
    new_caches = []
    for p, cache in zip(params["layers"], caches):
        h = rms_norm(x, p["input_layernorm"], config["eps"])
        q = (h @ p["self_attn.q_proj"].T).reshape(1, n, config["heads"], -1).transpose(0, 2, 1, 3)
        k = (h @ p["self_attn.k_proj"].T).reshape(1, n, config["kv_heads"], -1).transpose(0, 2, 1, 3)
        v = (h @ p["self_attn.v_proj"].T).reshape(1, n, config["kv_heads"], -1).transpose(0, 2, 1, 3)
        q, k = rotary(q, positions, config["theta"]), rotary(k, positions, config["theta"])
        cache, *_ = cache.append(k, v)
        keys, values, _ = cache.attention_inputs()
        # Slots are not in token order: causality from each slot's token position.
        mask = _causal_over_slots(cache, n, start)
        out = attend(q, keys, values, mask=mask, causal=False)
        x = x + out.transpose(0, 2, 1, 3).reshape(1, n, -1) @ p["self_attn.o_proj"].T
        h = rms_norm(x, p["post_attention_layernorm"], config["eps"])
        x = x + (jax.nn.silu(h @ p["mlp.gate_proj"].T) * (h @ p["mlp.up_proj"].T)) @ p["mlp.down_proj"].T
        new_caches.append(cache)
    x = rms_norm(x[:, -1], params["norm"], config["eps"])
    return x @ params["lm_head"].T, new_caches


def _causal_over_slots(cache, n, start):
    """[1, 1, n, slots] additive mask: query i (position start + i) sees the slots
    holding positions up to its own (cache.positions(): -1 for an empty slot)."""
    position = cache.positions()
    query = start + jnp.arange(n)
    seen = (position[None, :] >= 0) & (position[None, :] <= query[:, None])
    return jnp.where(seen, 0.0, -jnp.inf)[None, None]


def greedy(params, config, prompt, new, keys, values, residual=128, progress=None):
    layers = len(params["layers"])
    capacity = -(-(prompt.shape[1] + new) // 64) * 64 + 64
    caches = [JaxLayerCache.create(1, config["kv_heads"], config["head_dim"], capacity, keys=keys, values=values,
                                   residual=residual, layer=i) for i in range(layers)]
    step = jax.jit(functools.partial(forward, config=config))
    logits, caches = step(params, caches, prompt, jnp.int32(0))
    tokens = [int(jnp.argmax(logits[0]))]
    first = time.perf_counter()
    for i in (range(new - 1) if progress is None else tqdm(range(new - 1), desc=progress, unit="token")):
        if i == 1:
            first = time.perf_counter()  # the first decode step compiles
        logits, caches = step(params, caches, jnp.asarray([[tokens[-1]]]), jnp.int32(prompt.shape[1] + i))
        tokens.append(int(jnp.argmax(logits[0])))
    seconds = time.perf_counter() - first
    return tokens, (new - 2) / seconds


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
