"""attnlib.nn.attention.Attention: the torch module of single-head attention (chapter 6).

Checked against the NumPy layer of attnlib.projections (same matrices), a float64 loop
from the definition (conftest.reference_attention) and torch's fused SDPA.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib import projections as P
from attnlib.nn.attention import Attention
from conftest import reference_attention, to_numpy

# (batch dims of x, batch dims of context or None, L, S, d_model, d_kv_in, d_k, d_v)
SHAPES = [
    ((), None, 1, 1, 1, 1, 1, 1),
    ((), None, 3, 3, 4, 4, 2, 2),
    ((2,), None, 17, 17, 5, 5, 3, 7),
    ((2,), (2,), 17, 31, 6, 9, 3, 5),
    ((2, 3), (2, 3), 2, 5, 8, 3, 4, 1),
    ((3,), (3,), 31, 2, 3, 16, 8, 8),
]


def _module(shape, bias=False, tied=False, dtype=torch.float64, seed=0):
    _, bc, _, _, d_model, d_kv_in, d_k, d_v = shape
    torch.manual_seed(seed)
    return Attention(d_model, d_k, d_v, d_kv_in=None if bc is None else d_kv_in, bias=bias,
                     tied_qk=tied, dtype=dtype)


def _inputs(rng, shape):
    bx, bc, L, S, d_model, d_kv_in, _, _ = shape
    x = rng.standard_normal(bx + (L, d_model))
    context = None if bc is None else rng.standard_normal(bc + (S, d_kv_in))
    return x, context


def _numpy_matrices(module):
    return {n: t.detach().numpy().astype(np.float64) for n, t in module.matrices().items()}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_module_matches_numpy_layer_reference_and_torch(rng, shape, bias, causal):
    attn = _module(shape, bias)
    x, context = _inputs(rng, shape)
    L, S, d_v = shape[2], shape[3], shape[7]
    tc = None if context is None else torch.from_numpy(context)
    out = attn(torch.from_numpy(x), tc, causal=causal)
    assert out.shape == x.shape[:-1] + (d_v,)
    # the NumPy layer, with the same matrices passed explicitly
    m = _numpy_matrices(attn)
    np_out = P.attention_layer(x, context=context, causal=causal, **m)
    assert isinstance(np_out, np.ndarray)
    np.testing.assert_allclose(to_numpy(out), np_out, atol=1e-12)
    # a float64 loop from the definition, with projections written out by hand
    c = x if context is None else context
    q = x @ m["w_q"] + m.get("b_q", 0.0)
    k = c @ m["w_k"] + m.get("b_k", 0.0)
    v = c @ m["w_v"] + m.get("b_v", 0.0)
    allowed = attnlib.causal_mask(L, S) if causal else None
    np.testing.assert_allclose(to_numpy(out), reference_attention(q, k, v, allowed), atol=1e-12)
    if not causal:
        ref = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)))
        np.testing.assert_allclose(to_numpy(out), ref.numpy(), atol=1e-12)


def test_float32_module_within_float32_tolerance(rng):
    shape = ((2,), (2,), 5, 7, 6, 4, 3, 2)
    attn = _module(shape, bias=True, dtype=torch.float32)
    x, context = _inputs(rng, shape)
    out = attn(torch.from_numpy(x).float(), torch.from_numpy(context).float())
    assert out.dtype == torch.float32
    m = _numpy_matrices(attn)
    expected = P.attention_layer(x, context=context, **m)  # float64 with the same weights
    assert np.abs(out.double().detach().numpy() - expected).max() < 2e-6


def test_cross_attention_shapes_and_weights(rng):
    B, L, S, d_model, d_kv_in, d_k, d_v = 2, 3, 5, 12, 10, 4, 6
    attn = Attention(d_model, d_k, d_v, d_kv_in=d_kv_in, dtype=torch.float64)
    x = torch.from_numpy(rng.standard_normal((B, L, d_model)))
    ctx = torch.from_numpy(rng.standard_normal((B, S, d_kv_in)))
    out, weights = attn(x, ctx, return_weights=True)
    assert out.shape == (B, L, d_v) and weights.shape == (B, L, S)
    assert attn.q_proj.weight.shape == (d_k, d_model)
    assert attn.k_proj.weight.shape == (d_k, d_kv_in)
    assert attn.v_proj.weight.shape == (d_v, d_kv_in)
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, L, dtype=torch.float64))
    torch.testing.assert_close(out, weights @ attn.v_proj(ctx), atol=1e-12, rtol=0)
    # a boolean key-padding mask: True = may attend
    keep = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, :]
    out_m, w_m = attn(x, ctx, mask=keep, return_weights=True)
    assert torch.all(w_m[1, :, 2:] == 0)
    torch.testing.assert_close(out_m[1], attn(x[1:], ctx[1:, :2])[0], atol=1e-12, rtol=0)


def test_tied_qk_shares_one_matrix_and_gives_symmetric_scores(rng):
    attn = Attention(6, 4, tied_qk=True, dtype=torch.float64)
    untied = Attention(6, 4, dtype=torch.float64)
    assert attn.k_proj is None
    n_tied = sum(p.numel() for p in attn.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == 6 * 4
    m = attn.matrices()
    assert m["w_k"] is not None and torch.equal(m["w_k"], m["w_q"])
    x = torch.from_numpy(rng.standard_normal((2, 5, 6)))
    q = attn.q_proj(x)
    scores = attnlib.attention_scores(q, attn.key_proj(x))
    torch.testing.assert_close(scores, scores.transpose(-1, -2), atol=1e-12, rtol=0)
    out = attn(x)
    np.testing.assert_allclose(
        to_numpy(out), reference_attention(q.detach().numpy(), q.detach().numpy(),
                                           attn.v_proj(x).detach().numpy()), atol=1e-12)
    with pytest.raises(ValueError, match="tied_qk=True needs d_kv_in == d_model"):
        Attention(6, 4, d_kv_in=5, tied_qk=True)


def test_self_attention_is_permutation_equivariant(rng):
    attn = Attention(5, 3, 4, dtype=torch.float64)
    x = torch.from_numpy(rng.standard_normal((2, 7, 5)))
    perm = torch.from_numpy(rng.permutation(7))
    torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm], atol=1e-12, rtol=0)
    # a causal mask breaks it: the first query sees only itself
    causal = attn(x[:, perm], causal=True)
    assert (causal - attn(x, causal=True)[:, perm]).abs().max() > 1e-3


def test_gradients_reach_every_parameter(rng):
    shape = ((2,), (2,), 3, 4, 5, 6, 2, 3)
    ours, theirs = _module(shape, bias=True), _module(shape, bias=True)
    x, context = map(torch.from_numpy, _inputs(rng, shape))
    up = torch.from_numpy(rng.standard_normal((2, 3, 3)))
    ours(x, context).backward(up)
    # reference: nn.Linear layers of a copy, then torch's fused SDPA
    F.scaled_dot_product_attention(theirs.q_proj(x), theirs.k_proj(context),
                                   theirs.v_proj(context)).backward(up)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert a.grad is not None and a.grad.abs().max() > 0, name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-10, msg=name)


@pytest.mark.parametrize("case, error, words", [
    ("x_width", ValueError, ["x", "(..., L, d_model = 6)", "(2, 3, 5)"]),
    ("x_1d", ValueError, ["x", "(6,)"]),
    ("context_width", ValueError, ["context", "(..., S, d_kv_in = 4)", "(2, 5, 6)"]),
    ("self_on_cross_module", ValueError, ["cross-attention", "d_kv_in=4", "pass context"]),
    ("numpy", TypeError, ["x", "torch tensor", "ndarray"]),
    ("dtype", TypeError, ["x", "torch.float32", "torch.float64"]),
    ("mask", ValueError, ["mask", "(3, 3)", "(2, 3, 5)"]),
])
def test_bad_input_names_the_argument(rng, case, error, words):
    attn = Attention(6, 2, 3, d_kv_in=4, dtype=torch.float64)
    x = torch.from_numpy(rng.standard_normal((2, 3, 6)))
    ctx = torch.from_numpy(rng.standard_normal((2, 5, 4)))
    kw = {}
    if case == "x_width":
        x = x[..., :5]
    elif case == "x_1d":
        x = x[0, 0]
    elif case == "context_width":
        ctx = torch.from_numpy(rng.standard_normal((2, 5, 6)))
    elif case == "self_on_cross_module":
        ctx = None
    elif case == "numpy":
        x = x.numpy()
    elif case == "dtype":
        x = x.float()
    elif case == "mask":
        kw["mask"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(error) as info:
        attn(x, ctx, **kw)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("kwargs, words", [
    ({"d_model": 0, "d_k": 2}, "d_model must be a positive integer"),
    ({"d_model": 4, "d_k": 2.5}, "d_k must be a positive integer"),
    ({"d_model": 4, "d_k": 2, "d_v": -1}, "d_v must be a positive integer"),
    ({"d_model": 4, "d_k": 2, "d_kv_in": True}, "d_kv_in must be a positive integer"),
])
def test_bad_sizes(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Attention(**kwargs)
