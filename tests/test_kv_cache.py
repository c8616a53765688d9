"""attnlib.kv_cache: the cache against plain concatenation, cached decoding against the
full causal forward, the memory formulas against hand-computed published numbers, the
sliding-window cache with attention sinks against masked full attention, and int8
quantisation against a loop written from its definition."""

import numpy as np
import pytest
import torch
from conftest import BACKENDS, reference_attention, to_backend, to_numpy

import attnlib
from attnlib.kv_cache import (
    PUBLISHED_CONFIGS,
    CacheConfig,
    Int8Tensor,
    KVCache,
    SlidingWindowKVCache,
    attention_sink_mask,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    kv_cache_elements_per_token,
    mla_cache_elements_per_token,
    quantize_int8,
)
from attnlib.positions import apply_rope

CAPACITIES = [None, 40]  # growing, preallocated


# ------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("chunks", [[1] * 7, [3, 1, 1, 17], [2, 0, 31], [1, 2, 3]])
def test_append_returns_everything_so_far(rng, backend, capacity, chunks):
    B, H, d_k, d_v = 2, 3, 5, 4  # d_k != d_v
    cache = KVCache(capacity)
    ks = [rng.standard_normal((B, H, n, d_k)) for n in chunks]
    vs = [rng.standard_normal((B, H, n, d_v)) for n in chunks]
    for t, (k, v) in enumerate(zip(ks, vs)):
        keys, values = cache.append(to_backend(k, backend), to_backend(v, backend))
        want_k = np.concatenate(ks[: t + 1], axis=-2)
        want_v = np.concatenate(vs[: t + 1], axis=-2)
        assert keys.shape == want_k.shape and values.shape == want_v.shape
        np.testing.assert_array_equal(to_numpy(keys), want_k)
        np.testing.assert_array_equal(to_numpy(values), want_v)
        assert cache.length == len(cache) == want_k.shape[-2]
        assert type(keys) is type(to_backend(k, backend))
    np.testing.assert_array_equal(to_numpy(cache.keys), np.concatenate(ks, axis=-2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_dtype_and_nbytes(rng, backend, dtype):
    cache = KVCache()
    k = to_backend(rng.standard_normal((1, 2, 3, 8)), backend, dtype)
    v = to_backend(rng.standard_normal((1, 2, 3, 6)), backend, dtype)
    keys, _ = cache.append(k, v)
    assert keys.dtype == k.dtype
    item = np.dtype(dtype).itemsize
    assert cache.nbytes == 1 * 2 * 3 * (8 + 6) * item
    # the formula of the memory helpers, for the same shape (one layer, B = 1)
    per_token = kv_cache_bytes_per_token(n_layers=1, n_kv_heads=2, head_dim=8, v_head_dim=6,
                                         bytes_per_element=item)
    assert cache.nbytes == per_token * cache.length


def test_growing_cache_doubles_and_keeps_old_views(rng):
    cache = KVCache()
    k, v = rng.standard_normal((2, 1, 1, 16, 2))
    first_k, _ = cache.append(k, v)
    snapshot = first_k.copy()
    assert cache.allocated == 16
    cache.append(rng.standard_normal((1, 1, 1, 2)), rng.standard_normal((1, 1, 1, 2)))
    assert cache.allocated == 32  # doubled, not grown by one
    np.testing.assert_array_equal(first_k, snapshot)  # an old view still holds its data
    np.testing.assert_array_equal(cache.keys[..., :16, :], snapshot)


def test_reset_and_crop(rng):
    cache = KVCache(10)
    k, v = rng.standard_normal((2, 6, 3)), rng.standard_normal((2, 6, 3))
    cache.append(k, v)
    cache.crop(4)
    assert cache.length == 4
    np.testing.assert_array_equal(cache.values, v[:, :4])
    keys, _ = cache.append(k[:, :2] + 1, v[:, :2])
    np.testing.assert_array_equal(keys, np.concatenate([k[:, :4], k[:, :2] + 1], axis=-2))
    with pytest.raises(ValueError, match="crop to length = 9"):
        cache.crop(9)
    cache.reset()
    assert cache.length == 0 and cache.nbytes == 0 and cache.keys.shape == (2, 0, 3)
    assert KVCache().keys is None and KVCache().nbytes == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_cache_raises_naming_capacity_and_length(rng, backend):
    cache = KVCache(capacity=5)
    k = to_backend(rng.standard_normal((1, 2, 4, 3)), backend)
    cache.append(k, k)
    with pytest.raises(ValueError, match=r"capacity = 5.*holds 4.*L = 2"):
        cache.append(k[..., :2, :], k[..., :2, :])
    assert cache.length == 4  # a refused append changes nothing
    cache.append(k[..., :1, :], k[..., :1, :])  # exactly full is fine
    assert cache.length == 5


def test_bad_inputs(rng):
    k = rng.standard_normal((2, 3, 4, 5))
    with pytest.raises(ValueError, match="capacity"):
        KVCache(0)
    with pytest.raises(TypeError, match="NumPy array or a torch tensor"):
        KVCache().append(k.tolist(), k)
    with pytest.raises(ValueError, match="every dimension but the last"):
        KVCache().append(k, k[..., :3, :])
    with pytest.raises(TypeError, match="floating"):
        KVCache().append(k.astype(np.int64), k)
    with pytest.raises(TypeError, match="one dtype"):
        KVCache().append(k, k.astype(np.float32))
    with pytest.raises(TypeError, match="cannot mix"):
        KVCache().append(k, torch.from_numpy(k))
    cache = KVCache()
    cache.append(k, k)
    with pytest.raises(ValueError, match=r"holds keys of shape \(2, 3, 'L', 5\)"):
        cache.append(k[:1], k[:1])  # another batch size
    with pytest.raises(ValueError, match="holds keys"):
        cache.append(k[..., :4], k)  # another d_k
    with pytest.raises(TypeError, match="holds float64"):
        cache.append(k.astype(np.float32), k.astype(np.float32))
    with pytest.raises(TypeError, match="cannot mix"):
        cache.append(torch.from_numpy(k), torch.from_numpy(k))


# ------------------------------------------------- cached decoding = full forward
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("capacity", CAPACITIES)
@pytest.mark.parametrize("chunks", [[1] * 9, [4, 1, 1, 3], [9], [2, 3, 4]])
def test_cached_attention_equals_full_causal_attention(rng, backend, capacity, chunks):
    """Feeding the positions chunk by chunk, each chunk attending (bottom-right causal)
    to everything cached, gives the rows of full causal attention over all positions."""
    B, H, n, d_k, d_v = 2, 3, sum(chunks), 4, 6
    q, k = rng.standard_normal((2, B, H, n, d_k))
    v = rng.standard_normal((B, H, n, d_v))
    want = reference_attention(q, k, v, allowed=np.tril(np.ones((n, n), bool)))
    cache, outs, start = KVCache(capacity), [], 0
    for L in chunks:
        sl = slice(start, start + L)
        keys, values = cache.append(to_backend(k[..., sl, :], backend),
                                    to_backend(v[..., sl, :], backend))
        outs.append(to_numpy(attnlib.scaled_dot_product_attention(
            to_backend(q[..., sl, :], backend), keys, values, causal=True)))
        start += L
    got = np.concatenate(outs, axis=-2)
    assert np.abs(got - want).max() < 1e-12


def test_top_left_alignment_would_be_wrong(rng):
    """The cache needs bottom-right alignment: a chunk of L = 3 new queries against S = 6
    keys with top-left alignment (torch's is_causal) hides keys the queries should see."""
    q, k, v = rng.standard_normal((3, 1, 6, 4))
    want = reference_attention(q, k, v, allowed=np.tril(np.ones((6, 6), bool)))[..., 3:, :]
    top_left = attnlib.causal_mask(3, 6, align="top-left")
    wrong = attnlib.scaled_dot_product_attention(q[..., 3:, :], k, v, top_left)
    right = attnlib.scaled_dot_product_attention(q[..., 3:, :], k, v, causal=True)
    assert np.abs(right - want).max() < 1e-12
    assert np.abs(wrong - want).max() > 1e-3


# ------------------------------------------------------------------ memory formulas
def test_published_numbers():
    # DeepSeek-V2 (paper, Table 1 and section 2.1): 576 elements per layer vs 32,768.
    assert mla_cache_elements_per_token(512, 64) == 576
    assert PUBLISHED_CONFIGS["DeepSeek-V2"].elements_per_token_per_layer() == 576
    assert PUBLISHED_CONFIGS["DeepSeek-V2 as MHA"].elements_per_token_per_layer() == 2 * 128 * 128
    # Llama-2-7B: 2 * 32 layers * 32 heads * 128 * 2 bytes = 512 KiB per token
    assert PUBLISHED_CONFIGS["Llama-2-7B"].bytes_per_token() == 2 * 32 * 32 * 128 * 2 == 524288
    assert PUBLISHED_CONFIGS["Llama-2-70B"].bytes_per_token() == 2 * 80 * 8 * 128 * 2
    assert PUBLISHED_CONFIGS["Mistral-7B"].bytes_per_token() == 2 * 32 * 8 * 128 * 2
    assert PUBLISHED_CONFIGS["Falcon-7B"].bytes_per_token() == 2 * 32 * 1 * 64 * 2
    assert PUBLISHED_CONFIGS["DeepSeek-V2"].bytes_per_token() == 60 * 576 * 2
    kinds = {name: c.kind for name, c in PUBLISHED_CONFIGS.items()}
    assert kinds == {"Llama-2-7B": "MHA", "Llama-2-70B": "GQA", "Mistral-7B": "GQA",
                     "Falcon-7B": "MQA", "DeepSeek-V2": "MLA", "DeepSeek-V2 as MHA": "MHA"}


def test_formulas_and_errors():
    assert kv_cache_elements_per_token(8, 128) == 2 * 8 * 128
    assert kv_cache_elements_per_token(4, 192, 128) == 4 * (192 + 128)
    assert kv_cache_bytes_per_token(n_layers=3, n_kv_heads=2, head_dim=4,
                                    bytes_per_element=4) == 3 * 2 * 2 * 4 * 4
    assert kv_cache_bytes_per_token(n_layers=2, kv_lora_rank=10, rope_head_dim=0) == 2 * 10 * 2
    cfg = CacheConfig("toy", n_layers=2, n_heads=4, head_dim=8, n_kv_heads=2)
    assert kv_cache_bytes(cfg, 100, batch_size=3) == 3 * 100 * 2 * 2 * 2 * 8 * 2
    assert CacheConfig("mha", n_layers=1, n_heads=4, head_dim=8).kind == "MHA"
    with pytest.raises(ValueError, match="either n_kv_heads"):
        kv_cache_bytes_per_token(n_layers=2, n_kv_heads=2, head_dim=4, kv_lora_rank=8)
    with pytest.raises(ValueError, match="either n_kv_heads"):
        kv_cache_bytes_per_token(n_layers=2)
    with pytest.raises(ValueError, match="need both"):
        kv_cache_bytes_per_token(n_layers=2, n_kv_heads=2)
    with pytest.raises(ValueError, match="MLA needs both"):
        kv_cache_bytes_per_token(n_layers=2, kv_lora_rank=8)
    with pytest.raises(ValueError, match="n_layers"):
        kv_cache_bytes_per_token(n_layers=0, n_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="bytes_per_element"):
        kv_cache_bytes_per_token(n_layers=1, n_kv_heads=2, head_dim=4, bytes_per_element=0)
    with pytest.raises(TypeError, match="CacheConfig"):
        kv_cache_bytes({"n_layers": 2}, 10)


# ------------------------------------------ sliding window with attention sinks
def sink_mask_loop(L, S, window, n_sink):
    """Which keys each query sees, written from the definition (bottom-right)."""
    allowed = np.zeros((L, S), bool)
    for i in range(L):
        p = S - L + i
        for j in range(S):
            allowed[i, j] = j <= p and (j < n_sink or j > p - window)
    return allowed


@pytest.mark.parametrize("L, S", [(1, 1), (7, 7), (1, 12), (3, 12), (20, 20)])
@pytest.mark.parametrize("window, n_sink", [(1, 0), (3, 0), (3, 2), (4, 4), (30, 1)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_sink_mask_matches_loop(L, S, window, n_sink, backend):
    like = to_backend(np.zeros(1), backend)
    mask = attention_sink_mask(L, S, window=window, n_sink=n_sink, like=like)
    assert type(mask) is type(like) and tuple(mask.shape) == (L, S)
    np.testing.assert_array_equal(np.asarray(mask), sink_mask_loop(L, S, window, n_sink))


SINK_CASES = [  # (n_sink, window, length): shorter than the window, n_sink = 0, ...
    (0, 4, 3), (0, 4, 20), (2, 3, 17), (4, 8, 40), (1, 1, 10), (3, 5, 2), (4, 8, 12),
    (0, 1, 6), (5, 2, 30)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_sink, window, n", SINK_CASES)
def test_sliding_cache_decoding_equals_masked_full_attention(rng, backend, n_sink, window, n):
    B, H, d_k, d_v = 2, 3, 5, 4
    q, k = rng.standard_normal((2, B, H, n, d_k))
    v = rng.standard_normal((B, H, n, d_v))
    want = reference_attention(q, k, v, allowed=sink_mask_loop(n, n, window, n_sink))
    cache, outs, pointers = SlidingWindowKVCache(window, n_sink=n_sink), [], set()
    for t in range(n):
        keys, values = cache.append(to_backend(k[..., t : t + 1, :], backend),
                                    to_backend(v[..., t : t + 1, :], backend))
        assert cache.held == min(t + 1, n_sink + window) == keys.shape[-2]
        assert cache.length == t + 1
        # slot order is not position order, but the slots hold exactly these positions
        assert sorted(cache.positions.tolist()) == np.flatnonzero(
            sink_mask_loop(1, t + 1, window, n_sink)[0]).tolist()
        np.testing.assert_array_equal(to_numpy(keys), k[..., cache.positions, :])
        outs.append(reference_attention(to_numpy(to_backend(q[..., t : t + 1, :], backend)),
                                        to_numpy(keys), to_numpy(values)))
        pointers.add(keys.data_ptr() if backend == "torch" else keys.__array_interface__["data"][0])
    assert np.abs(np.concatenate(outs, axis=-2) - want).max() < 1e-12
    assert len(pointers) == 1  # one buffer, written in place, for the whole sequence
    assert cache.allocated == n_sink + window
    assert cache.nbytes == B * H * (d_k + d_v) * 8 * min(n, n_sink + window)


@pytest.mark.parametrize("n_sink, window, n", [(2, 3, 17), (0, 4, 20), (4, 8, 40)])
def test_sliding_cache_with_sdpa_and_rope_at_original_positions(rng, n_sink, window, n):
    """Keys rotated at their original position before caching: still the masked result."""
    q, k, v = rng.standard_normal((3, 2, n, 8))
    q_rot, k_rot = apply_rope(q), apply_rope(k)  # positions 0 .. n-1
    mask = attention_sink_mask(n, window=window, n_sink=n_sink)
    want = attnlib.scaled_dot_product_attention(q_rot, k_rot, v, mask)
    cache, outs = SlidingWindowKVCache(window, n_sink), []
    for t in range(n):
        keys, values = cache.append(apply_rope(k[:, t : t + 1], positions=cache.length),
                                    v[:, t : t + 1])
        outs.append(attnlib.scaled_dot_product_attention(q_rot[:, t : t + 1], keys, values))
    assert np.abs(np.concatenate(outs, axis=-2) - want).max() < 1e-12
    # the mask really drops keys: full causal attention differs
    causal = attnlib.scaled_dot_product_attention(q_rot, k_rot, v, causal=True)
    assert np.abs(causal - want).max() > 1e-3


def test_sliding_cache_inside_grouped_query_attention(rng):
    """GroupedQueryAttention with RoPE decodes through the cache (positions = length)."""
    from attnlib.nn.gqa import GroupedQueryAttention

    torch.manual_seed(0)
    n_sink, window, P, n = 2, 5, 6, 25
    attn = GroupedQueryAttention(16, 4, n_kv_heads=2, rope=True, dtype=torch.float64)
    x = torch.randn(2, n, 16, dtype=torch.float64)
    with torch.no_grad():
        want = attn(x, mask=attention_sink_mask(n, window=window, n_sink=n_sink, like=x))
        cache = SlidingWindowKVCache(window, n_sink)
        outs = [attn(x[:, :P], causal=True, cache=cache)]  # prompt: fits, no overwrite
        outs += [attn(x[:, t : t + 1], cache=cache) for t in range(P, n)]
    assert (torch.cat(outs, dim=1) - want).abs().max() < 1e-12
    assert cache.held == n_sink + window and cache.length == n


def test_sliding_cache_chunked_prompt_then_tokens(rng):
    n_sink, window, n = 2, 4, 15
    q, k, v = rng.standard_normal((3, 1, n, 3))
    want = reference_attention(q, k, v, allowed=sink_mask_loop(n, n, window, n_sink))
    cache = SlidingWindowKVCache(window, n_sink)
    keys, values = cache.append(k[:, :4], v[:, :4])
    outs = [attnlib.scaled_dot_product_attention(q[:, :4], keys, values, causal=True)]
    keys, values = cache.append(k[:, 4:6], v[:, 4:6])  # exactly full
    outs.append(attnlib.scaled_dot_product_attention(q[:, 4:6], keys, values, causal=True))
    with pytest.raises(ValueError, match="one position per step"):
        cache.append(k[:, 6:8], v[:, 6:8])
    assert cache.length == 6  # a refused append changes nothing
    for t in range(6, n):
        keys, values = cache.append(k[:, t : t + 1], v[:, t : t + 1])
        outs.append(attnlib.scaled_dot_product_attention(q[:, t : t + 1], keys, values))
    assert np.abs(np.concatenate(outs, axis=-2) - want).max() < 1e-12


def test_sliding_cache_positions_streamingllm_example():
    # StreamingLLM, section 3.2: a cache holding tokens 0, 1, 2, 3, 6, 7, 8 while decoding
    # token 9 assigns positions 0 .. 7 within the cache.
    cache = SlidingWindowKVCache(window=4, n_sink=4)
    for t in range(10):
        cache.append(np.full((1, 1), float(t)), np.zeros((1, 1)))
    assert sorted(cache.positions.tolist()) == [0, 1, 2, 3, 6, 7, 8, 9]
    order = np.argsort(cache.positions)
    assert cache.cache_positions[order].tolist() == list(range(8))
    np.testing.assert_array_equal(cache.keys[:, 0], cache.positions)  # slot s holds that token
    assert [cache.slot(p) for p in (0, 3, 4, 7, 8, 9, 12)] == [0, 3, 4, 7, 4, 5, 4]
    cache.reset()
    assert cache.length == cache.held == 0 and cache.nbytes == 0 and cache.allocated == 8
    assert "window=4, n_sink=4" in repr(cache)


def test_sliding_cache_bad_inputs(rng):
    k = rng.standard_normal((2, 1, 4))
    with pytest.raises(ValueError, match="window"):
        SlidingWindowKVCache(0)
    with pytest.raises(ValueError, match="n_sink"):
        SlidingWindowKVCache(4, n_sink=-1)
    with pytest.raises(ValueError, match="window"):
        attention_sink_mask(3, window=0)
    cache = SlidingWindowKVCache(4)
    with pytest.raises(ValueError, match=r"L = 5"):
        cache.append(rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 5, 4)))
    cache.append(k, k)
    with pytest.raises(ValueError, match="holds keys"):
        cache.append(k[..., :3], k)
    with pytest.raises(TypeError, match="holds float64"):
        cache.append(k.astype(np.float32), k.astype(np.float32))
    with pytest.raises(TypeError, match="cannot mix"):
        cache.append(torch.from_numpy(k), torch.from_numpy(k))
    assert SlidingWindowKVCache(3).keys is None


# ------------------------------------------------------------- int8 quantisation
def quantize_loop(x, granularity):
    """Symmetric absmax int8, one group at a time, from the definition (float64)."""
    x = np.asarray(x, dtype=np.float64)
    data = np.zeros(x.shape, np.int8)
    S, d = x.shape[-2:]
    scale = np.zeros(x.shape[:-2] + ((1, d) if granularity == "channel" else (S, 1)))
    for idx in np.ndindex(*x.shape[:-2]):
        for g in range(d if granularity == "channel" else S):
            group = x[idx][:, g] if granularity == "channel" else x[idx][g, :]
            c = np.abs(group).max() / 127
            codes = [0 if c == 0 else max(-127, min(127, round(val / c))) for val in group]
            if granularity == "channel":
                data[idx][:, g], scale[idx][0, g] = codes, c
            else:
                data[idx][g, :], scale[idx][g, 0] = codes, c
    return data, scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("granularity", ["channel", "token"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (2, 3, 31, 5), (17, 2)])
def test_int8_round_trip_within_half_a_step(rng, backend, dtype, granularity, shape):
    x_np = rng.standard_normal(shape) * rng.uniform(0.1, 10, size=shape[-1])
    x = to_backend(x_np, backend, dtype)
    qt = quantize_int8(x, granularity)
    assert isinstance(qt, Int8Tensor) and qt.granularity == granularity
    assert qt.shape == shape and str(qt.data.dtype).endswith("int8")
    want_scale = shape[:-2] + ((1, shape[-1]) if granularity == "channel" else (shape[-2], 1))
    assert tuple(qt.scale.shape) == want_scale and qt.scale.dtype == x.dtype
    back = qt.dequantize()
    assert type(back) is type(x) and back.dtype == x.dtype and tuple(back.shape) == shape
    eps = np.finfo(dtype).eps
    err = np.abs(to_numpy(back) - to_numpy(x))
    bound = to_numpy(qt.scale) / 2 + 4 * eps * np.abs(to_numpy(x))
    assert np.all(err <= bound)
    codes = to_numpy(qt.data)
    assert codes.min() >= -127 and codes.max() <= 127
    assert np.abs(codes).max(axis=-2 if granularity == "channel" else -1).min() == 127
    if dtype == "float64":  # the same codes and scales as the loop
        ref_data, ref_scale = quantize_loop(x_np, granularity)
        np.testing.assert_array_equal(codes, ref_data)
        np.testing.assert_allclose(to_numpy(qt.scale), ref_scale, rtol=1e-15)


@pytest.mark.parametrize("granularity", ["channel", "token"])
def test_int8_bytes_counted(granularity):
    x = np.ones((2, 3, 31, 5), dtype=np.float32)
    qt = quantize_int8(x, granularity)
    n_scales = 2 * 3 * (5 if granularity == "channel" else 31)
    assert qt.nbytes == 2 * 3 * 31 * 5 * 1 + n_scales * 4
    assert qt.nbytes == qt.data.nbytes + qt.scale.nbytes
    t = quantize_int8(torch.ones(2, 3, 31, 5, dtype=torch.float16), granularity)
    assert t.nbytes == 2 * 3 * 31 * 5 + n_scales * 2


def test_int8_exact_on_the_grid_and_zero_groups():
    c = 0.25
    x = np.array([[127, -3, 0], [5, 127, 0], [-127, 64, 0]], dtype=np.float64) * c
    for granularity in ("channel", "token"):
        qt = quantize_int8(x, granularity)
        back = qt.dequantize()
        assert np.all(np.isfinite(back))
        if granularity == "channel":  # channel 2 is all zero: scale 0, codes 0
            np.testing.assert_array_equal(back, x)
            assert qt.scale[0, 2] == 0 and np.all(qt.data[:, 2] == 0)
    zeros = quantize_int8(np.zeros((2, 3)), "token")
    np.testing.assert_array_equal(zeros.dequantize(), 0)


def test_int8_per_channel_wins_on_outlier_channels(rng):
    """A few channels 20 times larger: per-token scales waste the other channels' bits."""
    k = rng.standard_normal((4, 256, 64))
    k[..., [3, 17, 40]] *= 20
    rel = {g: np.linalg.norm(quantize_int8(k, g).dequantize() - k) / np.linalg.norm(k)
           for g in ("channel", "token")}
    assert rel["channel"] * 1.5 < rel["token"], rel


@pytest.mark.parametrize("args, error, match", [
    (([[1.0, 2.0]], "token"), TypeError, "NumPy array or a torch tensor"),
    ((np.ones((2, 3), dtype=np.int64), "token"), TypeError, "floating"),
    ((np.ones(3), "token"), ValueError, "at least 2 dimensions"),
    ((np.ones((2, 3)), "head"), ValueError, "granularity"),
    ((np.array([[1.0, np.nan]]), "token"), ValueError, "NaN"),
    ((np.array([[1.0, np.inf]]), "channel"), ValueError, "infinite"),
    ((np.ones((0, 3)), "channel"), ValueError, "at least one token"),
])
def test_int8_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        quantize_int8(*args)
