"""attnlib.backward against torch autograd and central finite differences."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib import backward as bw
from conftest import BACKENDS, to_backend, to_numpy

TOL = {"float32": 2e-5, "float64": 1e-11}

# (batch dims of q, batch dims of k/v, L, S, d_k, d_v): 1s, primes, L != S, d_k != d_v,
# and broadcast leading dimensions (whose gradients must be summed back).
SHAPES = [
    ((), (), 1, 1, 1, 1),
    ((), (), 3, 3, 2, 2),
    ((2,), (2,), 17, 31, 3, 5),
    ((2, 3), (2, 3), 5, 2, 4, 1),
    ((2, 3), (1, 3), 31, 17, 8, 8),
    ((1,), (3,), 2, 3, 16, 7),
]


def _qkv(rng, shape):
    bq, bk, L, S, dk, dv = shape
    return (rng.standard_normal(bq + (L, dk)), rng.standard_normal(bk + (S, dk)),
            rng.standard_normal(bk + (S, dv)))


def _batch(shape):
    return np.broadcast_shapes(shape[0], shape[1])


def _torch_grads(q, k, v, grad_out, attn_mask=None, scale=None):
    """Gradients by autograd through torch's fused SDPA (independent of attnlib)."""
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    leaves = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    expanded = [t.expand(*batch, *t.shape[-2:]) for t in leaves]
    mask = None if attn_mask is None else torch.from_numpy(attn_mask)
    out = F.scaled_dot_product_attention(*expanded, attn_mask=mask, scale=scale)
    out.backward(torch.from_numpy(grad_out))
    return [t.grad.numpy() for t in leaves]


# ----------------------------------------------------------------------------- softmax

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, axis", [((1,), -1), ((7,), 0), ((3, 5), -1), ((4, 6), 0),
                                         ((2, 3, 17), 1)])
def test_softmax_backward_matches_autograd(rng, backend, shape, axis):
    s = rng.standard_normal(shape) * 2
    da = rng.standard_normal(shape)
    a = np.exp(s - s.max(axis, keepdims=True))
    a /= a.sum(axis, keepdims=True)
    ds = bw.softmax_backward(to_backend(a, backend), to_backend(da, backend), axis=axis)
    ts = torch.from_numpy(s).requires_grad_()
    torch.softmax(ts, dim=axis).backward(torch.from_numpy(da))
    np.testing.assert_allclose(to_numpy(ds), ts.grad.numpy(), atol=1e-14)
    np.testing.assert_allclose(to_numpy(ds).sum(axis), 0.0, atol=1e-14)


def test_softmax_backward_is_the_jacobian_product(rng):
    s, da = rng.standard_normal(6), rng.standard_normal(6)
    jac = torch.autograd.functional.jacobian(lambda x: torch.softmax(x, 0), torch.from_numpy(s))
    a = torch.softmax(torch.from_numpy(s), 0).numpy()
    np.testing.assert_allclose(jac.numpy(), np.diag(a) - np.outer(a, a), atol=1e-15)
    np.testing.assert_allclose(bw.softmax_backward(a, da), jac.numpy().T @ da, atol=1e-15)


