"""attnlib.multihead: split/merge heads and multi-head attention, on both backends.

References: a float64 loop over heads built on conftest's from-scratch attention, torch's
own reshapes, and torch autograd (gradcheck).
"""

import numpy as np
import pytest
import torch

from attnlib.masks import causal_mask, key_padding_mask
from attnlib.multihead import merge_heads, multi_head_attention, split_heads
from conftest import BACKENDS, reference_attention, to_backend, to_numpy

TOL = {"float32": 3e-5, "float64": 1e-12}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, H", [((1, 1), 1), ((3, 6), 2), ((2, 17, 12), 3),
                                      ((2, 3, 5, 31), 31), ((4, 2, 1, 8), 4)])
def test_split_heads_matches_torch_view(rng, backend, shape, H):
    x = rng.standard_normal(shape)
    heads = split_heads(to_backend(x, backend), H)
    d = shape[-1] // H
    # torch.nn.MultiheadAttention's split: view(..., L, H, d) then swap L and H
    t = torch.from_numpy(x)
    expected = t.reshape(*shape[:-1], H, d).transpose(-3, -2)
    assert tuple(heads.shape) == (*shape[:-2], H, shape[-2], d)
    np.testing.assert_array_equal(to_numpy(heads), expected.numpy())
    back = merge_heads(heads)
    assert type(back) is type(to_backend(x, backend))
    np.testing.assert_array_equal(to_numpy(back), x)


def test_split_heads_head_h_holds_slice_h(rng):
    x = rng.standard_normal((5, 12))
    heads = split_heads(x, 3)
    for h in range(3):
        np.testing.assert_array_equal(heads[h], x[:, 4 * h:4 * (h + 1)])


def _params(rng, d_model, d_kin, d_vin, H, d_k, d_v, d_out, bias):
    p = {"w_q": rng.standard_normal((d_model, H * d_k)) / np.sqrt(d_model),
         "w_k": rng.standard_normal((d_kin, H * d_k)) / np.sqrt(d_kin),
         "w_v": rng.standard_normal((d_vin, H * d_v)) / np.sqrt(d_vin),
         "w_o": rng.standard_normal((H * d_v, d_out)) / np.sqrt(H * d_v)}
    if bias:
        p.update(b_q=rng.standard_normal(H * d_k), b_k=rng.standard_normal(H * d_k),
                 b_v=rng.standard_normal(H * d_v), b_o=rng.standard_normal(d_out))
    return p


def _reference(query, key, value, p, H, allowed=None):
    """Float64 loop over heads: project, attend (from scratch), concatenate, project."""
    d_k, d_v = p["w_q"].shape[1] // H, p["w_v"].shape[1] // H
    outs = []
    for h in range(H):
        cols_k, cols_v = slice(h * d_k, (h + 1) * d_k), slice(h * d_v, (h + 1) * d_v)
        q = query @ p["w_q"][:, cols_k] + (p["b_q"][cols_k] if "b_q" in p else 0)
        k = key @ p["w_k"][:, cols_k] + (p["b_k"][cols_k] if "b_k" in p else 0)
        v = value @ p["w_v"][:, cols_v] + (p["b_v"][cols_v] if "b_v" in p else 0)
        a = None if allowed is None else np.broadcast_to(
            allowed, np.broadcast_shapes(allowed.shape, q.shape[:-2] + (H, 1, 1)))[..., h, :, :]
        outs.append(reference_attention(q, k, v, a))
    return np.concatenate(outs, axis=-1) @ p["w_o"] + p.get("b_o", 0)


