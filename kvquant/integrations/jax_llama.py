"""A Llama-architecture forward in JAX over kvquant's JaxLayerCache, for ``kvquant eval
--framework jax`` and examples/jax_llama/generate.py.

No maintained JAX model library loads the offline GGUF weights here (keras-hub and
Flax's model code are not installed), so this is a small forward written for kvquant:
RMSNorm, rotary embeddings (rotate-half), grouped-query attention over the cache
(kvquant.attention.attend), a SwiGLU MLP. The weights come from a transformers model
(which reads the GGUF), moved to jax arrays. Under jax.jit one compile per token count
(the prefill, the decode step, a chunk) and cache configuration.
"""
from __future__ import annotations

import functools
from typing import Any, List, Optional

import jax
import jax.numpy as jnp

from ..attention import attend
from ..cache import JaxLayerCache

LLAMA_WEIGHTS = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def params_of(lm):
    """(params, config) of a transformers Llama-architecture model, as jax float32 arrays.
    A model of another architecture, or with options this forward does not implement
    (attention or MLP biases, rope scaling), is refused."""
    c = lm.config
    if getattr(c, "model_type", None) != "llama":
        raise ValueError(f"the JAX forward implements the Llama architecture; this model is {c.model_type!r}")
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False) or rope.get("rope_type", "default") != "default":
        raise ValueError("the JAX forward implements plain Llama layers: no attention or MLP bias, default rotary")
    sd = {k: jnp.asarray(v.detach().float().numpy()) for k, v in lm.state_dict().items()}
    layers = [{name: sd[f"model.layers.{i}.{name}.weight"] for name in LLAMA_WEIGHTS}
              for i in range(c.num_hidden_layers)]
    params = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"], "layers": layers,
              "lm_head": sd.get("lm_head.weight", sd["model.embed_tokens.weight"])}
    config = dict(heads=c.num_attention_heads, kv_heads=c.num_key_value_heads,
                  head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                  eps=c.rms_norm_eps,
                  theta=getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"])
    return params, config


def create_caches(params, config, capacity: int, keys: Any, values: Any, residual: int = 128) -> List[JaxLayerCache]:
    """One JaxLayerCache per layer (batch 1); ``keys=None, values=None``: unquantized."""
    return [JaxLayerCache.create(1, config["kv_heads"], config["head_dim"], capacity, keys=keys, values=values,
                                 residual=residual, layer=i) for i in range(len(params["layers"]))]


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


def causal_over_slots(cache: JaxLayerCache, n: int, start):
    """[1, 1, n, slots] additive mask: query i (position start + i) sees the slots
    holding positions up to its own (cache.positions(): -1 for an empty slot); slots
    are not in token order."""
    position = cache.positions()
    query = start + jnp.arange(n)
    seen = (position[None, :] >= 0) & (position[None, :] <= query[:, None])
    return jnp.where(seen, 0.0, -jnp.inf)[None, None]


def forward(params, caches, ids, start, config, every_position: bool = False):
    """(logits, updated caches) for ids [1, n] at positions start..start + n - 1: the
    last token's logits [1, vocab], or every token's [1, n, vocab] (every_position)."""
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
        out = attend(q, keys, values, mask=causal_over_slots(cache, n, start), causal=False)
        x = x + out.transpose(0, 2, 1, 3).reshape(1, n, -1) @ p["self_attn.o_proj"].T
        h = rms_norm(x, p["post_attention_layernorm"], config["eps"])
        x = x + (jax.nn.silu(h @ p["mlp.gate_proj"].T) * (h @ p["mlp.up_proj"].T)) @ p["mlp.down_proj"].T
        new_caches.append(cache)
    x = rms_norm(x if every_position else x[:, -1], params["norm"], config["eps"])
    return x @ params["lm_head"].T, new_caches


@functools.lru_cache(maxsize=None)
def compiled_forward(every_position: bool, config_items: tuple):
    """forward under jax.jit for one config (its items, hashable); jit compiles once per
    token count and cache structure."""
    return jax.jit(functools.partial(forward, config=dict(config_items), every_position=every_position))


def step_function(config, every_position: bool = False):
    return compiled_forward(every_position, tuple(sorted(config.items())))


def greedy(params, config, prompt, new: int, keys: Any, values: Any, residual: int = 128,
           progress: Optional[str] = None):
    """(greedy tokens, decode tokens/s after the first step) for prompt [1, n]."""
    import time

    from tqdm import tqdm

    capacity = -(-(prompt.shape[1] + new) // 64) * 64 + 64
    caches = create_caches(params, config, capacity, keys, values, residual)
    step = step_function(config)
    logits, caches = step(params, caches, prompt, jnp.int32(0))
    tokens = [int(jnp.argmax(logits[0]))]
    first = time.perf_counter()
    for i in (range(new - 1) if progress is None else tqdm(range(new - 1), desc=progress, unit="token")):
        if i == 1:
            first = time.perf_counter()  # the first decode step compiles
        logits, caches = step(params, caches, jnp.asarray([[tokens[-1]]]), jnp.int32(prompt.shape[1] + i))
        tokens.append(int(jnp.argmax(logits[0])))
    seconds = time.perf_counter() - first
    return tokens, (new - 2) / seconds if new > 2 else float("nan")
