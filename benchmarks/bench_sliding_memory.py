"""Cache bytes against sequence length for a sliding-window model: a random-weight Gemma 3
built from transformers' config (8 layers: 5 sliding of window 1024, 1 global, 2
sliding, Gemma 3's pattern; 4 KV heads of 256), fed a prompt in chunks of 512 tokens
up to 16,384, with DynamicCache and with KvquantCache INT4 (g64 keys and values,
residual 128). Writes docs/sliding-memory.png and a JSON of the points.

    python benchmarks/bench_sliding_memory.py

Not a test: the bytes are the caches' arrays, read after each chunk (DynamicCache: its
keys and values tensors; KvquantCache: every buffer, spare capacity included).
"""
import argparse
import json
import os

import torch
import transformers
from tqdm import tqdm

from kvquant.integrations.transformers import KvquantCache

HERE = os.path.dirname(os.path.abspath(__file__))


def dynamic_bytes(cache, sliding_only=False) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None and (layer.is_sliding or not sliding_only))


def kvquant_bytes(cache, sliding_only=False) -> int:
    return sum(layer.kv.nbytes for layer in cache.layers if layer.is_sliding or not sliding_only)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--out", default=os.path.join(HERE, "..", "docs", "sliding-memory.png"))
    parser.add_argument("--json", default=os.path.join(HERE, "results", "sliding-memory.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, sliding_window=1024, max_position_embeddings=args.tokens + 1,
        layer_types=(["sliding_attention"] * 5 + ["full_attention"]) + ["sliding_attention"] * 2)
    model = transformers.Gemma3ForCausalLM(config).eval()
    ids = torch.randint(3, 512, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    caches = {"DynamicCache (float32)": (transformers.DynamicCache(config=config), dynamic_bytes),
              "KvquantCache INT4 g64, residual 128": (
                  KvquantCache(config, keys={"format": "int4", "group_size": 64},
                               values={"format": "int4", "group_size": 64}, residual=128), kvquant_bytes)}
    points = {name: [] for name in caches}
    sliding = {name: [] for name in caches}
    with torch.no_grad():
        for start in tqdm(range(0, args.tokens, args.chunk), desc="chunks", unit="chunk"):
            for name, (cache, size) in caches.items():
                model(ids[:, start:start + args.chunk], cache=cache)
                points[name].append((start + args.chunk, size(cache)))
                sliding[name].append((start + args.chunk, size(cache, sliding_only=True)))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"config": "Gemma 3 text, random weights, 4 KV heads of 256, sliding window 1024",
                   "layer_types": config.layer_types, "points": points, "sliding_layers": sliding}, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, data, title in ((axes[0], points, "every layer"), (axes[1], sliding, "the 7 sliding layers (window 1024)")):
        for name, pts in data.items():
            ax.plot([t for t, _ in pts], [b / 2**20 for _, b in pts], marker=".", label=name)
        ax.set_xlabel("tokens seen")
        ax.set_ylabel("cache MiB")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0].legend()
    fig.suptitle("Gemma 3's layer pattern (7 sliding, 1 global), random weights, 4 KV heads of 256")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    for name, pts in points.items():
        print(f"{name}: {pts[len(pts) // 4][1] / 2**20:.1f} MiB at {pts[len(pts) // 4][0]} tokens, "
              f"{pts[-1][1] / 2**20:.1f} MiB at {pts[-1][0]}; sliding layers "
              f"{sliding[name][len(pts) // 4][1] / 2**20:.1f} and {sliding[name][-1][1] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