# (batch, L, S, d_model, d_kin, d_vin, H, d_k, d_v, d_out)
SHAPES = [
    ((), 1, 1, 1, 1, 1, 1, 1, 1, 1),
    ((2,), 3, 3, 6, 6, 6, 2, 3, 3, 6),
    ((2,), 17, 31, 12, 5, 7, 3, 4, 2, 12),
    ((2, 2), 5, 2, 8, 8, 8, 4, 2, 5, 3),
    ((3,), 31, 17, 16, 16, 16, 1, 16, 16, 16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_loop_over_heads(rng, backend, dtype, shape, bias):
    batch, L, S, d_model, d_kin, d_vin, H, d_k, d_v, d_out = shape
    query = rng.standard_normal(batch + (L, d_model))
    key = rng.standard_normal(batch + (S, d_kin))
    value = rng.standard_normal(batch + (S, d_vin))
    p = _params(rng, d_model, d_kin, d_vin, H, d_k, d_v, d_out, bias)
    cast = {n: to_backend(a, backend, dtype) for n, a in p.items()}
    out, w = multi_head_attention(*(to_backend(a, backend, dtype) for a in (query, key, value)),
                                  n_heads=H, return_weights=True, **cast)
    assert type(out) is (np.ndarray if backend == "numpy" else torch.Tensor)
    assert str(out.dtype).endswith(dtype)
    assert tuple(out.shape) == batch + (L, d_out)
    assert tuple(w.shape) == batch + (H, L, S)
    np.testing.assert_allclose(to_numpy(w).sum(-1), 1.0, atol=TOL[dtype])
    np.testing.assert_allclose(to_numpy(out), _reference(query, key, value, p, H),
                               atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["causal", "key_padding", "per_head", "additive"])
def test_masks_match_reference(rng, backend, kind):
    B, L, S, E, H = 3, 5, 7, 12, 3
    query, key = rng.standard_normal((B, L, E)), rng.standard_normal((B, S, E))
    p = _params(rng, E, E, E, H, 4, 4, E, True)
    causal = kind == "causal"
    if kind == "causal":
        mask, allowed = None, causal_mask(L, S)
    elif kind == "key_padding":
        mask = allowed = key_padding_mask([7, 2, 0], S)  # (B, 1, 1, S); one empty
    else:
        allowed = rng.random((B, H, L, S)) < 0.4  # some rows fully masked
        allowed[0, 1, 2] = False
        mask = allowed if kind == "per_head" else np.where(allowed, 0.0, -np.inf)
    out, w = multi_head_attention(
        *(to_backend(a, backend) for a in (query, key, key)), n_heads=H,
        mask=None if mask is None else to_backend(mask, backend), causal=causal,
        return_weights=True, **{n: to_backend(a, backend) for n, a in p.items()})
    expected = _reference(query, key, key, p, H, allowed)
    np.testing.assert_allclose(to_numpy(out), expected, atol=1e-12)
    w = to_numpy(w)
    assert np.isfinite(w).all()
    np.testing.assert_array_equal(w[~np.broadcast_to(allowed, w.shape)], 0.0)


def test_gradcheck_torch():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in [(2, 3, 4), (2, 5, 4), (2, 5, 4), (4, 4), (4, 4), (4, 6), (6, 3)]]
    mask = key_padding_mask([5, 2], like=args[0])

    def f(q, k, v, wq, wk, wv, wo):
        return multi_head_attention(q, k, v, wq, wk, wv, wo, n_heads=2, mask=mask)

    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"n_heads": 0}, ValueError, "n_heads must be a positive integer"),
    ({"n_heads": 5}, ValueError, "n_heads = 5 must divide the output width of w_q"),
    ({"w_k": np.ones((6, 4))}, ValueError, "w_q and w_k must have the same output width"),
    ({"w_q": np.ones((5, 6))}, ValueError, "w_q must have shape (6, width)"),
    ({"w_o": np.ones((4, 6))}, ValueError, "w_o must have shape (H*d_v, d_out) = (6, d_out)"),
    ({"b_q": np.ones(4)}, ValueError, "b_q must have shape (6,)"),
    ({"mask": np.ones((2, 3, 4), bool)}, ValueError, "mask[:, None]"),
    ({"mask": np.ones((5, 4), bool)}, ValueError, "mask of shape (5, 4) does not broadcast"),
    ({"query": torch.ones(2, 3, 6)}, TypeError, "cannot mix NumPy arrays and torch tensors"),
    ({"query": np.ones((2, 3, 6), int)}, TypeError, "query must have a floating dtype"),
    ({"value": np.ones((2, 5, 6))}, ValueError, "key and value must have the same length S"),
])
def test_bad_input(kwargs, error, words):
    args = {"query": np.ones((2, 3, 6)), "key": np.ones((2, 4, 6)),
            "value": np.ones((2, 4, 6)), "w_q": np.ones((6, 6)), "w_k": np.ones((6, 6)),
            "w_v": np.ones((6, 6)), "w_o": np.ones((6, 6)), "n_heads": 3}
    args.update(kwargs)
    with pytest.raises(error) as info:
        multi_head_attention(**args)
    assert words in str(info.value)


def test_split_heads_bad_input():
    with pytest.raises(ValueError, match=r"n_heads = 4 must divide the last dimension"):
        split_heads(np.ones((3, 6)), 4)
    with pytest.raises(ValueError, match=r"at least 3 dimensions"):
        merge_heads(np.ones((3, 6)))
