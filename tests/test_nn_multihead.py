"""attnlib.nn.MultiHeadAttention against torch.nn.MultiheadAttention with copied weights."""

import pytest
import torch
from torch import nn

from attnlib.nn.multihead import MultiHeadAttention

ATOL = 1e-5  # float32


def _pair(E, H, seed=0, **kwargs):
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(E, H, batch_first=True, **kwargs).eval()
    with torch.no_grad():  # non-zero biases, so a mix-up of biases is caught
        for p in mha.parameters():
            if p.ndim == 1:
                p.normal_()
    return mha, MultiHeadAttention.from_torch(mha)


def _close(a, b, atol=ATOL):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err < atol, err


# (B, L, S, E, H)
SHAPES = [(1, 1, 1, 1, 1), (2, 3, 3, 6, 2), (2, 17, 31, 12, 3), (3, 5, 2, 16, 4),
          (1, 31, 17, 8, 8)]


@pytest.mark.parametrize("B, L, S, E, H", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_cross_attention_matches_torch(B, L, S, E, H, bias):
    mha, ours = _pair(E, H, bias=bias)
    q, kv = torch.randn(B, L, E), torch.randn(B, S, E)
    ref, ref_w = mha(q, kv, kv)
    out, w = ours(q, kv, return_weights=True)
    _close(out, ref)
    _close(w, ref_w)
    ref_w_heads = mha(q, kv, kv, average_attn_weights=False)[1]
    _close(ours(q, kv, return_weights=True, average_weights=False)[1], ref_w_heads)


@pytest.mark.parametrize("B, L, S, E, H", SHAPES)
def test_self_attention_and_separate_value(B, L, S, E, H):
    mha, ours = _pair(E, H, seed=1)
    x, k, v = torch.randn(B, L, E), torch.randn(B, S, E), torch.randn(B, S, E)
    _close(ours(x), mha(x, x, x)[0])
    _close(ours(x, k, v), mha(x, k, v)[0])


def test_kdim_vdim_matches_torch():
    mha, ours = _pair(12, 3, kdim=5, vdim=7)
    q, k, v = torch.randn(2, 4, 12), torch.randn(2, 6, 5), torch.randn(2, 6, 7)
    ref, ref_w = mha(q, k, v)
    out, w = ours(q, k, v, return_weights=True)
    _close(out, ref)
    _close(w, ref_w)


@pytest.mark.parametrize("L, S", [(6, 6), (3, 7), (17, 31)])
def test_key_padding_matches_torch(L, S):
    mha, ours = _pair(12, 4, seed=2)
    lengths = torch.tensor([S, 1, S - 2])
    q, kv = torch.randn(3, L, 12), torch.randn(3, S, 12)
    torch_kpm = torch.arange(S)[None, :] >= lengths[:, None]  # (B, S), True = ignore
    ref, ref_w = mha(q, kv, kv, key_padding_mask=torch_kpm)
    out, w = ours(q, kv, key_lengths=lengths, return_weights=True)
    _close(out, ref)
    _close(w, ref_w)
    # the same through `mask` in attnlib's convention (True = may attend)
    _close(ours(q, kv, mask=~torch_kpm[:, None, None, :]), ref)


def test_causal_matches_torch_attn_mask():
    mha, ours = _pair(12, 3, seed=3)
    x = torch.randn(2, 9, 12)
    forbid = torch.triu(torch.ones(9, 9, dtype=torch.bool), 1)  # torch: True = forbidden
    ref, ref_w = mha(x, x, x, attn_mask=forbid)
    out, w = ours(x, causal=True, return_weights=True)
    _close(out, ref)
    _close(w, ref_w)
    _close(ours(x, mask=~forbid), ref)
    # causal and key padding together
    lengths = torch.tensor([9, 4])
    kpm = torch.arange(9)[None, :] >= lengths[:, None]
    ref = mha(x, x, x, attn_mask=forbid, key_padding_mask=kpm)[0]
    _close(ours(x, causal=True, key_lengths=lengths), ref)


def test_float_mask_with_key_lengths():
    mha, ours = _pair(8, 2, seed=4)
    x = torch.randn(2, 5, 8)
    bias = torch.randn(5, 5)
    lengths = torch.tensor([5, 3])
    kpm = torch.arange(5)[None, :] >= lengths[:, None]
    kpm = torch.zeros(2, 5).masked_fill(kpm, float("-inf"))  # float, like attn_mask
    ref = mha(x, x, x, attn_mask=bias, key_padding_mask=kpm)[0]
    _close(ours(x, mask=bias, key_lengths=lengths), ref)


def test_fully_padded_sequence_zeros_where_torch_gives_nan():
    mha, ours = _pair(8, 2, seed=5)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    lengths = torch.tensor([4, 0])  # sequence 1 has no real key
    kpm = torch.arange(4)[None, :] >= lengths[:, None]
    ref, ref_w = mha(q, kv, kv, key_padding_mask=kpm)
    assert torch.isnan(ref[1]).all() and torch.isnan(ref_w[1]).all()
    out, w = ours(q, kv, key_lengths=lengths, return_weights=True)
    assert torch.isfinite(out).all()
    _close(out[0], ref[0])
    _close(w[0], ref_w[0])
    assert (w[1] == 0).all()
    # zero weights -> zero heads -> the output is the output projection's bias
    _close(out[1], ours.out_proj.bias.expand(3, 8))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_gradients_match_torch():
    mha, ours = _pair(12, 3, seed=6)
    x = torch.randn(2, 7, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    mha(x, x, x)[0].square().sum().backward()
    ours(x2).square().sum().backward()
    _close(x2.grad, x.grad, 1e-4)
    E = 12
    for i, lin in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
        _close(lin.weight.grad, mha.in_proj_weight.grad[i * E:(i + 1) * E], 1e-4)
    _close(ours.out_proj.weight.grad, mha.out_proj.weight.grad, 1e-4)


@pytest.mark.parametrize("E", [8, 12, 24])
def test_parameter_count_does_not_depend_on_heads(E):
    counts = set()
    for H in [h for h in range(1, E + 1) if E % h == 0]:
        n = sum(p.numel() for p in MultiHeadAttention(E, H).parameters())
        assert n == sum(p.numel() for p in nn.MultiheadAttention(E, H).parameters())
        counts.add(n)
    assert counts == {4 * E * E + 4 * E}


def test_bad_heads_names_both():
    with pytest.raises(ValueError) as info:
        MultiHeadAttention(10, 3)
    msg = str(info.value)
    assert "n_heads = 3" in msg and "d_model = 10" in msg
    with pytest.raises(ValueError, match="n_heads must be a positive integer"):
        MultiHeadAttention(8, 0)


def test_load_from_torch_checks_shapes():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(ValueError, match=r"\(8, 2, 8, 8\)"):
        MultiHeadAttention(8, 4).load_from_torch(mha)
    with pytest.raises(ValueError, match="bias"):
        MultiHeadAttention(8, 2, bias=False).load_from_torch(mha)
    with pytest.raises(TypeError, match="nn.MultiheadAttention"):
        MultiHeadAttention(8, 2).load_from_torch(nn.Linear(8, 8))


def test_mask_without_head_axis_is_refused():
    ours = MultiHeadAttention(8, 2)
    x = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match=r"mask\[:, None\]"):
        ours(x, mask=torch.ones(3, 4, 4, dtype=torch.bool))


def test_returns_tensor_without_weights_and_float64():
    mha, ours = _pair(6, 3, seed=7)
    mha, ours = mha.double(), ours.double()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    out = ours(x)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    _close(out, mha(x, x, x)[0], 1e-12)


def test_matrices_drive_the_numpy_function(rng):
    """The module's weights, handed to the NumPy function, give the module's output."""
    from attnlib.multihead import multi_head_attention

    _, ours = _pair(12, 3, seed=8)
    ours = ours.double()
    x = rng.standard_normal((2, 5, 12))
    expected = ours(torch.from_numpy(x), causal=True).detach().numpy()
    w = {n: t.detach().numpy() for n, t in ours.matrices().items()}
    out = multi_head_attention(x, x, x, **w, n_heads=3, causal=True)
    assert abs(out - expected).max() < 1e-12
