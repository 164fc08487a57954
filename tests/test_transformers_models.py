"""KvquantCache in models whose layers are not all full attention, built tiny with
random weights from transformers' own configs: sliding-window layers (Mistral, Qwen3
with a window, Gemma 3 interleaved, gpt-oss alternating, with attention sinks) and a
linear-attention hybrid (Qwen3-Next). Greedy tokens, stored bits, bounded memory and
the cache operations generate uses."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvquant  # noqa: E402
from conftest import assert_same_bits  # noqa: E402
from kvquant.integrations.transformers import KvquantCache, KvquantLayer  # noqa: E402

WINDOW = 16
COMMON = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
              head_dim=32, max_position_embeddings=1024)


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(**COMMON, num_hidden_layers=2,
                                                                      sliding_window=WINDOW))


def _qwen3():
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **COMMON, num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1))


def _gemma3():
    config = transformers.Gemma3TextConfig(**COMMON, num_hidden_layers=4, sliding_window=WINDOW,
                                           layer_types=["sliding_attention", "sliding_attention",
                                                        "full_attention", "sliding_attention"])
    return transformers.Gemma3ForCausalLM(config)


def _gpt_oss():
    config = transformers.GptOssConfig(**{**COMMON, "intermediate_size": 128}, num_hidden_layers=2,
                                       num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
                                       layer_types=["sliding_attention", "full_attention"])
    return transformers.GptOssForCausalLM(config)


def _qwen3_next():
    config = transformers.Qwen3NextConfig(
        **COMMON, num_hidden_layers=4, layer_types=["linear_attention", "full_attention"] * 2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=64, decoder_sparse_step=1)
    return transformers.Qwen3NextForCausalLM(config)


MODELS = {"mistral": _mistral, "qwen3": _qwen3, "gemma3": _gemma3, "gpt-oss": _gpt_oss, "qwen3-next": _qwen3_next}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return request.param, MODELS[request.param]().eval()


def prompt(batch=1, tokens=24):
    return torch.randint(3, 256, (batch, tokens), generator=torch.Generator().manual_seed(1))


def greedy(model, ids, cache, new):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new,
                              min_new_tokens=new, do_sample=False)


def kvquant_layers(cache):
    return [(i, layer) for i, layer in enumerate(cache.layers) if isinstance(layer, KvquantLayer)]


@pytest.mark.parametrize("attention, compiled", [("kvquant", True), ("kvquant", False), ("dequantized", None)],
                         ids=["kvquant-compiled", "kvquant-eager", "dequantized"])
def test_int8_with_the_window_in_full_precision_generates_dynamic_caches_tokens(model, attention, compiled):
    name, model = model
    ids = prompt()
    want = greedy(model, ids, transformers.DynamicCache(config=model.config), 40)
    cache = KvquantCache(model.config, keys="int8", values="int8", residual=64, attention=attention,
                         compiled=compiled)
    got = greedy(model, ids, cache, 40)
    assert torch.equal(want, got), f"{name}: tokens differ"
    kinds = {type(layer).__name__ for layer in cache.layers}
    if name == "qwen3-next":
        assert "LinearAttentionLayer" in kinds  # transformers' own layer, kept for linear attention
    sliding = [layer for _, layer in kvquant_layers(cache) if layer.is_sliding]
    assert bool(sliding) == (name != "qwen3-next")
    for layer in sliding:  # every token but the last generated seen; at most W - 1, 16 to forget and 1 new held
        assert layer.get_seq_length() == 24 + 40 - 1 and layer.kv.seq_length <= WINDOW - 1 + 16


def test_stored_bits_are_one_quantize_of_the_tokens_held(model):
    name, model = model
    cache = KvquantCache(model.config, keys="int8", values={"format": "int4", "group_size": 32}, residual=4,
                         quantize_every=1)
    handed = {}
    for i, layer in kvquant_layers(cache):
        original = layer.update

        def spy(k, v, *a, _i=i, _orig=original, **kw):
            keys, values = handed.setdefault(_i, ([], []))
            keys.append(k.clone())
            values.append(v.clone())
            return _orig(k, v, *a, **kw)

        layer.update = spy
    greedy(model, prompt(), cache, 30)
    for i, layer in kvquant_layers(cache):
        held = layer.kv.seq_length
        for side, fmt, kw in (("keys", "int8", {}), ("values", "int4", {"group_size": 32})):
            seen = torch.cat(handed[i][0 if side == "keys" else 1], dim=2).numpy()
            tokens = seen[:, :, seen.shape[2] - held:]  # the most recent tokens, all of them held
            q = layer.kv.quantized(side)
            ref = kvquant.quantize(tokens[:, :, :q.shape[2]], fmt, **kw)
            for part in ("codes", "scales", "zeros"):
                if getattr(ref, part) is not None:
                    assert_same_bits(getattr(ref, part), getattr(q, part).numpy(), f"{name} layer {i} {side} {part}")
            assert_same_bits(tokens[:, :, q.shape[2]:], layer.kv.window(side).numpy(), f"{name} layer {i} {side} window")


@pytest.mark.parametrize("keys", ["int8", {"format": "int4_per_channel", "group_size": 32}], ids=["int8", "kivi"])
def test_sliding_layers_stop_growing_past_the_window(model, keys):
    name, model = model
    sizes = {}
    for new in (40, 160):
        cache = KvquantCache(model.config, keys=keys, values={"format": "int4", "group_size": 32}, residual=8)
        greedy(model, prompt(), cache, new)
        sizes[new] = {i: layer.kv.nbytes for i, layer in kvquant_layers(cache)}
    for i, layer in kvquant_layers(cache):
        if layer.is_sliding:
            assert sizes[160][i] == sizes[40][i], f"{name} layer {i} grew past its window"
            # W - 1 kept, fewer than 32 waiting to be forgotten, a per-channel block's rest, 1 new
            assert layer.kv.seq_length <= WINDOW - 1 + 31 + 31 + 1
        else:
            assert sizes[160][i] > sizes[40][i]


def test_crop_reorder_and_batch_selection(model):
    name, model = model
    ids = prompt(batch=2, tokens=10)
    cache = KvquantCache(model.config, keys="int8", values="int8", residual=64)
    with torch.no_grad():
        model(ids, cache=cache)
    if name != "qwen3-next":  # transformers' linear-attention layers cannot crop a recurrent state
        cache.crop(-2)  # inside every window: allowed everywhere
        assert cache.get_seq_length() == 8
        ids = ids[:, :8]
    layers = kvquant_layers(cache)
    before = [layer.kv.window("keys").clone() for _, layer in layers]
    cache.reorder_cache(torch.tensor([1, 0]))
    for (_, layer), keys in zip(layers, before):
        assert torch.equal(layer.kv.window("keys"), keys[[1, 0]])
    if name == "qwen3-next":
        return  # transformers' linear-attention layers have no batch_select_indices
    cache.batch_select_indices(torch.tensor([1]))
    for (_, layer), keys in zip(layers, before):
        assert torch.equal(layer.kv.window("keys"), keys[[0]])
    greedy(model, ids[1:], cache, 30)  # past the window
    if any(layer.is_sliding for _, layer in layers):
        with pytest.raises(RuntimeError, match="sliding-window layer past its window"):
            cache.crop(-2)


def test_a_layer_type_kvquant_cannot_hold_is_refused():
    config = transformers.MistralConfig(**COMMON, num_hidden_layers=2)
    config.layer_types = ["full_attention", "hybrid"]
    with pytest.raises(ValueError, match=r"layer types \['hybrid'\] \(layers \[1\]\)"):
        KvquantCache(config)


def test_per_layer_type_policy():
    model = _gemma3()
    cache = KvquantCache(model.config, keys="int8", values="int8",
                         per_layer={"sliding_attention": {"keys": None, "values": None}, 3: {"keys": "fp8"}})
    formats = [(layer.kv.formats[0].format, layer.kv.formats[1].format) for layer in cache.layers]
    int8, fp8 = kvquant.Format.INT8, kvquant.Format.FP8_PER_TOKEN
    assert formats == [(None, None), (None, None), (int8, int8), (fp8, None)]
    assert np.asarray(greedy(model, prompt(), cache, 20)).shape == (1, 44)


def test_an_mla_model_is_refused_clearly():
    config = transformers.DeepseekV3Config(vocab_size=256, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
                                           kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
                                           v_head_dim=32)
    with pytest.raises(ValueError, match="does not hold MLA caches"):
        KvquantCache(config)


# ------------------------------------------------------------ encoder-decoder
ENCODER_DECODER = {
    "bart": lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128)),
    "whisper": lambda: transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=8, max_source_positions=32,
        max_target_positions=64, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1)),
    "t5": lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, decoder_start_token_id=0)),
}


def _encoder_decoder(name):
    torch.manual_seed(0)
    model = ENCODER_DECODER[name]().eval()
    inputs = (dict(input_features=torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1))) if name == "whisper"
              else dict(input_ids=torch.randint(4, 128, (1, 20), generator=torch.Generator().manual_seed(1))))
    return model, inputs


def _generate(model, inputs, cache=None):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=30, min_new_tokens=30, do_sample=False, num_beams=1,
                              **({"cache": cache} if cache is not None else {}))[0].tolist()


@pytest.mark.parametrize("name, attention", [("bart", "kvquant"), ("bart", "dequantized"), ("whisper", "kvquant"),
                                             ("whisper", "dequantized"), ("t5", "dequantized")])
def test_encoder_decoder_models_quantize_the_self_attention_cache(name, attention):
    """KvquantCache.encoder_decoder: the decoder's self-attention in kvquant (INT8, every
    token past a residual of 8 quantized), the cross-attention keys as transformers keeps
    them; greedy tokens equal the default cache's, and each self-attention layer's codes
    are one kvquant.quantize of the keys the model handed it."""
    model, inputs = _encoder_decoder(name)
    want = _generate(model, inputs)
    cache = KvquantCache.encoder_decoder(model.config, keys="int8", values="int8", residual=8, quantize_every=1,
                                         attention=attention)
    handed = {}
    for i, layer in kvquant_layers(cache.self_attention_cache):
        original = layer.update

        def spy(k, v, *a, _i=i, _orig=original, **kw):
            handed.setdefault(_i, []).append(k.clone())
            return _orig(k, v, *a, **kw)

        layer.update = spy
    assert _generate(model, inputs, cache) == want
    assert isinstance(cache.cross_attention_cache, transformers.DynamicCache)
    for i, layer in kvquant_layers(cache.self_attention_cache):
        q = layer.kv.quantized("keys")
        assert q is not None and q.shape[2] == layer.kv.seq_length - 8
        seen = torch.cat(handed[i], dim=2).numpy()
        assert_same_bits(kvquant.quantize(seen[:, :, :q.shape[2]], "int8").codes, q.codes.numpy(), f"{name} layer {i}")


def test_an_encoder_decoder_model_needs_the_encoder_decoder_cache():
    model, inputs = _encoder_decoder("bart")
    with pytest.raises(ValueError, match="KvquantCache.encoder_decoder"):
        KvquantCache(model.config)
    with pytest.raises(ValueError, match="not an encoder-decoder"):
        KvquantCache.encoder_decoder(transformers.LlamaConfig(**COMMON, num_hidden_layers=1))


def test_t5s_own_attention_is_named_and_the_dequantized_path_offered():
    """T5 adds its relative position bias in its own attention code, outside
    transformers' attention interface: kvquant's attention cannot serve it, and the
    cache says so (on the step after the first, when the codes went unread)."""
    model, inputs = _encoder_decoder("t5")
    cache = KvquantCache.encoder_decoder(model.config, keys="int8", values="int8", residual=8)
    with pytest.raises(RuntimeError, match="attention='dequantized'"):
        _generate(model, inputs, cache)


def test_gemma3n_shared_kv_layers_read_their_owners_kvquant_layer():
    """Gemma 3n's last layers reuse the keys and values of an earlier layer of their type
    (kv_sharing_modes 'reuse'): they keep transformers' placeholder layer, their owners
    are kvquant layers, and the consumers attend to the owners' whole history (the
    dequantized path, since the owner's codes are read twice per step)."""
    torch.manual_seed(0)
    config = transformers.Gemma3nTextConfig(
        vocab_size=256, vocab_size_per_layer_input=256, hidden_size=64, hidden_size_per_layer_input=16,
        intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        num_kv_shared_layers=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        laurel_rank=8, altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4)
    model = transformers.Gemma3nForCausalLM(config).eval()
    assert list(model.config.kv_sharing_modes) == ["store", "store", "reuse", "reuse"]
    ids = prompt()
    want = greedy(model, ids, transformers.DynamicCache(config=model.config), 30).tolist()
    cache = KvquantCache(model.config, keys="int8", values="int8", residual=64)
    assert greedy(model, ids, cache, 30).tolist() == want
    assert [type(layer).__name__ for layer in cache.layers] == ["KvquantLayer", "KvquantLayer", "DummyLayer", "DummyLayer"]
    quantized = KvquantCache(model.config, keys="int8", values="int8", residual=4, quantize_every=1)
    greedy(model, ids, quantized, 30)
    for i, layer in kvquant_layers(quantized):
        assert layer.kv.quantized("keys").shape[2] > 0, i
