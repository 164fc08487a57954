"""kvquant's cache inside HF transformers, offline, on a tiny random Llama built from a
config: generate and a manual loop work, the stored bits are kvquant.quantize of what
the model produced, and a 4-bit cache with no residual really is on the path."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import kvquant  # noqa: E402
from conftest import assert_same_bits  # noqa: E402
from kvquant.integrations.transformers import KvquantCache  # noqa: E402


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      max_position_embeddings=512)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def prompt():
    return torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(1))


def greedy(model, prompt, cache, new=16):
    with torch.no_grad():
        return model.generate(prompt, cache=cache, max_new_tokens=new, do_sample=False, min_new_tokens=new)


def record_updates(cache):
    """{layer: ([keys], [values])}: every key and value tensor the model hands each layer."""
    seen = {i: ([], []) for i in range(len(cache.layers))}
    for i, layer in enumerate(cache.layers):
        original = layer.update

        def spy(k, v, *a, _i=i, _orig=original, **kw):
            seen[_i][0].append(k.clone())
            seen[_i][1].append(v.clone())
            return _orig(k, v, *a, **kw)

        layer.update = spy
    return seen


def test_int8_with_residual_128_generates_the_unquantized_tokens(model, prompt):
    baseline = greedy(model, prompt, transformers.DynamicCache(config=model.config))
    ours = greedy(model, prompt, KvquantCache(model.config, keys="int8", values="int8", residual=128))
    assert torch.equal(baseline, ours)


def test_int4_without_residual_is_on_the_path(model, prompt):
    with torch.no_grad():
        base = model(prompt, cache=transformers.DynamicCache(config=model.config)).logits
        quant = model(prompt, cache=KvquantCache(model.config, keys="int4", values="int4", residual=0, quantize_every=1)).logits
    assert not torch.equal(base, quant)
    assert (base - quant).abs().max() < 1.0  # quantization noise, not garbage


def test_stored_bits_are_kvquant_quantize_of_what_the_model_produced(model, prompt):
    cache = KvquantCache(model.config, keys="int4", values={"format": "int8"}, residual=5, quantize_every=1)
    seen = record_updates(cache)
    greedy(model, prompt, cache, new=6)
    total = prompt.shape[1] + 5  # the last generated token is never fed back
    assert cache.get_seq_length() == total
    for i, kv in enumerate(cache.layer_caches()):
        keys, values = (torch.cat(parts, dim=2) for parts in seen[i])
        quantized = total - 5
        for side, x, fmt in (("keys", keys, "int4"), ("values", values, "int8")):
            want = kvquant.quantize(x[:, :, :quantized], fmt, on_nonfinite="propagate")
            got = kv.quantized(side)
            for a, b in zip((want.codes, want.scales, want.zeros), (got.codes, got.scales, got.zeros)):
                if a is not None:
                    assert_same_bits(a.numpy(), b.numpy(), f"layer {i} {side}")
            assert_same_bits(x[:, :, quantized:].numpy(), kv.window(side).numpy(), f"layer {i} {side} window")


def test_manual_forward_loop(model, prompt):
    cache = KvquantCache(model.config, keys="fp8", values="int8", residual=8)
    ids = prompt
    with torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        for _ in range(5):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, cache=cache, use_cache=True)
    assert cache.get_seq_length() == prompt.shape[1] + 5
    assert cache.nbytes == sum(c.nbytes for c in cache.layer_caches()) > 0


def test_per_layer_formats_and_a_cache_without_config(model, prompt):
    cache = KvquantCache(keys="int4", values="int4", residual=0, per_layer={0: {"keys": None, "values": "int8"}}, quantize_every=1)
    with torch.no_grad():
        model(prompt, cache=cache)
    first, second = cache.layer_caches()
    assert first.quantized("keys") is None and first.quantized("values").format is kvquant.Format.INT8
    assert second.quantized("keys").format is kvquant.Format.INT4


def test_beam_search_reorders_the_cache(model, prompt):
    cache = KvquantCache(model.config, keys="int8", values="int8", residual=4, quantize_every=1)
    with torch.no_grad():
        out = model.generate(prompt, cache=cache, max_new_tokens=6, num_beams=3, do_sample=False)
    assert out.shape == (1, prompt.shape[1] + 6)


def test_crop_inside_the_window_only(model, prompt):
    cache = KvquantCache(model.config, residual=10, quantize_every=1)
    with torch.no_grad():
        model(prompt, cache=cache)
    cache.crop(-3)  # transformers' convention: a negative count of tokens to remove
    assert cache.get_seq_length() == prompt.shape[1] - 3
    with pytest.raises(ValueError, match="residual window only"):
        cache.crop(-15)


def test_import_kvquant_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, kvquant; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_batch_repeat_interleave_and_select(model, prompt):
    cache = KvquantCache(model.config, keys="int8", values="int8", residual=4, quantize_every=1)
    with torch.no_grad():
        model(prompt.repeat(2, 1), cache=cache)
    layer = cache.layers[0]
    before = layer.kv.quantized("keys").codes.clone()
    cache.batch_repeat_interleave(2)
    assert layer.kv.batch_size == 4
    assert torch.equal(layer.kv.quantized("keys").codes, before.repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert layer.kv.batch_size == 2 and torch.equal(layer.kv.quantized("keys").codes, before)


def test_kivi_cache_keys_per_channel_stored_in_whole_blocks(model, prompt):
    """Spec v1.1 in generate: keys per channel (blocks of 32 tokens leave the window
    whole), INT2 values per token; the stored bits are kvquant.quantize of the keys and
    values the model produced."""
    keys_fmt, values_fmt = {"format": "int4_per_channel", "group_size": 32}, {"format": "int2", "group_size": 32}
    cache = KvquantCache(model.config, keys=keys_fmt, values=values_fmt, residual=5, quantize_every=1)
    seen = record_updates(cache)
    long_prompt = prompt.repeat(1, 8)[:, :60]
    greedy(model, long_prompt, cache, new=12)
    total = long_prompt.shape[1] + 11
    for i, kv in enumerate(cache.layer_caches()):
        keys, values = (torch.cat(parts, dim=2) for parts in seen[i])
        key_blocks = (total - 5) // 32 * 32
        for side, x, fmt, quantized in (("keys", keys, keys_fmt, key_blocks), ("values", values, values_fmt, total - 5)):
            want = kvquant.quantize(x[:, :, :quantized], fmt["format"], group_size=32, on_nonfinite="propagate")
            got = kv.quantized(side)
            for a, b in zip((want.codes, want.scales, want.zeros), (got.codes, got.scales, got.zeros)):
                assert_same_bits(a.numpy(), b.numpy(), f"layer {i} {side}")
            assert_same_bits(x[:, :, quantized:].numpy(), kv.window(side).numpy(), f"layer {i} {side} window")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled-cpu-kernel"])
def test_the_default_cache_reads_the_codes_in_generate(model, prompt, compiled, monkeypatch):
    """A KvquantCache made from the model's config, with nothing else called, switches
    that model to kvquant's attention: the layers hand back only the new tokens (no
    dequantized history is built) and generation gives the tokens of the
    dequantize-then-attend path, eager and compiled (on the CPU: the C++ kernel, which
    must serve every decode step). Other caches then get the model's previous attention."""
    from kvquant.backends.torch import attention as torch_attention

    if compiled:
        def not_served(*args, **kw):
            raise AssertionError("torch.compile's path was asked: the CPU kernel did not serve a decode step")

        monkeypatch.setattr(torch_attention, "_compiled_attend", not_served)

    fmt = dict(keys={"format": "int4_per_channel", "group_size": 32}, values="int8", residual=8)
    long_prompt = prompt.repeat(1, 4)[:, :70]
    before = model.config._attn_implementation
    dyn_before = greedy(model, long_prompt, transformers.DynamicCache(), new=4)
    try:
        expected = greedy(model, long_prompt, KvquantCache(model.config, attention="dequantized", **fmt), new=10)
        assert model.config._attn_implementation == before  # the dequantized path switches nothing
        cache = KvquantCache(model.config, compiled=compiled, **fmt)
        assert model.config._attn_implementation == "kvquant"
        histories = []
        original = cache.layers[0].kv._history
        cache.layers[0].kv._history = lambda *a, **k: histories.append(1) or original(*a, **k)
        got = greedy(model, long_prompt, cache, new=10)
        assert histories == []  # never dequantized the whole history
        assert torch.equal(got, expected)
        assert cache.layer_caches()[0].quantized("keys").shape[2] == 64  # blocks of 32 left the window
        # Another cache (or none) under the same attention falls back to the model's previous one.
        dyn = greedy(model, long_prompt, transformers.DynamicCache(), new=4)
    finally:
        model.set_attn_implementation(before)
    assert torch.equal(dyn, dyn_before)