def test_softmax_backward_zero_weights_get_zero_gradient(rng):
    a = np.array([[0.0, 0.25, 0.75, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ds = bw.softmax_backward(a, rng.standard_normal((2, 4)) * 1e6)
    assert np.all(ds[:, [0, 3]] == 0) and np.all(ds[1] == 0)


# ----------------------------------------------------------------------------- SDPA

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_backward_matches_torch_autograd(rng, backend, dtype, shape, causal):
    q, k, v = _qkv(rng, shape)
    L, S, dv = shape[2], shape[3], shape[5]
    dout = rng.standard_normal(_batch(shape) + (L, dv))
    allowed = attnlib.causal_mask(L, S) if causal else None  # bottom-right
    expected = _torch_grads(q, k, v, dout, allowed)
    args = [to_backend(a, backend, dtype) for a in (q, k, v, dout)]
    grads = bw.sdpa_backward(*args, causal=causal)
    for name, g, ref, a in zip("qkv", grads, expected, (q, k, v)):
        assert type(g) is type(args[0]), name
        assert str(g.dtype).endswith(dtype), name
        assert tuple(g.shape) == a.shape, name
        np.testing.assert_allclose(to_numpy(g), ref, atol=TOL[dtype], rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_float_and_bias_masks(rng, backend):
    shape = ((2, 3), (2, 3), 5, 7, 4, 6)
    q, k, v = _qkv(rng, shape)
    dout = rng.standard_normal((2, 3, 5, 6))
    allowed = rng.random((2, 1, 5, 7)) > 0.4
    allowed[0, 0, 2] = False  # a query with no key at all
    args = [to_backend(a, backend) for a in (q, k, v, dout)]
    expected = _torch_grads(q, k, v, dout, allowed)
    additive = np.where(allowed, 0.0, -np.inf)
    bias = rng.standard_normal((5, 7))  # a float mask that is a learned bias, not -inf
    for mask, ref in ((allowed, expected), (additive, expected),
                      (bias, _torch_grads(q, k, v, dout, bias))):
        grads = bw.sdpa_backward(*args, mask=to_backend(mask, backend))
        for name, g, r in zip("qkv", grads, ref):
            assert np.all(np.isfinite(to_numpy(g))), name
            np.testing.assert_allclose(to_numpy(g), r, atol=1e-11, err_msg=name)
    dq = to_numpy(bw.sdpa_backward(*args, mask=to_backend(allowed, backend))[0])
    assert np.all(dq[0, :, 2] == 0)  # the query with no key receives no gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_causal_combine_with_fully_masked_rows(rng, backend):
    """L > S with bottom-right causal: the first L - S queries see no key at all."""
    q, k, v = _qkv(rng, ((3,), (3,), 6, 4, 5, 2))
    dout = rng.standard_normal((3, 6, 2))
    pad = attnlib.padding_mask(np.array([4, 2, 1]), 4)  # (B, 1, S)
    allowed = pad & attnlib.causal_mask(6, 4)
    expected = _torch_grads(q, k, v, dout, allowed)
    grads = bw.sdpa_backward(*(to_backend(a, backend) for a in (q, k, v, dout)),
                             mask=to_backend(pad, backend), causal=True)
    for name, g, r in zip("qkv", grads, expected):
        np.testing.assert_allclose(to_numpy(g), r, atol=1e-12, err_msg=name)
    assert np.all(to_numpy(grads[0])[:, :2] == 0)


def _loss(q, k, v, dout, mask, causal, scale):
    out = attnlib.scaled_dot_product_attention(q, k, v, mask, causal=causal, scale=scale)
    return float(np.sum(out * dout))


@pytest.mark.parametrize("causal, masked, scale", [(False, False, None), (True, True, None),
                                                   (True, False, 0.7)])
def test_sdpa_backward_matches_finite_differences(rng, causal, masked, scale):
    q, k, v = _qkv(rng, ((2,), (1,), 3, 5, 3, 2))  # L != S, d_k != d_v, broadcast k, v
    dout = rng.standard_normal((2, 3, 2))
    mask = None
    if masked:
        mask = rng.random((2, 3, 5)) > 0.3
        mask[1, 0] = False
    grads = bw.sdpa_backward(q, k, v, dout, mask, causal=causal, scale=scale)
    h = 1e-6
    for x, g in zip((q, k, v), grads):
        numeric = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            old = x[idx]
            x[idx] = old + h
            up = _loss(q, k, v, dout, mask, causal, scale)
            x[idx] = old - h
            down = _loss(q, k, v, dout, mask, causal, scale)
            x[idx] = old
            numeric[idx] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, numeric, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_weights_equal_recomputed(rng, backend):
    q, k, v = (to_backend(a, backend) for a in _qkv(rng, ((2,), (2,), 4, 6, 3, 5)))
    dout = to_backend(rng.standard_normal((2, 4, 5)), backend)
    out, weights = bw.sdpa_forward(q, k, v, causal=True)
    np.testing.assert_allclose(
        to_numpy(out), to_numpy(attnlib.scaled_dot_product_attention(q, k, v, causal=True)),
        atol=1e-14)
    saved = bw.sdpa_backward(q, k, v, dout, causal=True, weights=weights)
    again = bw.sdpa_backward(q, k, v, dout, causal=True)
    for a, b in zip(saved, again):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), atol=1e-14)


def test_torch_backward_matches_attnlib_autograd(rng):
    """Our formulas equal autograd through attnlib's own forward, scale included."""
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in _qkv(rng, ((2,), (2,), 3, 4, 6, 2)))
    dout = torch.from_numpy(rng.standard_normal((2, 3, 2)))
    attnlib.scaled_dot_product_attention(q, k, v, causal=True, scale=2.5).backward(dout)
    grads = bw.sdpa_backward(q.detach(), k.detach(), v.detach(), dout, causal=True, scale=2.5)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-12, rtol=1e-10)


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, error, words", [
    ("grad_shape", ValueError, ["grad_out", "(2, 3, 6)", "(2, 3, 5)"]),
    ("grad_dtype", TypeError, ["grad_out", "dtype"]),
    ("weights", ValueError, ["weights", "(2, 3, 4)", "(3, 4)"]),
    ("dk", ValueError, ["q and k", "d_k"]),
    ("scale", ValueError, ["scale"]),
])
def test_bad_input_names_the_argument(rng, backend, case, error, words):
    q, k, v = _qkv(rng, ((2,), (2,), 3, 4, 5, 6))
    dout = rng.standard_normal((2, 3, 6))
    kwargs = {}
    if case == "grad_shape":
        dout = dout[..., :5]
    elif case == "grad_dtype":
        dout = dout.astype(np.float32)
    elif case == "weights":
        kwargs["weights"] = to_backend(np.ones((3, 4)) / 4, backend)
    elif case == "dk":
        k = k[..., :4]
    elif case == "scale":
        kwargs["scale"] = float("inf")
    with pytest.raises(error) as info:
        bw.sdpa_backward(*(to_backend(a, backend) for a in (q, k, v, dout)), **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_softmax_backward_bad_input(rng):
    with pytest.raises(ValueError, match=r"weights \(3, 4\) and grad_weights \(3, 5\)"):
        bw.softmax_backward(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(TypeError, match="weights is a NumPy array, grad_weights is a torch"):
        bw.softmax_backward(np.ones((3, 4)), torch.ones(3, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="grad_weights must have a floating dtype"):
        bw.softmax_backward(np.ones((3, 4)), np.ones((3, 4), dtype=np.int64))
