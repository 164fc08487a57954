"""kvquant eval's method on a tiny random Llama (the real-model run is in docs/quality.md,
out of CI): the unquantized model scores itself perfectly, a cache that quantizes
nothing matches it exactly, a 4-bit cache does not, and the measured cache bytes are
the formula's."""
import json
import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvquant.evaluate import Config, evaluate, markdown_table, plot  # noqa: E402


class ByteTokenizer:
    def __call__(self, text, return_tensors="pt"):
        return types.SimpleNamespace(input_ids=torch.tensor([[b % 128 for b in text.encode()]]))


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    lm = transformers.LlamaForCausalLM(config).eval()
    configs = [Config("int8 r1000", "int8", "int8", 1000), Config("int8 r0", "int8", "int8", 0),
               Config("int4-g64 r0", "int4", "int4", 0), Config("fp8_per_tensor r0", "fp8_per_tensor", "fp8_per_tensor", 0)]
    text = "The quick brown fox jumps over the lazy dog. " * 20
    return evaluate(text=text, windows=2, prefill=24, chunk=8, scored=40, configs=configs, progress=False,
                    loaded=(lm, ByteTokenizer(), "tiny-llama"))


def by_name(report):
    return {r["name"]: r for r in report["results"]}


def test_baseline_and_a_cache_that_quantizes_nothing_are_exact(report):
    rows = by_name(report)
    base = rows["unquantized (DynamicCache)"]
    assert base["kl"] == 0 and base["top1"] == 1 and base["scored_tokens"] == 80
    same = rows["int8 r1000"]  # residual longer than the text: nothing is quantized
    assert same["kl"] == 0 and same["top1"] == 1 and same["perplexity"] == base["perplexity"]


def test_quantized_caches_cost_something(report):
    rows = by_name(report)
    assert rows["int4-g64 r0"]["kl"] > rows["int8 r0"]["kl"] > 0


def test_bits_and_measured_bytes_follow_the_formula(report):
    rows = by_name(report)
    assert rows["int8 r0"]["bits_per_element"] == 8 + 32 / 64
    assert rows["int4-g64 r0"]["bits_per_element"] == 4 + 64 / 64
    # one KV head of 64: int8 keys and values hold 64 code bytes + a 4-byte scale each
    assert rows["int8 r0"]["cache_bytes_per_token_per_layer"] == 2 * (64 + 4)
    assert rows["int4-g64 r0"]["cache_bytes_per_token_per_layer"] == 2 * (32 + 8)
    assert rows["fp8_per_tensor r0"]["cache_bytes_per_token_per_layer"] == 2 * 64


def test_outputs_table_json_and_plot(report, tmp_path):
    table = markdown_table(report)
    assert table.count("\n") == 1 + len(report["results"]) and "int4-g64 r0" in table
    json.dumps(report)
    plot(report, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_quanto_peer_runs_on_the_same_tokens():
    """HF's QuantizedCache with optimum-quanto, where installed (CI has no quanto: the
    real-model rows are in docs/quality.md): scored on the same tokens, its bits per
    element measured from what it holds (4-bit codes, a float32 scale and shift per
    group of 64: 5 bits), and a short window that quanto never flushed costs nothing."""
    pytest.importorskip("optimum.quanto")
    from kvquant.evaluate import PEER_CONFIGS

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    lm = transformers.LlamaForCausalLM(config).eval()
    text = "The quick brown fox jumps over the lazy dog. " * 20
    report = evaluate(text=text, windows=1, prefill=160, chunk=8, scored=80, configs=[PEER_CONFIGS[0]], progress=False,
                      loaded=(lm, ByteTokenizer(), "tiny-llama"))
    peer = by_name(report)[PEER_CONFIGS[0].name]
    assert peer["peer"] and peer["scored_tokens"] == 80
    assert peer["bits_per_element"] == 4 + 64 / 64
    assert peer["kl"] > 0  # the 160-token prefill passed quanto's 128-token residual
    assert "run on the same tokens" in report["peers"]


def test_hf_fp8_peer_runs_on_the_same_tokens():
    """HF's QuantizedCache(backend="fp8") needs nothing beyond transformers: it runs as a
    peer row, its bits per element measured from what it holds (e4m3 codes, one scale
    per tensor), and it is not exact."""
    from kvquant.evaluate import PEER_CONFIGS, default_configs

    (fp8,) = [c for c in PEER_CONFIGS if c.peer_backend == "fp8"]
    assert fp8 in default_configs(quick=True)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    lm = transformers.LlamaForCausalLM(config).eval()
    text = "The quick brown fox jumps over the lazy dog. " * 20
    report = evaluate(text=text, windows=1, prefill=64, chunk=8, scored=40, configs=[fp8], progress=False,
                      loaded=(lm, ByteTokenizer(), "tiny-llama"))
    peer = by_name(report)[fp8.name]
    assert peer["peer"] and peer["scored_tokens"] == 40
    assert 8 < peer["bits_per_element"] < 8.01  # one float32 scale per layer and side on top of the codes
    assert peer["kl"] > 0


@pytest.fixture(scope="module")
def jax_and_torch_reports():
    pytest.importorskip("jax")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    lm = transformers.LlamaForCausalLM(config).eval()
    configs = [Config("int8 r1000", "int8", "int8", 1000), Config("int8 r0", "int8", "int8", 0),
               Config("int4-g64 r0", "int4", "int4", 0),
               Config("kivi-4 r16", {"format": "int4_per_channel", "group_size": 32},
                      {"format": "int4", "group_size": 32}, 16)]
    text = "The quick brown fox jumps over the lazy dog. " * 20
    run = dict(text=text, windows=2, prefill=24, chunk=8, scored=40, configs=configs, progress=False,
               loaded=(lm, ByteTokenizer(), "tiny-llama"))
    return evaluate(framework="jax", **run), evaluate(**run)


def test_jax_rows_run_the_same_model_and_tokens(jax_and_torch_reports):
    """kvquant eval --framework jax: the JAX forward of the same weights scores the same
    tokens as transformers (perplexity to float32 rounding: another framework's sums),
    its unquantized row scores itself exactly, and quantizing costs something."""
    jax_report, torch_report = jax_and_torch_reports
    assert jax_report["framework"] == "jax" and "jax_llama" in jax_report["peers"]
    rows, torch_rows = by_name(jax_report), by_name(torch_report)
    base = rows["unquantized (JaxLayerCache, no quantization)"]
    assert base["kl"] == 0 and base["top1"] == 1 and base["scored_tokens"] == 80
    assert base["perplexity"] == pytest.approx(torch_rows["unquantized (DynamicCache)"]["perplexity"], rel=1e-5)
    # Nothing quantized (residual past the text): the same values, but the attention's
    # sums split at other token ranges (the empty quantized slots come first), so logits
    # differ by rounding (3e-7 here), which a float32 KL reads as about 1e-8, not 0.
    assert rows["int8 r1000"]["top1"] == 1 and rows["int8 r1000"]["kl"] < 1e-6
    assert rows["int4-g64 r0"]["kl"] > rows["int8 r0"]["kl"] > 0
    for name in ("int8 r0", "int4-g64 r0", "kivi-4 r16"):
        assert rows[name]["kl"] > 0 and rows[name]["scored_tokens"] == 80, name
        assert rows[name]["bits_per_element"] == torch_rows[name]["bits_per_element"]
        assert rows[name]["tokens_per_second"] > 0


def test_eval_refuses_an_unknown_framework():
    with pytest.raises(ValueError, match="framework must be"):
        evaluate(framework="tensorflow", loaded=(None, None, "x"))
