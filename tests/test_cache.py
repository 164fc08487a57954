"""kvquant.cache: the residual window, streaming equal to one-shot on every format,
one stream on NumPy, torch and JAX with the same stored bits, nbytes against the
arrays held, refused appends that change nothing."""
import numpy as np
import pytest

import kvquant
from conftest import assert_same_bits
from kvquant.cache import CacheInputError, LayerCache, StoredFormat, calibrate_fp8_scale

FORMATS = ["fp8", "int8", {"format": "int4", "group_size": 32}, "int4", {"format": "int4", "group_size": 128},
           {"format": "fp8_per_tensor", "scale": 0.0123}, {"format": "int2", "group_size": 32},
           {"format": "int4_per_channel", "group_size": 32}, {"format": "int2_per_channel", "group_size": 64}]
IDS = ["fp8", "int8", "int4-g32", "int4-g64", "int4-g128", "fp8_per_tensor-static", "int2-g32",
       "int4_per_channel-g32", "int2_per_channel-g64"]


def quantized_count(fmt, total, residual):
    """Tokens a cache has quantized: all but the window, in whole blocks per channel."""
    f = StoredFormat.parse(fmt)
    leaving = max(0, total - residual)
    return leaving - leaving % f.group_size if f.info.per_channel else leaving
CHUNKS = [[1] * 9, [5, 1, 1, 3, 7, 1], [40, 1, 1, 1], [3, 17, 2, 11]]


