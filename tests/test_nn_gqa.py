"""attnlib.nn.gqa: grouped-query attention against torch's enable_gqa, a from-scratch
reference, Hugging Face's LlamaAttention (weights copied in), and cached decoding
against the full causal forward."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, reference_attention, to_backend, to_numpy
from torch import nn

from attnlib.kv_cache import KVCache
from attnlib.nn.gqa import (
    GroupedQueryAttention,
    grouped_query_attention,
    mha_to_gqa,
    pool_kv_heads,
    repeat_kv,
)
from attnlib.nn.multihead import MultiHeadAttention

# (B, H, H_kv, L, S, d_k, d_v)
SHAPES = [(1, 1, 1, 1, 1, 2, 2), (2, 8, 2, 3, 3, 4, 4), (2, 6, 3, 17, 31, 8, 5),
          (1, 4, 1, 31, 17, 3, 7), (3, 3, 3, 2, 5, 16, 16), (1, 2, 1, 1, 9, 4, 4)]


def _expand_kv(x, H):
    """From scratch: key/value head for query head i is i // (H // H_kv), by indexing."""
    H_kv = x.shape[-3]
    return x[..., [i // (H // H_kv) for i in range(H)], :, :]


# ------------------------------------------------------------------ the function
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B, H, H_kv, L, S, d_k, d_v", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_function_matches_reference(rng, backend, B, H, H_kv, L, S, d_k, d_v, causal):
    q = rng.standard_normal((B, H, L, d_k))
    k = rng.standard_normal((B, H_kv, S, d_k))
    v = rng.standard_normal((B, H_kv, S, d_v))
    allowed = np.tril(np.ones((L, S), bool), S - L) if causal else None  # bottom-right
    want = reference_attention(q, _expand_kv(k, H), _expand_kv(v, H), allowed=allowed)
    got = grouped_query_attention(*(to_backend(a, backend) for a in (q, k, v)), causal=causal)
    assert got.shape == (B, H, L, d_v)
    assert np.abs(to_numpy(got) - want).max() < 1e-12


@pytest.mark.parametrize("B, H, H_kv, L, S, d_k, d_v", SHAPES)
@pytest.mark.parametrize("mask_kind", ["none", "bool_per_head", "bool_shared", "float", "causal"])
def test_function_matches_torch_enable_gqa(rng, B, H, H_kv, L, S, d_k, d_v, mask_kind):
    q = torch.randn(B, H, L, d_k, dtype=torch.float64)
    k = torch.randn(B, H_kv, S, d_k, dtype=torch.float64)
    v = torch.randn(B, H_kv, S, d_v, dtype=torch.float64)
    mask, kwargs = None, {}
    if mask_kind == "bool_per_head":
        mask = torch.rand(B, H, L, S) > 0.3
        mask[..., 0] = True  # no empty rows (torch and attnlib agree there too, but keep it plain)
    elif mask_kind == "bool_shared":
        mask = torch.rand(B, 1, 1, S) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(L, S, dtype=torch.float64)
    ref_mask = mask
    if mask_kind == "causal":
        ref_mask = torch.ones(L, S, dtype=torch.bool).tril(S - L)  # bottom-right
        kwargs["causal"] = True
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=ref_mask, enable_gqa=True)
    got, w = grouped_query_attention(q, k, v, mask, return_weights=True, **kwargs)
    assert (got - ref).abs().max() < 1e-12
    assert w.shape == (B, H, L, S)
    has_key = torch.ones(B, H, L, S, dtype=torch.bool) if ref_mask is None else \
        ref_mask.expand(B, H, L, S) if ref_mask.dtype == torch.bool else \
        torch.ones(B, H, L, S, dtype=torch.bool)
    assert (w.sum(-1) - has_key.any(-1).double()).abs().max() < 1e-12  # 1, or 0 if no key
    assert (w @ _expand_kv(v, H) - ref).abs().max() < 1e-12  # weights per query head


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeat_kv_and_mapping(rng, backend):
    x = to_backend(rng.standard_normal((2, 3, 5, 4)), backend)
    r = to_numpy(repeat_kv(x, 4))  # (2, 12, 5, 4)
    for i in range(12):
        np.testing.assert_array_equal(r[:, i], to_numpy(x)[:, i // 4])
    assert repeat_kv(x, 1) is x
    q, k, v = rng.standard_normal((2, 12, 3, 4)), to_numpy(x), rng.standard_normal((2, 3, 5, 6))
    a = grouped_query_attention(q, k, v)
    b = reference_attention(q, repeat_kv(k, 4), repeat_kv(v, 4))
    assert np.abs(a - b).max() < 1e-12


def test_function_errors(rng):
    q, k = rng.standard_normal((1, 6, 2, 4)), rng.standard_normal((1, 4, 3, 4))
    with pytest.raises(ValueError, match=r"H_kv = 4 must divide .* H = 6"):
        grouped_query_attention(q, k, k)
    with pytest.raises(ValueError, match="does not broadcast"):
        grouped_query_attention(q, k[:, :2], k[:, :2], np.ones((1, 6, 2, 5), bool))
    with pytest.raises(ValueError, match="does not broadcast"):
        grouped_query_attention(q, k[:, :2], k[:, :2], np.ones((1, 4, 2, 3), bool))
    with pytest.raises(ValueError, match="same width d_k"):
        grouped_query_attention(q, k[:, :2, :, :3], k[:, :2])
    with pytest.raises(TypeError, match="cannot mix"):
        grouped_query_attention(q, torch.from_numpy(k[:, :2]), k[:, :2])


# ------------------------------------------------------------------ the module
def _layer(d_model, H, H_kv, *, seed=0, rope=False, bias=False, head_dim=None):
    torch.manual_seed(seed)
    layer = GroupedQueryAttention(d_model, H, H_kv, head_dim=head_dim, rope=rope, bias=bias,
                                  dtype=torch.float64)
    if bias:
        with torch.no_grad():
            for p in layer.parameters():
                if p.ndim == 1:
                    p.normal_()
    return layer


def _decode(layer, x, chunks, capacity=None):
    cache, outs, start = KVCache(capacity), [], 0
    with torch.no_grad():
        for n in chunks:
            outs.append(layer(x[:, start:start + n], cache=cache, causal=True))
            start += n
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("H, H_kv", [(8, 8), (8, 2), (8, 1), (6, 3), (1, 1)])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("chunks, capacity", [([1] * 11, None), ([5, 1, 1, 1, 3], 11),
                                               ([2, 2, 7], 12)])
def test_cached_decoding_equals_full_forward(H, H_kv, rope, chunks, capacity):
    layer = _layer(48, H, H_kv, seed=H * 10 + H_kv, rope=rope, bias=True)
    x = torch.randn(3, sum(chunks), 48, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x, causal=True)
    got, cache = _decode(layer, x, chunks, capacity)
    assert (got - full).abs().max() < 1e-10
    assert cache.length == x.shape[1] and cache.keys.shape == (3, H_kv, x.shape[1], 48 // H)
    # without the causal mask the full forward is a different function: the test can fail
    with torch.no_grad():
        assert (layer(x) - full)[:, :-1].abs().max() > 1e-3


def test_rope_positions_matter_when_decoding():
    """Forgetting the offset (every new token at position 0) breaks the equality."""
    layer = _layer(16, 4, 2, rope=True)
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x, causal=True)
        cache = KVCache()
        wrong = torch.cat([layer(x[:, t:t + 1], cache=cache, positions=0) for t in range(6)], 1)
        cache.reset()
        explicit = torch.cat([layer(x[:, t:t + 1], cache=cache, positions=torch.tensor([t]))
                              for t in range(6)], 1)
    assert (explicit - full).abs().max() < 1e-10
    assert (wrong - full)[:, 1:].abs().max() > 1e-3


def test_mha_special_case_equals_multihead_attention():
    mha = MultiHeadAttention(24, 4, bias=True, dtype=torch.float64)
    gqa = mha_to_gqa(mha, 4)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    mask = torch.rand(2, 1, 7, 7) > 0.2
    with torch.no_grad():
        for kwargs in ({}, {"causal": True}, {"mask": mask}):
            assert (gqa(x, **kwargs) - mha(x, **kwargs)).abs().max() < 1e-12


def test_mqa_equals_mha_with_identical_kv_heads():
    """MQA is MHA whose H key (and value) heads are all the same head."""
    mqa = _layer(16, 4, 1, bias=True)
    mha = GroupedQueryAttention(16, 4, 4, bias=True, dtype=torch.float64)
    with torch.no_grad():
        for name in ("q_proj", "out_proj"):
            getattr(mha, name).load_state_dict(getattr(mqa, name).state_dict())
        for name in ("k_proj", "v_proj"):
            getattr(mha, name).weight.copy_(getattr(mqa, name).weight.repeat(4, 1))
            getattr(mha, name).bias.copy_(getattr(mqa, name).bias.repeat(4))
        x = torch.randn(2, 5, 16, dtype=torch.float64)
        assert (mqa(x, causal=True) - mha(x, causal=True)).abs().max() < 1e-12


def test_module_weights_and_shapes():
    layer = GroupedQueryAttention(64, 8, 2, head_dim=16, dtype=torch.float64)
    assert layer.q_proj.weight.shape == (128, 64) and layer.k_proj.weight.shape == (32, 64)
    assert layer.out_proj.weight.shape == (64, 128)
    x = torch.randn(2, 5, 64, dtype=torch.float64)
    out, w = layer(x, return_weights=True)
    assert out.shape == (2, 5, 64) and w.shape == (2, 8, 5, 5)
    # head i of the weights uses KV head i // 4: recompute head 5 by hand
    q = layer.q_proj(x).view(2, 5, 8, 16)[:, :, 5]  # (B, L, d_h)
    k = layer.k_proj(x).view(2, 5, 2, 16)[:, :, 5 // 4]
    w5 = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)
    assert (w[:, 5] - w5).abs().max() < 1e-12


def test_module_errors():
    with pytest.raises(ValueError, match=r"n_kv_heads = 3 must divide n_heads = 8"):
        GroupedQueryAttention(64, 8, 3)
    with pytest.raises(ValueError, match=r"n_heads = 6 must divide d_model = 64"):
        GroupedQueryAttention(64, 6, 2)
    GroupedQueryAttention(64, 6, 2, head_dim=8)  # fine with an explicit head_dim
    with pytest.raises(ValueError, match="head_dim must be even"):
        GroupedQueryAttention(15, 5, 1, rope=True)
    with pytest.raises(ValueError, match="n_kv_heads must be a positive integer"):
        GroupedQueryAttention(8, 2, 0)
    layer = GroupedQueryAttention(8, 2, 1)
    with pytest.raises(ValueError, match=r"\(B, L, d_model = 8\)"):
        layer(torch.randn(2, 3, 7))
    cache = KVCache(capacity=3)
    with torch.no_grad():
        layer(torch.randn(1, 3, 8), cache=cache, causal=True)
        with pytest.raises(ValueError, match="capacity = 3"):
            layer(torch.randn(1, 1, 8), cache=cache)


# ------------------------------------------------------- Hugging Face's LlamaAttention
def _rope_cos_sin(position_ids, head_dim, base, dtype):
    """From scratch, in float64: Llama's cos/sin tables (rotate-half: frequencies twice)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = position_ids[..., None].to(torch.float64) * inv_freq  # (B, L, d/2)
    emb = torch.cat([angles, angles], dim=-1)  # (B, L, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _llama_pair(dtype, impl, H=8, H_kv=2, d_model=64, head_dim=8, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = transformers.LlamaConfig(hidden_size=d_model, num_attention_heads=H,
                                      num_key_value_heads=H_kv, head_dim=head_dim,
                                      attention_bias=False, intermediate_size=32,
                                      num_hidden_layers=1, vocab_size=32,
                                      max_position_embeddings=128)
    config._attn_implementation = impl
    torch.manual_seed(seed)
    ref = LlamaAttention(config, layer_idx=0).to(dtype).eval()
    rotary = LlamaRotaryEmbedding(config).to(dtype)
    ours = GroupedQueryAttention(d_model, H, H_kv, head_dim=head_dim, rope=True,
                                 rope_base=config.rope_parameters["rope_theta"], dtype=dtype)
    with torch.no_grad():
        for mine, theirs in (("q_proj", "q_proj"), ("k_proj", "k_proj"),
                             ("v_proj", "v_proj"), ("out_proj", "o_proj")):
            getattr(ours, mine).weight.copy_(getattr(ref, theirs).weight)
    return ref, rotary, ours


def _additive_causal(L, S, dtype):
    allowed = torch.ones(L, S, dtype=torch.bool).tril(S - L)  # bottom-right
    return torch.zeros(1, 1, L, S, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


@pytest.mark.parametrize("dtype, impl, atol", [(torch.float32, "eager", 1e-5),
                                                (torch.float64, "sdpa", 1e-10)])
@pytest.mark.parametrize("H, H_kv", [(8, 2), (8, 1), (8, 8)])
@pytest.mark.parametrize("offset", [0, 5])
def test_matches_llama_attention(dtype, impl, atol, H, H_kv, offset):
    ref, rotary, ours = _llama_pair(dtype, impl, H, H_kv)
    B, L = 2, 9
    x = torch.randn(B, L, 64, dtype=dtype)
    position_ids = torch.arange(offset, offset + L)[None].expand(B, L)
    with torch.no_grad():
        # float32: Llama's own rotary tables; float64: exact tables (Llama computes its
        # angles in float32, which alone leaves errors of ~1e-8)
        cos_sin = rotary(x, position_ids) if dtype == torch.float32 else \
            _rope_cos_sin(position_ids, 8, ours.rope_base, dtype)
        want, _ = ref(x, position_embeddings=cos_sin,
                      attention_mask=_additive_causal(L, L, dtype))
        got = ours(x, causal=True, positions=offset)
        got_ids = ours(x, causal=True, positions=position_ids)
    assert (got - want).abs().max() < atol
    assert (got_ids - want).abs().max() < atol


def test_llama_decoding_with_cache():
    """Token-by-token decoding with our cache equals Llama's full causal forward."""
    ref, _, ours = _llama_pair(torch.float64, "sdpa")
    x = torch.randn(1, 7, 64, dtype=torch.float64)
    with torch.no_grad():
        cos_sin = _rope_cos_sin(torch.arange(7)[None], 8, ours.rope_base, torch.float64)
        want, _ = ref(x, position_embeddings=cos_sin,
                      attention_mask=_additive_causal(7, 7, torch.float64))
    got, _ = _decode(ours, x, [3, 1, 1, 1, 1])
    assert (got - want).abs().max() < 1e-10


# ------------------------------------------------------------------ MHA -> GQA
def _pool_by_loops(w, H, H_kv):
    """From scratch: w (out = H*d, in); key/value head j = mean of heads j*G .. j*G+G-1."""
    d, G = w.shape[0] // H, H // H_kv
    heads = [w[h * d:(h + 1) * d] for h in range(H)]
    return torch.cat([sum(heads[j * G:(j + 1) * G]) / G for j in range(H_kv)])


@pytest.mark.parametrize("H_kv", [1, 2, 4])
def test_mha_to_gqa_pools_by_mean(H_kv):
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, 8, bias=True, dtype=torch.float64)
    gqa = mha_to_gqa(mha, H_kv)
    assert gqa.n_kv_heads == H_kv and gqa.n_heads == 8 and gqa.head_dim == 4
    for name in ("k_proj", "v_proj"):
        want = _pool_by_loops(getattr(mha, name).weight, 8, H_kv)
        assert (getattr(gqa, name).weight - want).abs().max() < 1e-15
        want_b = _pool_by_loops(getattr(mha, name).bias[:, None], 8, H_kv)[:, 0]
        assert (getattr(gqa, name).bias - want_b).abs().max() < 1e-15
    assert torch.equal(gqa.q_proj.weight, mha.q_proj.weight)
    assert torch.equal(gqa.out_proj.weight, mha.out_proj.weight)


def test_mha_to_gqa_identity_exact_and_lossy():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    mha = MultiHeadAttention(32, 8, bias=False, dtype=torch.float64)
    with torch.no_grad():
        want = mha(x, causal=True)
        # n_kv_heads = n_heads: the identity
        assert (mha_to_gqa(mha, 8)(x, causal=True) - want).abs().max() < 1e-12
        # random heads: the conversion changes the function
        lossy = (mha_to_gqa(mha, 2)(x, causal=True) - want).abs().max()
        assert lossy > 1e-2
        # heads equal within each group of 4: exact
        for lin in (mha.k_proj, mha.v_proj):
            w = lin.weight.view(2, 4, 4, 32)  # (H_kv, G, d_h, d_model)
            lin.weight.copy_(w[:, :1].expand_as(w).reshape(32, 32))
        want = mha(x, causal=True)
        assert (mha_to_gqa(mha, 2)(x, causal=True) - want).abs().max() < 1e-12


def test_mha_to_gqa_sources():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch_mha = nn.MultiheadAttention(12, 3, batch_first=True, dtype=torch.float64).eval()
    with torch.no_grad():
        want = torch_mha(x, x, x, need_weights=False)[0]
        assert (mha_to_gqa(torch_mha, 3)(x) - want).abs().max() < 1e-12
        # a dict of weights in the book's (in, out) form
        ours = MultiHeadAttention.from_torch(torch_mha)
        gqa = mha_to_gqa({k: v.detach() for k, v in ours.matrices().items()}, 3, n_heads=3)
        assert (gqa(x) - want).abs().max() < 1e-12
        # GQA -> fewer KV heads: pooling in two steps = pooling in one
        src = _layer(16, 8, 4, rope=True)
        two = mha_to_gqa(mha_to_gqa(src, 2), 1)
        one = mha_to_gqa(src, 1)
        assert two.rope and one.rope
        y = torch.randn(1, 4, 16, dtype=torch.float64)
        assert (two(y) - one(y)).abs().max() < 1e-12
    with pytest.raises(ValueError, match=r"n_kv_heads = 3 must divide n_heads = 8"):
        mha_to_gqa(MultiHeadAttention(16, 8), 3)
    with pytest.raises(ValueError, match="must divide the source's"):
        mha_to_gqa(_layer(16, 8, 2), 4)
    with pytest.raises(ValueError, match="give n_heads"):
        mha_to_gqa({"w_q": torch.eye(4)}, 1)
    with pytest.raises(TypeError, match="MultiHeadAttention"):
        mha_to_gqa(nn.Linear(4, 4), 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pool_kv_heads_backends(rng, backend):
    w = rng.standard_normal((5, 6 * 3))  # (in, H*d) with H = 6, d = 3
    got = to_numpy(pool_kv_heads(to_backend(w, backend), 6, 2))
    want = _pool_by_loops(torch.from_numpy(w.T), 6, 2).numpy().T
    assert np.abs(got - want).max() < 1e-15
    with pytest.raises(ValueError, match=r"n_kv_heads = 4 must divide n_heads = 6"):
        pool_kv_heads(to_backend(w, backend), 6, 4)
    with pytest.raises(ValueError, match="n_heads = 4 must divide the last dimension"):
        pool_kv_heads(to_backend(w, backend), 4, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_per_head_mask_with_causal(rng, backend):
    q = rng.standard_normal((2, 6, 3, 4))
    k, v = rng.standard_normal((2, 2, 2, 5, 4))
    m = rng.standard_normal((2, 6, 3, 5))
    allowed = np.tril(np.ones((3, 5), bool), 2)  # bottom-right
    ref = F.scaled_dot_product_attention(
        *(torch.from_numpy(a) for a in (q, k, v)),
        attn_mask=torch.from_numpy(np.where(allowed, m, -np.inf)), enable_gqa=True)
    got = grouped_query_attention(*(to_backend(a, backend) for a in (q, k, v, m)), causal=True)
    assert np.abs(to_numpy(got) - ref.numpy()).max() < 1e-12
