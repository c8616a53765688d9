"""attnlib.kv_cache: the cache against plain concatenation, cached decoding against the
full causal forward, and the memory formulas against hand-computed published numbers."""

import numpy as np
import pytest
import torch
from conftest import BACKENDS, reference_attention, to_backend, to_numpy

import attnlib
from attnlib.kv_cache import (
    PUBLISHED_CONFIGS,
    CacheConfig,
    KVCache,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    kv_cache_elements_per_token,
    mla_cache_elements_per_token,
)

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
