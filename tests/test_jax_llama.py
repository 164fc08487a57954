"""kvquant.integrations.jax_llama (examples/jax_llama/generate.py, kvquant eval
--framework jax), the JAX generation loop over JaxLayerCaches, on a
tiny random-weight Llama: its greedy tokens equal transformers' with an unquantized
cache and with INT8 (the prompt inside the residual window), and, with KIVI keys
quantized (residual 8), those of transformers with a KvquantCache of the same
formats (the same stored bits; attention sums in another order)."""
import pytest

jax = pytest.importorskip("jax")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kvquant.integrations import jax_llama  # noqa: E402


@pytest.mark.parametrize("keys, values, residual", [(None, None, 64), ("int8", "int8", 64),
                                                    ({"format": "int4_per_channel", "group_size": 32}, None, 8)],
                         ids=["unquantized", "int8", "kivi-keys-r8"])
def test_the_jax_loop_generates_transformers_tokens(keys, values, residual):
    from kvquant.integrations.transformers import KvquantCache

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=False)
    lm = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(1))
    cache = KvquantCache(config, keys=keys, values=values, residual=residual, quantize_every=1) if residual < 40 \
        else transformers.DynamicCache(config=config)
    with torch.no_grad():
        want = lm.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids),
                           cache=cache)[0, 40:].tolist()
    params, cfg = jax_llama.params_of(lm)
    got, _ = jax_llama.greedy(params, cfg, jax.numpy.asarray(ids.numpy()), 12, keys, values, residual=residual)
    assert got == want


def test_a_model_the_forward_does_not_implement_is_refused():
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="Llama architecture"):
        jax_llama.params_of(transformers.Qwen2ForCausalLM(config))
    biased = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, attention_bias=True)
    with pytest.raises(ValueError, match="no attention or MLP bias"):
        jax_llama.params_of(transformers.LlamaForCausalLM(biased))
