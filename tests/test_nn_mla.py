"""attnlib.nn.mla: multi-head latent attention against Hugging Face's DeepseekV3Attention,
its two decoding paths against each other, and cached decoding against the full forward."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnlib.nn.mla import MLACache, MultiHeadLatentAttention, mla_decode_flops

# d_model, H, d_c, d_c', d_nope, d_rope, d_v
SIZES = dict(d_model=64, n_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=4, v_head_dim=8)


def _module(q_lora_rank=16, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    kw = {**SIZES, **overrides}
    d_model, H = kw.pop("d_model"), kw.pop("n_heads")
    m = MultiHeadLatentAttention(d_model, H, q_lora_rank=q_lora_rank, dtype=dtype, **kw)
    with torch.no_grad():  # norm weights away from 1, so a forgotten norm is caught
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m.eval()


# ------------------------------------------------------------ Hugging Face reference
def _hf_pair(q_lora_rank, rope_interleave, seed=0):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention, DeepseekV3RotaryEmbedding)
    cfg = transformers.DeepseekV3Config(
        hidden_size=SIZES["d_model"], num_attention_heads=SIZES["n_heads"],
        num_key_value_heads=SIZES["n_heads"], q_lora_rank=q_lora_rank,
        kv_lora_rank=SIZES["kv_lora_rank"], qk_nope_head_dim=SIZES["qk_nope_head_dim"],
        qk_rope_head_dim=SIZES["qk_rope_head_dim"], v_head_dim=SIZES["v_head_dim"],
        rope_interleave=rope_interleave, attn_implementation="eager",
        num_hidden_layers=1, vocab_size=11, intermediate_size=32, moe_intermediate_size=16)
    torch.manual_seed(seed)
    ref = DeepseekV3Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():  # every weight random, the RMSNorm gains included
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    return ref, DeepseekV3RotaryEmbedding(cfg)


def _hf_forward(ref, rotary, x, positions):
    B, L, _ = x.shape
    cos, sin = rotary(x, positions)
    mask = torch.full((L, L), -math.inf).triu(1).expand(B, 1, L, L)  # explicit, additive
    return ref(x, position_embeddings=(cos, sin), attention_mask=mask)[0]


@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("path", ["expanded", "absorbed"])
@pytest.mark.parametrize("B, L", [(1, 1), (2, 7), (3, 17)])
def test_matches_deepseek_v3_attention(q_lora_rank, interleaved, path, B, L):
    ref, rotary = _hf_pair(q_lora_rank, interleaved)
    ours = _module(q_lora_rank, dtype=torch.float32, rope_interleaved=interleaved)
    ours.load_deepseek_state_dict(ref.state_dict())
    x = torch.randn(B, L, SIZES["d_model"])
    positions = torch.arange(L).expand(B, L)
    expected = _hf_forward(ref, rotary, x, positions)
    with torch.no_grad():
        got = ours(x, causal=True, path=path)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-5


def test_wrong_rope_pairing_is_detected():
    # The reference test can fail: loading DeepSeek's interleaved weights into a
    # rotate-half module gives different outputs.
    ref, rotary = _hf_pair(16, True)
    wrong = _module(16, dtype=torch.float32, rope_interleaved=False)
    wrong.load_deepseek_state_dict(ref.state_dict())
    x = torch.randn(2, 9, SIZES["d_model"])
    expected = _hf_forward(ref, rotary, x, torch.arange(9).expand(2, 9))
    with torch.no_grad():
        assert (wrong(x, causal=True) - expected).abs().max().item() > 1e-3


def test_load_deepseek_state_dict_rejects_bad_dicts():
    ref, _ = _hf_pair(16, True)
    sd = ref.state_dict()
    m = _module(16, dtype=torch.float32)
    with pytest.raises(ValueError, match="q_a_proj.weight"):
        m.load_deepseek_state_dict({k: v for k, v in sd.items() if k != "q_a_proj.weight"})
    with pytest.raises(ValueError, match="unexpected"):
        m.load_deepseek_state_dict({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="o_proj.weight"):
        m.load_deepseek_state_dict({**sd, "o_proj.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="bias"):
        m.load_deepseek_state_dict({**sd, "o_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match="q_proj.weight"):  # q_lora_rank mismatch
        _module(None, dtype=torch.float32).load_deepseek_state_dict(sd)


# ------------------------------------------------------------ the two paths, the cache
@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("B, L", [(1, 1), (2, 3), (3, 17)])
def test_expanded_and_absorbed_paths_are_equal(q_lora_rank, B, L):
    m = _module(q_lora_rank)
    x = torch.randn(B, L, SIZES["d_model"], dtype=torch.float64)
    keep = torch.rand(B, 1, L, L) > 0.3  # an arbitrary boolean mask, True = may attend
    keep[..., 0] = True
    bias = torch.randn(B, SIZES["n_heads"], L, L, dtype=torch.float64)  # added to the scores
    with torch.no_grad():
        for kwargs in ({"causal": True}, {"mask": keep}, {}, {"mask": keep, "causal": True},
                       {"mask": bias, "causal": True}, {"mask": bias[:, :1]}):
            a = m(x, path="expanded", **kwargs)
            b = m(x, path="absorbed", **kwargs)
            assert (a - b).abs().max().item() < 1e-10, kwargs


def test_equality_check_catches_a_wrong_absorption(monkeypatch):
    # If W_UK were reshaped per head in the wrong order (d_nope, H, d_c instead of
    # H, d_nope, d_c), the absorbed path would differ: the equality test can fail.
    m = _module(16)
    x = torch.randn(2, 5, SIZES["d_model"], dtype=torch.float64)
    H, dn, dc = SIZES["n_heads"], SIZES["qk_nope_head_dim"], SIZES["kv_lora_rank"]
    right = m.absorbed_weights
    monkeypatch.setattr(m, "absorbed_weights", lambda: (
        m.k_up.weight.view(dn, H, dc).transpose(0, 1), right()[1]))
    with torch.no_grad():
        diff = (m(x, causal=True) - m(x, causal=True, path="absorbed")).abs().max()
    assert diff.item() > 1e-3


def test_absorbed_path_gives_the_same_gradients():
    m = _module(16)
    x = torch.randn(2, 6, SIZES["d_model"], dtype=torch.float64)
    grads = []
    for path in ("expanded", "absorbed"):
        m.zero_grad()
        m(x, causal=True, path=path).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        assert (grads[0][name] - grads[1][name]).abs().max().item() < 1e-9, name


@pytest.mark.parametrize("path", ["expanded", "absorbed"])
@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("B, n, prefill", [(1, 1, 0), (2, 17, 0), (3, 31, 5), (2, 4, 3)])
def test_cached_decoding_equals_full_causal_forward(path, q_lora_rank, B, n, prefill):
    m = _module(q_lora_rank)
    x = torch.randn(B, n, SIZES["d_model"], dtype=torch.float64)
    cache = MLACache()
    with torch.no_grad():
        full = m(x, causal=True)
        outs = [m(x[:, :prefill], causal=True, cache=cache, path=path)] if prefill else []
        for t in range(prefill, n):
            outs.append(m(x[:, t:t + 1], cache=cache, path=path))
    step = torch.cat(outs, dim=1)
    assert step.shape == full.shape
    assert (step - full).abs().max().item() < 1e-10
    # the cache holds exactly the latents and the one shared rotated key, nothing per head
    d_c, d_r = SIZES["kv_lora_rank"], SIZES["qk_rope_head_dim"]
    assert len(cache) == n
    assert tuple(cache.latent.shape) == (B, n, d_c)
    assert tuple(cache.rope_key.shape) == (B, n, d_r)
    assert cache.numel() == B * n * (d_c + d_r) == B * n * m.cache_elements_per_token()
    assert cache.nbytes == 8 * cache.numel()
    with torch.no_grad():
        c_kv, k_rope = m.latents(x, 0)
    assert (cache.latent - c_kv).abs().max().item() < 1e-12
    assert (cache.rope_key - k_rope).abs().max().item() < 1e-12


def test_preallocated_cache_and_overflow():
    m = _module(None)
    x = torch.randn(2, 6, SIZES["d_model"], dtype=torch.float64)
    cache = MLACache(capacity=6)
    with torch.no_grad():
        full = m(x, causal=True, path="absorbed")
        outs = [m(x[:, :2], causal=True, cache=cache)]
        outs += [m(x[:, t:t + 1], cache=cache, path="absorbed") for t in range(2, 6)]
        assert (torch.cat(outs, dim=1) - full).abs().max().item() < 1e-10
        with pytest.raises(ValueError, match="capacity"):
            m(x[:, :1], cache=cache)


def test_decoding_without_causal_flag_for_one_token_but_not_for_prefill():
    # A one-token step needs no mask; a multi-token prefill without causal=True sees
    # the future and must differ from the causal forward (the test can fail).
    m = _module(16)
    x = torch.randn(1, 6, SIZES["d_model"], dtype=torch.float64)
    with torch.no_grad():
        full = m(x, causal=True)
        cache = MLACache()
        leaky = m(x[:, :4], cache=cache)  # no causal flag
    assert (leaky - full[:, :4]).abs().max().item() > 1e-6


def test_positions_relative_and_explicit():
    m = _module(16)
    x = torch.randn(2, 9, SIZES["d_model"], dtype=torch.float64)
    with torch.no_grad():
        base = m(x, causal=True)
        shifted = m(x, causal=True, positions=100)          # RoPE: only offsets matter
        explicit = m(x, causal=True, positions=torch.arange(9) + 100)
        per_row = m(x, causal=True, positions=torch.stack([torch.arange(9),
                                                          torch.arange(9) + 7]))
        reversed_pos = m(x, causal=True, positions=torch.arange(9).flip(0))
    assert (shifted - base).abs().max().item() < 1e-9
    assert (explicit - shifted).abs().max().item() < 1e-12
    assert (per_row - base).abs().max().item() < 1e-9
    assert (reversed_pos - base).abs().max().item() > 1e-4  # positions do matter


# ------------------------------------------------------------ FLOP counts
def _count(fn):
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("q_lora_rank", [16, None])
@pytest.mark.parametrize("S", [1, 2, 17])
def test_decode_flops_match_torch_flop_counter(q_lora_rank, S):
    m = _module(q_lora_rank, dtype=torch.float32)
    x = torch.randn(1, S, SIZES["d_model"])
    expected = m.decode_flops(S)
    for path in ("expanded", "absorbed"):
        cache = MLACache()
        with torch.no_grad():
            if S > 1:
                m(x[:, :-1], causal=True, cache=cache)
        assert _count(lambda: m(x[:, -1:], cache=cache, path=path)) == expected[path], path

    # "cached_kv": keys and values already expanded; only the new token's work remains
    with torch.no_grad():
        k, v = m.expand(*m.latents(x, 0))
    from attnlib import scaled_dot_product_attention

    def cached_kv_step():
        q_nope, q_rope = m.queries(x[:, -1:], S - 1)
        m.latents(x[:, -1:], S - 1)
        o = scaled_dot_product_attention(torch.cat([q_nope, q_rope], -1), k, v, scale=m.scale)
        m.out_proj(o.transpose(1, 2).reshape(1, 1, -1))
    assert _count(cached_kv_step) == expected["cached_kv"]


def test_decode_flops_formula_by_hand():
    f = mla_decode_flops(10, d_model=2, n_heads=1, kv_lora_rank=3, qk_nope_head_dim=1,
                         qk_rope_head_dim=2, v_head_dim=1)
    shared = 2 * 2 * 3 + 2 * 2 * 5 + 2 * 1 * 2          # q, latent + rope key, W_O
    assert f["cached_kv"] == shared + 2 * 10 * 3 + 2 * 10 * 1
    assert f["expanded"] == f["cached_kv"] + 2 * 10 * 3 * 2
    assert f["absorbed"] == shared + 2 * 3 + 2 * 10 * 5 + 2 * 10 * 3 + 2 * 3
    with pytest.raises(ValueError, match="context_length"):
        mla_decode_flops(0, d_model=2, n_heads=1, kv_lora_rank=3, qk_nope_head_dim=1,
                         qk_rope_head_dim=2, v_head_dim=1)


# ------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("name, value", [
    ("kv_lora_rank", 0), ("kv_lora_rank", -4), ("q_lora_rank", 0), ("qk_nope_head_dim", 0),
    ("qk_rope_head_dim", 0), ("qk_rope_head_dim", 3), ("v_head_dim", -1),
    ("kv_lora_rank", 2.5), ("rope_base", 1.0), ("norm_eps", -1.0)])
def test_bad_config_raises_naming_the_argument(name, value):
    kw = {**SIZES, "q_lora_rank": 16, name: value}
    d_model, H = kw.pop("d_model"), kw.pop("n_heads")
    with pytest.raises(ValueError, match=name):
        MultiHeadLatentAttention(d_model, H, **kw)


@pytest.mark.parametrize("name, value", [("d_model", 0), ("n_heads", -2)])
def test_bad_width_raises(name, value):
    kw = {**SIZES, name: value}
    d_model, H = kw.pop("d_model"), kw.pop("n_heads")
    with pytest.raises(ValueError, match=name):
        MultiHeadLatentAttention(d_model, H, **kw)


def test_bad_inputs():
    m = _module(16)
    x = torch.randn(2, 3, SIZES["d_model"], dtype=torch.float64)
    with pytest.raises(ValueError, match="d_model"):
        m(torch.randn(2, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="path"):
        m(x, path="merged")
    with pytest.raises(TypeError, match="MLACache"):
        m(x, cache={})
    cache = MLACache()
    m(x, cache=cache, causal=True)
    with pytest.raises(ValueError, match="batch"):
        m(x[:1], cache=cache)
    with pytest.raises(ValueError, match="mask"):  # mask over the wrong number of keys
        m(x, mask=torch.ones(3, 4, dtype=torch.bool))