def test_attention_is_switched_per_model_with_its_own_fallback():
    """Two models in one process: a cache made from one model's config switches that one
    only, ``use_kvquant_attention(model, compiled=...)`` sets that model's choice only,
    and an eager model keeps its eager attention for other caches."""
    from kvquant.integrations.transformers import use_kvquant_attention

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    first = transformers.LlamaForCausalLM(config).eval()
    second = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_dict())).eval()
    second.set_attn_implementation("eager")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    eager_tokens = greedy(second, ids, transformers.DynamicCache(), new=6)
    use_kvquant_attention(first, compiled=False)
    assert second.config._attn_implementation == "eager"
    assert KvquantCache(first.config).layers[0].compiled is False
    cache = KvquantCache(second.config)
    assert cache.layers[0].compiled is True  # the other model's choice did not leak
    assert second.config._attn_implementation == "kvquant"
    greedy(second, ids, cache, new=6)
    assert torch.equal(greedy(second, ids, transformers.DynamicCache(), new=6), eager_tokens)


def test_a_cache_whose_model_did_not_switch_says_so(prompt):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    model = transformers.LlamaForCausalLM(config).eval()
    other = transformers.LlamaConfig(**config.to_dict())  # not the model's own config object
    cache = KvquantCache(other, residual=8)
    with pytest.raises(RuntimeError, match="did not read the cache's codes"):
        greedy(model, prompt, cache, new=4)
    with pytest.raises(ValueError, match="attention must be one of"):
        KvquantCache(model.config, attention="flash")


