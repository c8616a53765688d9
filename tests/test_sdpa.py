"""attnlib.sdpa against torch's fused SDPA and a float64 reference, on both backends."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import attnlib
from conftest import BACKENDS, reference_attention, to_backend, to_numpy

TOL = {"float32": 2e-5, "float64": 1e-12}

# (batch dims of q, batch dims of k/v, L, S, d_k, d_v): 1s, primes, L != S, d_k != d_v,
# and broadcasting of leading dimensions.
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_and_torch(rng, backend, dtype, shape, causal):
    q, k, v = _qkv(rng, shape)
    L, S = shape[2], shape[3]
    allowed = attnlib.causal_mask(L, S) if causal else None
    out = attnlib.scaled_dot_product_attention(
        *(to_backend(a, backend, dtype) for a in (q, k, v)), causal=causal)
    assert type(out) is (np.ndarray if backend == "numpy" else torch.Tensor)
    assert str(out.dtype).endswith(dtype)
    expected = reference_attention(q, k, v, allowed)
    np.testing.assert_allclose(to_numpy(out), expected, atol=TOL[dtype], rtol=TOL[dtype])
    # torch's fused SDPA, with an explicit bottom-right causal mask when L != S
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    tq, tk, tv = (torch.from_numpy(np.array(np.broadcast_to(a, batch + a.shape[-2:])))
                  for a in (q, k, v))
    if causal and L <= S:
        ref = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=causal_lower_right(L, S))
        np.testing.assert_allclose(to_numpy(out), ref.numpy(), atol=TOL[dtype], rtol=TOL[dtype])
    elif not causal:
        ref = F.scaled_dot_product_attention(tq, tk, tv)
        np.testing.assert_allclose(to_numpy(out), ref.numpy(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_square_equals_torch_is_causal(rng, backend):
    q, k, v = _qkv(rng, ((2,), (2,), 6, 6, 4, 3))
    out = attnlib.scaled_dot_product_attention(*(to_backend(a, backend) for a in (q, k, v)),
                                               causal=True)
    ref = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), is_causal=True)
    np.testing.assert_allclose(to_numpy(out), ref.numpy(), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bottom_right_differs_from_torch_top_left(rng, backend):
    """With L != S attnlib is bottom-right aligned; torch's is_causal is top-left."""
    q, k, v = _qkv(rng, ((), (), 2, 5, 4, 3))
    ours = to_numpy(attnlib.scaled_dot_product_attention(
        *(to_backend(a, backend) for a in (q, k, v)), causal=True))
    top_left = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), is_causal=True)
    assert np.abs(ours - top_left.numpy()).max() > 1e-3
    # the last query sees every key under bottom-right alignment
    np.testing.assert_allclose(ours[-1], reference_attention(q[-1:], k, v)[0], atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_bool_and_float_masks(rng, backend, dtype):
    q, k, v = _qkv(rng, ((2, 3), (2, 3), 5, 7, 4, 6))
    allowed = rng.random((2, 1, 5, 7)) > 0.4
    allowed[0, 0, 2] = False  # a query with no key at all
    expected = reference_attention(q, k, v, allowed)
    args = [to_backend(a, backend, dtype) for a in (q, k, v)]
    out_bool = attnlib.scaled_dot_product_attention(*args, mask=to_backend(allowed, backend))
    additive = np.where(allowed, 0.0, -np.inf)
    out_float = attnlib.scaled_dot_product_attention(
        *args, mask=to_backend(additive, backend, dtype))
    for out in (out_bool, out_float):
        np.testing.assert_allclose(to_numpy(out), expected, atol=TOL[dtype], rtol=TOL[dtype])
        assert np.all(to_numpy(out)[0, :, 2] == 0.0)
    # float masks are biases, not only -inf: compare with torch's additive attn_mask
    bias = rng.standard_normal((5, 7))
    out = attnlib.scaled_dot_product_attention(*args, mask=to_backend(bias, backend, dtype))
    ref = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)),
                                         attn_mask=torch.from_numpy(bias))
    np.testing.assert_allclose(to_numpy(out), ref.numpy(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_causal_combine(rng, backend):
    q, k, v = _qkv(rng, ((3,), (3,), 4, 6, 5, 2))
    lengths = np.array([6, 3, 1])
    pad = attnlib.padding_mask(lengths, 6)  # (B, 1, S)
    allowed = pad & attnlib.causal_mask(4, 6)
    out = attnlib.scaled_dot_product_attention(*(to_backend(a, backend) for a in (q, k, v)),
                                               mask=to_backend(pad, backend), causal=True)
    np.testing.assert_allclose(to_numpy(out), reference_attention(q, k, v, allowed), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_are_distributions(rng, backend):
    q, k, _ = _qkv(rng, ((2,), (2,), 5, 8, 3, 3))
    w = to_numpy(attnlib.attention_weights(to_backend(q, backend), to_backend(k, backend),
                                           causal=True))
    assert w.shape == (2, 5, 8)
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
    assert np.all(w[:, 0, 4:] == 0)  # bottom-right: query 0 sits at key position 3


def test_scale_argument(rng):
    q, k, v = _qkv(rng, ((), (), 4, 4, 8, 2))
    out = attnlib.scaled_dot_product_attention(q, k, v, scale=0.3)
    np.testing.assert_allclose(out, reference_attention(q, k, v, scale=0.3), atol=1e-12)
    default = attnlib.scaled_dot_product_attention(q, k, v)
    np.testing.assert_allclose(default, reference_attention(q, k, v, scale=1 / math.sqrt(8)),
                               atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_torch_dtype_and_device_preserved(rng, dtype):
    q, k, v = (torch.from_numpy(a).to(dtype) for a in _qkv(rng, ((2,), (2,), 3, 4, 8, 8)))
    out = attnlib.scaled_dot_product_attention(q, k, v, causal=True)
    assert out.dtype == dtype and out.device == q.device
    ref = reference_attention(*(a.double().numpy() for a in (q, k, v)),
                              attnlib.causal_mask(3, 4))
    assert np.abs(out.double().numpy() - ref).max() < {torch.float16: 5e-3, torch.bfloat16: 3e-2,
                                                        torch.float32: 1e-5,
                                                        torch.float64: 1e-12}[dtype]


# ----------------------------------------------------------------------------- gradients

def _reference_torch(q, k, v, allowed):
    """Differentiable float64 reference written with plain torch ops (no attnlib)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    any_key = allowed.any(-1, keepdim=True)
    scores = torch.where(any_key, scores, torch.zeros_like(scores))
    w = torch.softmax(scores, -1) * any_key
    return w @ v


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_autograd_of_reference(rng, causal):
    q, k, v = _qkv(rng, ((2, 2), (2, 2), 5, 7, 3, 4))
    allowed = rng.random((2, 1, 5, 7)) > 0.3
    allowed[1, 0, 0] = False  # fully masked row
    upstream = torch.from_numpy(rng.standard_normal((2, 2, 5, 4)))
    full = torch.from_numpy(allowed & attnlib.causal_mask(5, 7) if causal else allowed)
    full = full.expand(2, 2, 5, 7)

    ours = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    attnlib.scaled_dot_product_attention(*ours, mask=torch.from_numpy(allowed),
                                         causal=causal).backward(upstream)
    theirs = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    _reference_torch(*theirs, full).backward(upstream)
    for name, a, b in zip("qkv", ours, theirs):
        assert torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-10, msg=name)
    assert torch.all(ours[0].grad[1, :, 0] == 0)  # the fully masked query gets no gradient


def test_gradcheck_float64(rng):
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in _qkv(rng, ((2,), (2,), 3, 4, 2, 3)))
    mask = torch.tensor([[True, False, True, True], [False] * 4, [True] * 4])
    assert torch.autograd.gradcheck(
        lambda a, b, c: attnlib.scaled_dot_product_attention(a, b, c, mask=mask, causal=True),
        (q, k, v))


# ----------------------------------------------------------------------------- bad inputs

def _bad(rng):
    q, k, v = _qkv(rng, ((2,), (2,), 3, 4, 5, 6))
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, error, words", [
    ("dk", ValueError, ["q and k", "d_k", "(2, 3, 5)", "(2, 4, 4)"]),
    ("S", ValueError, ["k and v", "(2, 4, 5)", "(2, 3, 6)"]),
    ("mask", ValueError, ["mask", "(3, 3)", "(2, 3, 4)"]),
    ("mask_grows", ValueError, ["mask", "(5, 2, 3, 4)"]),
    ("int", TypeError, ["q", "floating", "int"]),
    ("int_mask", TypeError, ["mask", "boolean"]),
    ("ndim", ValueError, ["q", "at least 2", "(5,)"]),
    ("batch", ValueError, ["broadcast", "q (2,)", "k (3,)"]),
    ("dtypes", TypeError, ["q", "k", "dtype"]),
    ("scale", ValueError, ["scale"]),
    ("list", TypeError, ["q", "list"]),
])
def test_bad_input_names_the_argument(rng, backend, case, error, words):
    q, k, v = _bad(rng)
    mask = None
    kwargs = {}
    if case == "dk":
        k = k[..., :4]
    elif case == "S":
        v = v[:, :3]
    elif case == "mask":
        mask = np.ones((3, 3), bool)
    elif case == "mask_grows":
        mask = np.ones((5, 2, 3, 4), bool)
    elif case == "int":
        q = q.astype(np.int64)
    elif case == "int_mask":
        mask = np.ones((3, 4), np.int64)
    elif case == "ndim":
        q = q[0, 0]
    elif case == "batch":
        k, v = np.concatenate([k, k[:1]]), np.concatenate([v, v[:1]])
    elif case == "dtypes":
        q = q.astype(np.float32)
    elif case == "scale":
        kwargs["scale"] = float("nan")
    args = [to_backend(a, backend) for a in (q, k, v)]
    if case == "list":
        args[0] = q.tolist()
    with pytest.raises(error) as info:
        attnlib.scaled_dot_product_attention(
            *args, mask=None if mask is None else to_backend(mask, backend), **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_numpy_mixed_with_torch_is_refused(rng):
    q, k, v = _bad(rng)
    with pytest.raises(TypeError, match="q is a NumPy array, k is a torch tensor"):
        attnlib.scaled_dot_product_attention(q, torch.from_numpy(k), v)
    with pytest.raises(TypeError, match="mask is a torch tensor"):
        attnlib.scaled_dot_product_attention(q, k, v, mask=torch.ones(3, 4, dtype=torch.bool))
