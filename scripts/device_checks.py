"""The checks scripts/device_check.sh runs on a lent GPU besides the conformance suite,
each printing one line per result and failing (exit 1) on a wrong one:

    python scripts/device_checks.py generate --device cuda:0   # KvquantCache in generate
    python scripts/device_checks.py accuracy --device cuda:0   # attention's accuracy contract

``generate``: a tiny random Llama on the device, greedy generation with the cache as
the README makes it (kvquant's attention, compiled: torch.compile's kernels off the
CPU) against DynamicCache's tokens (INT8, residual 128: the window holds every token,
so the tokens must match), and against the dequantize-then-attend path for INT4 with a
short window. ``accuracy``: kvquant.attention over every format on the device, eager
and compiled, against the float64 reference (docs/attention.md's bound). On the CPU
(``--device cpu``) both run as they would there, for checking the script itself.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

BOUND = 2e-5  # tests/test_attention.py's, docs/attention.md's


def check_generate(device: str) -> bool:
    import transformers

    from kvquant.integrations.transformers import KvquantCache

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = transformers.LlamaForCausalLM(config).eval().to(device)
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(ids)

    def run(cache):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=24, min_new_tokens=24,
                                  do_sample=False)

    ok = True
    base = run(transformers.DynamicCache(config=model.config))
    same = run(KvquantCache(model.config, keys="int8", values="int8", residual=128))
    print(f"generate {device}: int8 r128 with kvquant attention equals DynamicCache: {torch.equal(base, same)}")
    ok &= torch.equal(base, same)
    fmt = dict(keys="int4", values="int4", residual=8, quantize_every=1)
    dequantized = run(KvquantCache(model.config, attention="dequantized", **fmt))
    codes = run(KvquantCache(model.config, **fmt))
    agree = float((dequantized == codes).float().mean())
    print(f"generate {device}: int4 r8, kvquant attention vs dequantize + SDPA, tokens agreeing: {agree:.3f}")
    ok &= agree >= 0.9  # attention is a sum, not bits: greedy ties may flip late tokens
    return ok


def check_accuracy(device: str) -> bool:
    import kvquant
    from kvquant.attention import History, attend, reference_attention

    formats = [("fp8", {}), ("int8", {}), ("int4", {"group_size": 64}), ("int2", {"group_size": 32}),
               ("int4_per_channel", {"group_size": 32}), ("int2_per_channel", {"group_size": 64}),
               ("fp8_per_tensor", {"scale": 0.05})]
    rng = np.random.default_rng(0)
    ok = True
    for fmt, kw in formats:
        k = rng.standard_normal((1, 2, 320, 64)).astype(np.float32)
        k[..., 3] *= 25
        v = rng.standard_normal((1, 2, 320, 64)).astype(np.float32)
        q = torch.from_numpy(rng.standard_normal((1, 6, 1, 64)).astype(np.float32)).to(device)
        tk, tv = torch.from_numpy(k).to(device), torch.from_numpy(v).to(device)
        keys = History(kvquant.quantize(tk[:, :, :256], fmt, **kw), tk[:, :, 256:])
        values = History(kvquant.quantize(tv[:, :, :256], fmt, **kw), tv[:, :, 256:])
        ref = reference_attention(q, keys, values)
        for compiled in (False, True):
            out = attend(q, keys, values, compiled=compiled).double().cpu().numpy()
            err = float(np.max(np.abs(out - ref))) / float(np.abs(v).max())
            good = err <= BOUND
            print(f"accuracy {device}: {fmt:<17} {'compiled' if compiled else 'eager':<8} max error / max|v| "
                  f"{err:.2e} (bound {BOUND:.0e}) {'ok' if good else 'FAIL'}")
            ok &= good
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=["generate", "accuracy"])
    parser.add_argument("--device", default="cuda:0")
    args = parser.parse_args()
    if args.device.startswith("cuda"):
        print(f"device: {torch.cuda.get_device_name(args.device)}")
    ok = check_generate(args.device) if args.check == "generate" else check_accuracy(args.device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