def test_cache_argument_follows_the_forward_signature(model):
    """transformers renamed past_key_values to cache (the old name warns, and goes in
    5.40): cache_argument reads the name off a model's forward."""
    from kvquant.integrations.transformers import cache_argument

    class Before(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            return input_ids

    import warnings

    cache = transformers.DynamicCache(config=model.config)
    prompt = torch.arange(5)[None]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name warns
        with torch.no_grad():
            model(prompt, **{cache_argument(model): cache})
    assert cache.get_seq_length() == 5  # the model filled the cache it was given
    assert cache_argument(Before()) == "past_key_values"


def test_kept_kernel_problem_matches_a_fresh_one_every_step(model, prompt, monkeypatch):
    """Each layer keeps its C++ kernel Problem between decode steps (KernelCall): a step
    like the last (KernelCall.decode) sets only the windows' lengths, the query and the
    output, while the quantized views and window buffers stay the same. Over a
    generation whose windows shift, whose stores and windows grow, every step's output
    equals a Problem built afresh for that call; the kept one is rebuilt exactly when
    the cache's buffers changed, and every other step takes decode's path."""
    from kvquant.backends import cpu_kernel
    from kvquant.backends.torch import attention as torch_attention
    from kvquant.cache import LayerCache

    if cpu_kernel.load() is None:
        pytest.skip("no C++ kernel here")
    calls = {"general": 0, "decode": 0, "rebuilt": 0, "compared": 0}
    kept_call = torch_attention.KernelCall.__call__
    kept_decode = torch_attention.KernelCall.decode
    kept_build = torch_attention.KernelCall._build
    kept_buffers = LayerCache.attention_buffers
    asked = {}

    def fresh_equals(out, query, keys, values, scale, causal, mask):
        fresh = kept_call(torch_attention.KernelCall(), query, keys, values, scale, causal, mask)
        assert torch.equal(out.view(torch.int32), fresh.view(torch.int32))
        calls["compared"] += 1

    def checked(self, query, keys, values, scale, causal, mask):
        out = kept_call(self, query, keys, values, scale, causal, mask)
        if out is not None and query.shape[2] == 1:
            fresh_equals(out, query, keys, values, scale, causal, mask)
            calls["general"] += 1
        return out

    def decoded(self, query, scale, buffers):
        out = kept_decode(self, query, scale, buffers)
        if out is not None:  # transformers' layout [B, 1, Hq, D] against the kernel's [B, Hq, 1, D]
            fresh_equals(out.transpose(1, 2), query, *asked["cache"].attention_inputs(), scale, True, None)
            calls["decode"] += 1
        return out

    def buffers_of(self):
        asked["cache"] = self
        return kept_buffers(self)

    def counted(self, keys, values, sources):
        calls["rebuilt"] += 1
        return kept_build(self, keys, values, sources)

    monkeypatch.setattr(torch_attention.KernelCall, "__call__", checked)
    monkeypatch.setattr(torch_attention.KernelCall, "decode", decoded)
    monkeypatch.setattr(torch_attention.KernelCall, "_build", counted)
    monkeypatch.setattr(LayerCache, "attention_buffers", buffers_of)
    before = model.config._attn_implementation
    try:
        cache = KvquantCache(model.config, keys="int8", values="int4", residual=4, quantize_every=8)
        greedy(model, prompt, cache, new=40)
    finally:
        model.set_attn_implementation(before)
    layers = len(cache.layers)
    assert calls["compared"] == 39 * layers
    # rebuilt (besides each fresh one compared) at a quantize call or a buffer's growth,
    # not at every step: 40 steps with tokens leaving every 8
    kept_rebuilds = calls["rebuilt"] - calls["compared"]
    assert layers * 5 <= kept_rebuilds <= layers * 12
    assert calls["general"] == kept_rebuilds  # only a step whose buffers changed
    assert calls["decode"] == 39 * layers - kept_rebuilds


def test_float16_windows_converted_per_call_decode_as_the_general_path(model, prompt, monkeypatch):
    """The kernel reads float32 and bfloat16 windows; a float16 model's are converted at
    each call, so no Problem is kept and every step takes the general path, whose
    tokens a run without the decode lane reproduces."""
    import copy

    from kvquant.backends.torch import attention as torch_attention

    half = copy.deepcopy(model).to(torch.float16)
    before = half.config._attn_implementation
    try:
        ours = greedy(half, prompt, KvquantCache(half.config, keys="int8", values="int4", residual=4, quantize_every=8))
        monkeypatch.setattr(torch_attention.KernelCall, "decode", lambda *args: None)
        general = greedy(half, prompt, KvquantCache(half.config, keys="int8", values="int4", residual=4,
                                                    quantize_every=8))
    finally:
        half.set_attn_implementation(before)
    assert torch.equal(ours, general)


def test_a_copied_cache_goes_on_as_the_original(model, prompt):
    """copy.deepcopy of a cache mid-generation (as assisted decoding and prompt reuse
    do): its layers build their own kernel Problem (ctypes pointers do not copy), and
    both caches give the same next logits."""
    import copy

    before = model.config._attn_implementation
    try:
        cache = KvquantCache(model.config, keys="int8", values="int4", residual=4, quantize_every=8)
        with torch.no_grad():
            model(prompt, cache=cache)
            model(prompt[:, :1], cache=cache)
            copied = copy.deepcopy(cache)
            a = model(prompt[:, 1:2], cache=cache).logits
            b = model(prompt[:, 1:2], cache=copied).logits
    finally:
        model.set_attn_implementation(before)
    assert copied.get_seq_length() == cache.get_seq_length() == prompt.shape[1] + 2
    assert torch.equal(a, b)