def stream(total=40, batch=2, heads=3, head_dim=64, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((batch, heads, total, head_dim)).astype(dtype)
    k[..., 5] *= 30  # an outlier channel
    return k, (rng.standard_normal((batch, heads, total, head_dim)) * 0.3).astype(dtype)


def parts(q):
    return [q.codes, q.scales] + ([q.zeros] if q.zeros is not None else [])


def one_shot(x, fmt):
    f = StoredFormat.parse(fmt)
    return kvquant.quantize(x, f.format, group_size=f.group_size, scale=f.scale, on_nonfinite="propagate")


@pytest.mark.parametrize("chunks", CHUNKS, ids=["single-tokens", "odd-chunks", "prefill-then-single", "mixed"])
@pytest.mark.parametrize("residual", [0, 4, 128])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_streaming_equals_one_shot(fmt, residual, chunks):
    if StoredFormat.parse(fmt).info.per_channel:
        chunks = chunks * 12  # enough tokens for whole blocks of 32 and 64 past the window
    keys, values = stream(total=sum(chunks))
    cache = LayerCache(keys=fmt, values=fmt, residual=residual)
    start = 0
    for n in chunks:
        k_all, v_all = cache.append(keys[:, :, start:start + n], values[:, :, start:start + n])
        start += n
        assert k_all.shape == keys[:, :, :start].shape == v_all.shape
    quantized = quantized_count(fmt, start, residual)
    for side, x in (("keys", keys), ("values", values)):
        window = cache.window(side)
        assert_same_bits(x[:, :, quantized:], window, f"{side} residual window")
        stored = cache.quantized(side)
        if quantized == 0:
            assert stored is None
            continue
        for got, want in zip(parts(stored), parts(one_shot(x[:, :, :quantized], fmt))):
            assert_same_bits(want, np.asarray(got), f"{side} stored")
    # What attention gets: the dequantized history, then the window exactly.
    if quantized:
        expected = kvquant.dequantize(one_shot(keys[:, :, :quantized], fmt))
        assert_same_bits(expected, k_all[:, :, :quantized], "dequantized history")
    assert_same_bits(keys[:, :, quantized:], k_all[:, :, quantized:], "window in the history")


def test_keys_and_values_in_different_formats_and_full_precision():
    keys, values = stream(total=20)
    cache = LayerCache(keys="int8", values=None, residual=4)
    k_all, v_all = cache.append(keys, values)
    assert cache.quantized("values") is None
    assert_same_bits(values, v_all, "full-precision values")
    assert_same_bits(kvquant.dequantize(one_shot(keys[:, :, :16], "int8")), k_all[:, :, :16])


@pytest.mark.parametrize("keys_format, values_format", [("int8", "int4"), (None, "int8"), ("fp8", None)],
                         ids=["int8-int4", "full-keys", "full-values"])
def test_attention_buffers_are_what_attention_inputs_views(keys_format, values_format):
    """attention_buffers names, without making views, the objects attention_inputs'
    Histories are views of: the same quantized views, the windows' buffers with the
    windows' lengths, through decode steps, quantize calls and growth."""
    keys, values = stream(total=60)
    cache = LayerCache(keys=keys_format, values=values_format, residual=4, quantize_every=8)
    assert cache.attention_buffers() == (None, None, None, None, 0, 0)
    for t in [20] + [1] * 40:
        start = cache.seq_length
        cache.append(keys[:, :, start:start + t], values[:, :, start:start + t], history=False)
        buffers = cache.attention_buffers()
        for i, side in enumerate(cache.attention_inputs()):
            assert buffers[i] is side.quantized
            assert np.shares_memory(buffers[2 + i], side.window) and buffers[4 + i] == side.window.shape[2]
            assert_same_bits(buffers[2 + i][:, :, :buffers[4 + i]], side.window, f"side {i} window")


def test_nbytes_is_the_arrays_held_and_bytes_per_token_the_formula():
    keys, values = stream(total=300, batch=1, heads=2, head_dim=64)
    cache = LayerCache(keys="int8", values={"format": "int4", "group_size": 64}, residual=128)
    for i in range(0, 300, 7):
        cache.append(keys[:, :, i:i + 7], values[:, :, i:i + 7])
    held = [a for side in ("keys", "values") for a in cache._stores[0 if side == "keys" else 1].arrays]
    held += [window.buffer for window in cache._windows]  # whole buffers, spare capacity included
    assert all(np.shares_memory(cache.window(side), window.buffer)
               for side, window in zip(("keys", "values"), cache._windows))
    assert cache.nbytes == sum(a.nbytes for a in held)
    # int8: 64 code bytes + 4 scale bytes; int4 g64: 32 bytes + 8 of scale and zero; 2 heads
    assert cache.bytes_per_token() == 2 * (64 + 4 + 32 + 8)
    stored = cache._stores[0].length
    used = sum(a[:, :, :stored].nbytes for a in held[:5])
    assert used == stored * cache.bytes_per_token()


def test_storage_grows_by_doubling():
    keys, values = stream(total=200, batch=1, heads=1)
    cache = LayerCache(keys="int8", values="int8", residual=0)
    capacities = []
    for t in range(200):
        cache.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
        capacities.append(cache._stores[0].capacity())
    assert sorted(set(capacities)) == [16, 32, 64, 128, 256]


@pytest.mark.parametrize("bad, match", [
    (lambda k: k[0], "must be \\[batch, kv_heads, new_tokens, head_dim\\]"),
    (lambda k: k[..., :32], "head_dim 32 \\(cache: 64\\)"),
    (lambda k: k[:1], "batch 1 \\(cache: 2\\)"),
    (lambda k: k.astype(np.float16), "dtype 'float16' \\(cache: 'float32'\\)"),
    (lambda k: k.astype(np.int32), "dtype int32 is not float32"),
])
def test_bad_append_names_the_layer_and_changes_nothing(bad, match):
    keys, values = stream(total=10)
    cache = LayerCache(keys="int4", values="int8", residual=3, layer=7)
    cache.append(keys[:, :, :6], values[:, :, :6])
    before = (cache.seq_length, cache.nbytes, cache.window("keys").copy(), np.asarray(cache.quantized("keys").codes).copy())
    with pytest.raises(CacheInputError, match="layer 7.*" + match):
        cache.append(bad(keys[:, :, 6:]), bad(values[:, :, 6:]))
    assert cache.seq_length == before[0] and cache.nbytes == before[1]
    assert_same_bits(before[2], cache.window("keys"))
    assert_same_bits(before[3], cache.quantized("keys").codes)


def test_decode_steps_of_one_shape_are_still_checked():
    # Appends of the same types, dtypes, devices and shapes as the last one that passed
    # skip the checks; any difference, or a reorder that changes the batch, is checked.
    keys, values = stream(total=10)
    cache = LayerCache(keys="int8", values="int8", residual=3, layer=5)
    for t in range(4):
        cache.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
    with pytest.raises(CacheInputError, match="layer 5.*dtype 'float16' \\(cache: 'float32'\\)"):
        cache.append(keys[:, :, 4:5].astype(np.float16), values[:, :, 4:5].astype(np.float16))
    with pytest.raises(CacheInputError, match="layer 5.*disagree"):
        cache.append(keys[:, :, 4:5], values[:, :, 4:5].astype(np.float16))
    cache.reorder([0])
    with pytest.raises(CacheInputError, match="layer 5.*batch 2 \\(cache: 1\\)"):
        cache.append(keys[:, :, 4:5], values[:, :, 4:5])
    assert cache.seq_length == 4
    cache.append(keys[:1, :, 4:5], values[:1, :, 4:5])
    assert cache.seq_length == 5


def test_raise_mode_refuses_a_nan_token_and_changes_nothing():
    keys, values = stream(total=8)
    cache = LayerCache(keys="int8", values="int8", residual=2, on_nonfinite="raise")
    cache.append(keys[:, :, :4], values[:, :, :4])
    bad = keys[:, :, 4:].copy()
    bad[0, 0, 0, 0] = np.nan  # reaches quantization once it leaves the window
    with pytest.raises(kvquant.NonFiniteInputError):
        cache.append(bad, values[:, :, 4:])
    assert cache.seq_length == 4


def test_default_propagates_nan_like_an_unquantized_cache():
    keys, values = stream(total=8)
    keys[1, 2, 1, 3] = np.nan
    cache = LayerCache(keys="int8", values="int8", residual=0)
    k_all, _ = cache.append(keys, values)
    rows = k_all.reshape(-1, 64)
    poisoned = (1 * 3 + 2) * 8 + 1  # token [1, 2, 1]
    assert np.isnan(rows[poisoned]).all() and not np.isnan(np.delete(rows, poisoned, 0)).any()


def test_fp8_per_tensor_needs_a_static_scale_and_calibration_gives_one():
    with pytest.raises(ValueError, match="not streamable"):
        LayerCache(keys="fp8_per_tensor")
    keys, values = stream(total=16)
    scale = calibrate_fp8_scale(keys, values)
    assert scale == float(kvquant.quantize(np.concatenate([keys, values]), "fp8_per_tensor").scales)
    cache = LayerCache(keys={"format": "fp8_per_tensor", "scale": scale}, values="fp8", residual=0)
    k_all, _ = cache.append(keys, values)
    assert_same_bits(kvquant.dequantize(kvquant.quantize(keys, "fp8_per_tensor", scale=scale)), k_all)


def test_group_larger_than_head_dim_warns():
    keys, values = stream(total=2)
    with pytest.warns(UserWarning, match="groups of 128 on head_dim 64"):
        LayerCache(keys={"format": "int4", "group_size": 128}, values="int8").append(keys, values)


def test_crop_and_reorder():
    keys, values = stream(total=12)
    cache = LayerCache(keys="int8", values="int8", residual=6)
    cache.append(keys, values)
    with pytest.raises(ValueError, match="residual window only"):
        cache.crop(3)
    cache.crop(9)
    assert cache.seq_length == 9
    assert cache.quantized("keys") is cache.quantized("keys")  # one view until the store changes
    cache.reorder([1, 1])  # and a reorder changes it
    assert_same_bits(keys[[1, 1], :, 6:9], cache.window("keys"))
    assert_same_bits(np.asarray(one_shot(keys[[1, 1], :, :6], "int8").codes), cache.quantized("keys").codes)


# ------------------------------------------------- one stream, three frameworks
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_numpy_torch_and_jax_caches_store_the_same_bits(fmt):
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    from kvquant.cache import JaxLayerCache

    if StoredFormat.parse(fmt).info.per_channel:
        return _per_channel_same_bits(fmt, torch, jax)
    keys, values = stream(total=23, dtype=np.float32)
    chunks = [7, 1, 1, 5, 1, 8]
    R = 4
    np_cache = LayerCache(keys=fmt, values=fmt, residual=R)
    t_cache = LayerCache(keys=fmt, values=fmt, residual=R)
    j_cache = JaxLayerCache.create(2, 3, 64, capacity=32, keys=fmt, values=fmt, residual=R)
    step = jax.jit(JaxLayerCache.append)
    start = 0
    for n in chunks:
        k, v = keys[:, :, start:start + n], values[:, :, start:start + n]
        np_out = np_cache.append(k, v)
        t_out = t_cache.append(torch.from_numpy(k), torch.from_numpy(v))
        j_cache, jk, jv, valid = step(j_cache, jax.numpy.asarray(k), jax.numpy.asarray(v))
        start += n
        assert_same_bits(np_out[0], t_out[0].numpy(), "torch history")
        valid = np.asarray(valid)
        assert valid.sum() == start
        got = np.asarray(jk)[:, :, valid]
        assert_same_bits(np_out[0], got, "jax history (valid slots)")
    quantized = start - R
    for side in ("keys", "values"):
        ref = parts(np_cache.quantized(side))
        for a, b, c in zip(ref, parts(t_cache.quantized(side)), parts(j_cache.quantized(side))):
            assert_same_bits(a, kvquant.backend_for(b).runtime.to_numpy(b), f"torch stored {side}")
            c = np.asarray(c)
            assert_same_bits(a, c if c.ndim < 3 else c[:, :, :quantized], f"jax stored {side}")


def _per_channel_same_bits(fmt, torch, jax):
    """Per-channel keys, per-token values: blocks of G tokens leave the window whole. The
    JAX cache moves both sides by blocks (one mask for both), LayerCache only the
    per-channel side: the keys' splits agree, the values' stored bits are one quantize."""
    from kvquant.cache import JaxLayerCache

    chunks = [70, 1, 1, 5, 1, 60, 1]
    keys, values = stream(total=sum(chunks))
    caches = [LayerCache(keys=fmt, values="int8", residual=4) for _ in range(2)]
    j_cache = JaxLayerCache.create(2, 3, 64, capacity=256, keys=fmt, values="int8", residual=4)
    step = jax.jit(JaxLayerCache.append)
    start = 0
    for n in chunks:
        k, v = keys[:, :, start:start + n], values[:, :, start:start + n]
        np_out = caches[0].append(k, v)
        t_out = caches[1].append(torch.from_numpy(k), torch.from_numpy(v))
        j_cache, jk, jv, valid = step(j_cache, jax.numpy.asarray(k), jax.numpy.asarray(v))
        start += n
        assert_same_bits(np_out[0], t_out[0].numpy(), "torch history")
        valid = np.asarray(valid)
        assert valid.sum() == start
        assert_same_bits(np_out[0], np.asarray(jk)[:, :, valid], "jax keys history (valid slots)")
        blocks = quantized_count(fmt, start, 4)
        want_v = np.concatenate([kvquant.dequantize(one_shot(values[:, :, :blocks], "int8"), "float32"),
                                 values[:, :, blocks:start]], axis=2)
        assert_same_bits(want_v, np.asarray(jv)[:, :, valid], "jax values history (valid slots)")
    quantized = quantized_count(fmt, start, 4)
    assert caches[0].quantized("keys").shape[2] == quantized > 0
    assert caches[0].window("keys").shape[2] == start - quantized
    for a, b, c in zip(parts(caches[0].quantized("keys")), parts(caches[1].quantized("keys")),
                       parts(j_cache.quantized("keys"))):
        assert_same_bits(a, b.numpy(), "torch stored keys")
        assert_same_bits(a, np.asarray(c)[:, :, :a.shape[2]], "jax stored keys")  # tokens, or blocks of G
    for a, c in zip(parts(one_shot(values[:, :, :quantized], "int8")), parts(j_cache.quantized("values"))):
        assert_same_bits(a, np.asarray(c)[:, :, :quantized], "jax stored values")


def test_jax_cache_compiles_once_per_new_token_count():
    jax = pytest.importorskip("jax")
    from kvquant.cache import JaxLayerCache

    keys, values = stream(total=12, batch=1, heads=2)
    cache = JaxLayerCache.create(1, 2, 64, capacity=16, keys="int4", values="int8", residual=3)
    traces = []

    def step(c, k, v):
        traces.append(1)
        return JaxLayerCache.append(c, k, v)

    jitted = jax.jit(step)
    for t in range(12):
        cache, *_ = jitted(cache, jax.numpy.asarray(keys[:, :, t:t + 1]), jax.numpy.asarray(values[:, :, t:t + 1]))
    assert len(traces) == 1 and int(cache.length) == 12


def test_jax_cache_refuses_an_append_past_its_capacity():
    jax = pytest.importorskip("jax")
    from kvquant.cache import JaxLayerCache

    keys, values = stream(total=12, batch=1, heads=1)
    cache = JaxLayerCache.create(1, 1, 64, capacity=8, residual=2)
    cache, *_ = cache.append(jax.numpy.asarray(keys[:, :, :8]), jax.numpy.asarray(values[:, :, :8]))
    with pytest.raises(CacheInputError, match="full"):
        cache.append(jax.numpy.asarray(keys[:, :, 8:12]), jax.numpy.asarray(values[:, :, 8:12]))


def test_torch_cache_keeps_its_device_and_never_reads_values_on_append():
    torch = pytest.importorskip("torch")
    cache = LayerCache(keys="int4", values="fp8", residual=2)
    k = torch.empty(1, 2, 5, 64, device="meta")
    k_all, v_all = cache.append(k, k)
    assert k_all.device.type == "meta" and k_all.shape == (1, 2, 5, 64)
    assert cache.quantized("keys").codes.device.type == "meta"


@pytest.mark.parametrize("fmt", ["int8", {"format": "int4", "group_size": 32}], ids=["int8", "int4-g32"])
def test_quantize_every_batches_the_leaving_tokens_with_the_same_bits(fmt):
    keys, values = stream(total=90)
    cache = LayerCache(keys=fmt, values=fmt, residual=16, quantize_every=8)
    calls = []
    import kvquant.cache.layer as cache_module
    original = cache_module.quantize_dense
    cache_module.quantize_dense = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        for t in range(90):
            k_all, _ = cache.append(keys[:, :, t:t + 1], values[:, :, t:t + 1])
            assert 16 <= cache.window("keys").shape[2] <= 16 + 7 or t < 16
    finally:
        cache_module.quantize_dense = original
    quantized = cache.quantized("keys").shape[2]
    assert quantized == 72 and len(calls) == 2 * 9  # 9 batches of 8, keys and values
    for got, want in zip(parts(cache.quantized("keys")), parts(one_shot(keys[:, :, :quantized], fmt))):
        assert_same_bits(want, np.asarray(got), "stored keys")
    assert_same_bits(keys[:, :, quantized:], k_all[:, :, quantized:], "window")
    with pytest.raises(ValueError, match="quantize_every must be a positive int"):
        LayerCache(quantize_every=0)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("keys, values, residual", [
    ("int8", "int8", 3), ({"format": "int4_per_channel", "group_size": 32}, {"format": "int4", "group_size": 32}, 5),
    (None, "fp8", 100)], ids=["int8-r3", "kivi-r5", "full-fp8-r100"])
def test_a_sliding_window_holds_the_window_with_the_stored_bits_of_its_tokens(framework, keys, values, residual):
    # Per step: the history minus its hidden tokens is the last W - 1 tokens before the
    # step and the new ones; held tokens stay bounded; the stored bits are one quantize
    # of the tokens held.
    if framework == "torch":
        pytest.importorskip("torch")
    import torch

    k, v = stream(total=300)
    to = (lambda a: torch.from_numpy(a)) if framework == "torch" else (lambda a: a)
    cache = LayerCache(keys=keys, values=values, residual=residual, sliding_window=24)
    seen, most = 0, 0
    for new in [40] + [1] * 100 + [7] * 20 + [1] * 20:
        k_all, v_all = cache.append(to(k[:, :, seen:seen + new]), to(v[:, :, seen:seen + new]))
        visible = min(seen, 23) + new
        seen += new
        hidden = cache.hidden_tokens
        assert cache.seq_length == hidden + visible and k_all.shape[2] == hidden + visible
        most = max(most, cache.seq_length)
        held = k[:, :, seen - cache.seq_length:seen]
        for side, fmt, x in (("keys", keys, held), ("values", values, v[:, :, seen - cache.seq_length:seen])):
            q = cache.quantized(side)
            if q is None:
                assert_same_bits(x, np.asarray(cache.window(side)), f"{side} window")
                continue
            for got, want in zip(parts(q), parts(one_shot(x[:, :, :q.shape[2]], fmt))):
                assert_same_bits(want, np.asarray(got), f"{side} after {seen} tokens")
            assert_same_bits(x[:, :, q.shape[2]:], np.asarray(cache.window(side)), f"{side} window")
    assert most <= 23 + 15 + 31 + 7  # W - 1, fewer than 16 to forget, a block's rest, an append
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        LayerCache(sliding_window=0)


@pytest.mark.parametrize("keys, values", [("int8", "int8"), ({"format": "int4_per_channel", "group_size": 32}, None)],
                         ids=["int8", "kivi-keys"])
def test_a_sliding_jax_cache_is_a_ring_holding_the_window_with_layer_caches_bits(keys, values):
    # Every token the newest one sees (the last 24) sits in exactly one slot the mask
    # shows, with the bits LayerCache has for that position; the ring never grows.
    jax = pytest.importorskip("jax")
    from kvquant.cache import JaxLayerCache

    chunks = [40] + [1] * 60 + [7, 1, 1]
    k, v = stream(total=sum(chunks))
    window = 24
    ring = JaxLayerCache.create(2, 3, 64, capacity=96, keys=keys, values=values, residual=4, sliding_window=window)
    full = LayerCache(keys=keys, values=values, residual=4)
    step = jax.jit(JaxLayerCache.append)
    seen = 0
    for n in chunks:
        ring, jk, jv, valid = step(ring, jax.numpy.asarray(k[:, :, seen:seen + n]), jax.numpy.asarray(v[:, :, seen:seen + n]))
        want_k, want_v = full.append(k[:, :, seen:seen + n], v[:, :, seen:seen + n])
        seen += n
        positions = np.asarray(ring.positions())
        valid = np.asarray(valid)
        assert sorted(positions[valid]) == list(range(max(0, seen - window), seen)), f"after {seen} tokens"
        assert_same_bits(want_k[:, :, positions[valid]], np.asarray(jk)[:, :, valid], f"keys after {seen} tokens")
        assert_same_bits(want_v[:, :, positions[valid]], np.asarray(jv)[:, :, valid], f"values after {seen} tokens")
        assert all(a.shape[2] in (96, 96 // 32) for a in ring.stores[0] if a.ndim > 2)
    with pytest.raises(CacheInputError, match="cannot hold the window"):
        ring.append(jax.numpy.asarray(k[:, :, :80]), jax.numpy.asarray(v[:, :, :80]))


def test_a_sliding_window_append_that_raises_changes_nothing():
    # Forgetting the tokens beyond the window is part of the append: refused, it is undone too.
    k, v = stream(total=60)
    cache = LayerCache(keys="int8", values="int8", residual=2, sliding_window=8, on_nonfinite="raise")
    cache.append(k[:, :, :40], v[:, :, :40])
    before = (cache.seq_length, cache.hidden_tokens, np.asarray(cache.quantized("keys").codes).copy(),
              np.asarray(cache.window("keys")).copy())
    bad = k[:, :, 40:43].copy()
    bad[0, 0, 0, 0] = np.nan  # the oldest new token: it leaves the 2-token window now, quantized
    with pytest.raises(kvquant.NonFiniteInputError):
        cache.append(bad, v[:, :, 40:43])
    assert (cache.seq_length, cache.hidden_tokens) == before[:2]
    assert_same_bits(before[2], np.asarray(cache.quantized("keys").codes), "stored keys")
    assert_same_bits(before[3], np.asarray(cache.window("keys")), "window")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_small_cpu_tensors_quantized_through_numpy_give_torchs_bits(fmt, dtype):
    """A cache quantizes a small CPU tensor (a decode step's leaving tokens) with the
    NumPy reference on its memory: the tensors it hands back have the dtypes, shapes
    and bits of torch's own quantize, on inputs built to expose the spec's edges (a NaN
    token, an infinite one, subnormals, a zero token, exact ties)."""
    torch = pytest.importorskip("torch")
    from kvquant.cache import stored as stored_module

    keys, _ = stream(total=64)
    x = torch.from_numpy(keys).to(getattr(torch, dtype))
    x[0, 0, 3, 5] = float("nan")
    x[0, 1, 4, 7] = float("inf")
    x[1, 0, 6] = 1e-40 if dtype == "float32" else 0.0
    x[1, 1, 8] = 0.0
    x[1, 2, 9, :32] = torch.arange(32, dtype=x.dtype) * 0.5  # halves: ties once scaled
    x = x[:, :, :, :]  # a view, as a window's leaving tokens are
    f = StoredFormat.parse(fmt)
    assert stored_module._small_cpu_tensor(x) is not None  # this input takes the NumPy route
    via_numpy = stored_module.quantize_dense(x, f)
    saved = stored_module.NUMPY_BELOW
    stored_module.NUMPY_BELOW = 0
    try:
        assert stored_module._small_cpu_tensor(x) is None
        via_torch = stored_module.quantize_dense(x, f)
    finally:
        stored_module.NUMPY_BELOW = saved
    assert (via_numpy.backend, via_numpy.source_dtype, via_numpy.shape, via_numpy.format, via_numpy.group_size) == (
        via_torch.backend, via_torch.source_dtype, via_torch.shape, via_torch.format, via_torch.group_size)
    for got, want in zip(parts(via_numpy), parts(via_torch)):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.shape == want.shape
        carrier = torch.uint8 if got.dtype in (torch.float8_e4m3fn, torch.int8, torch.uint8) else torch.int32
        assert torch.equal(got.view(carrier), want.view(carrier)), f"{fmt} {dtype}"
