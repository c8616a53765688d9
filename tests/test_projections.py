"""attnlib.projections: single-head attention with explicit W_Q, W_K, W_V (chapter 6).

References: a float64 loop from the definition (conftest.reference_attention on
projections computed in float64) and torch's fused F.scaled_dot_product_attention.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib import projections as P
from conftest import BACKENDS, reference_attention, to_backend, to_numpy

TOL = {"float32": 3e-5, "float64": 1e-12}

# (batch dims of x, batch dims of context or None for self-attention,
#  L, S, d_model, d_kv_in, d_k, d_v)
SHAPES = [
    ((), None, 1, 1, 1, 1, 1, 1),
    ((), None, 3, 3, 4, 4, 2, 2),
    ((2,), None, 17, 17, 5, 5, 3, 7),
    ((2,), (2,), 17, 31, 6, 9, 3, 5),
    ((2, 3), (1, 3), 2, 5, 8, 3, 4, 1),
    ((1,), (3,), 31, 2, 3, 16, 8, 8),
]


def _make(rng, shape):
    bx, bc, L, S, d_model, d_kv_in, d_k, d_v = shape
    x = rng.standard_normal(bx + (L, d_model))
    context = None if bc is None else rng.standard_normal(bc + (S, d_kv_in))
    w = {"w_q": rng.standard_normal((d_model, d_k)) / math.sqrt(d_model),
         "w_k": rng.standard_normal((d_kv_in, d_k)) / math.sqrt(d_kv_in),
         "w_v": rng.standard_normal((d_kv_in, d_v))}
    return x, context, w


def _reference(x, context, w, allowed=None, biases=None):
    """float64 projections by einsum, then attention from the definition."""
    c = x if context is None else context
    biases = biases or {}
    q = np.einsum("...ld,dk->...lk", x, w["w_q"]) + biases.get("b_q", 0.0)
    k = np.einsum("...sd,dk->...sk", c, w["w_k"]) + biases.get("b_k", 0.0)
    v = np.einsum("...sd,dv->...sv", c, w["w_v"]) + biases.get("b_v", 0.0)
    return reference_attention(q, k, v, allowed), (q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_layer_matches_reference_and_torch(rng, backend, dtype, shape, causal):
    x, context, w = _make(rng, shape)
    L, S = shape[2], shape[3]
    args = {n: to_backend(a, backend, dtype) for n, a in w.items()}
    ctx = None if context is None else to_backend(context, backend, dtype)
    out = P.attention_layer(to_backend(x, backend, dtype), context=ctx, causal=causal, **args)
    assert type(out) is (np.ndarray if backend == "numpy" else torch.Tensor)
    assert str(out.dtype).endswith(dtype)
    allowed = attnlib.causal_mask(L, S) if causal else None
    expected, (q, k, v) = _reference(x, context, w, allowed)
    assert out.shape == expected.shape == np.broadcast_shapes(
        x.shape[:-2], () if context is None else context.shape[:-2]) + (L, shape[7])
    np.testing.assert_allclose(to_numpy(out), expected, atol=TOL[dtype], rtol=TOL[dtype])
    if not causal:  # torch's fused SDPA on the same projections
        batch = expected.shape[:-2]
        tq, tk, tv = (torch.from_numpy(np.array(np.broadcast_to(a, batch + a.shape[-2:])))
                      for a in (q, k, v))
        ref = F.scaled_dot_product_attention(tq, tk, tv)
        np.testing.assert_allclose(to_numpy(out), ref.numpy(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_biases_masks_and_weights(rng, backend):
    x, context, w = _make(rng, ((2,), (2,), 4, 6, 5, 3, 2, 3))
    b = {"b_q": rng.standard_normal(2), "b_k": rng.standard_normal(2),
         "b_v": rng.standard_normal(3)}
    allowed = rng.random((2, 4, 6)) > 0.4
    allowed[1, 2] = False  # a query with no key: zero output, zero weights
    expected, _ = _reference(x, context, w, allowed, b)
    tb = lambda a: to_backend(a, backend)  # noqa: E731
    out, weights = P.attention_layer(
        tb(x), context=tb(context), mask=tb(allowed), return_weights=True,
        **{n: tb(a) for n, a in {**w, **b}.items()})
    np.testing.assert_allclose(to_numpy(out), expected, atol=1e-12)
    weights = to_numpy(weights)
    assert weights.shape == (2, 4, 6)
    np.testing.assert_allclose(weights.sum(-1)[allowed.any(-1)], 1.0, atol=1e-12)
    assert np.all(weights[~allowed] == 0) and np.all(to_numpy(out)[1, 2] == 0)
    v = np.einsum("bsd,dv->bsv", context, w["w_v"]) + b["b_v"]
    np.testing.assert_allclose(to_numpy(out), weights @ v, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_project(rng, backend):
    x, w, b = rng.standard_normal((2, 3, 5)), rng.standard_normal((5, 7)), rng.standard_normal(7)
    out = P.project(to_backend(x, backend), to_backend(w, backend), to_backend(b, backend))
    expected = np.array([[x[i, j] @ w + b for j in range(3)] for i in range(2)])
    np.testing.assert_allclose(to_numpy(out), expected, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cross", [False, True])
def test_merged_scores_equal_factored_scores(rng, backend, cross):
    x, context, w = _make(rng, ((2,), (2,) if cross else None, 5, 7 if cross else 5,
                                16, 11 if cross else 16, 3, 4))
    tb = lambda a: None if a is None else to_backend(a, backend)  # noqa: E731
    w_qk = P.merge_qk(tb(w["w_q"]), tb(w["w_k"]))
    assert tuple(w_qk.shape) == (16, 11 if cross else 16)
    assert np.linalg.matrix_rank(to_numpy(w_qk)) == 3  # rank <= d_k = 3
    c = x if context is None else context
    expected = (x @ w["w_q"]) @ np.swapaxes(c @ w["w_k"], -1, -2) / math.sqrt(3)
    scores = P.merged_scores(tb(x), w_qk, context=tb(context), scale=1 / math.sqrt(3))
    np.testing.assert_allclose(to_numpy(scores), expected, atol=1e-12)
    causal = P.merged_scores(tb(x), w_qk, context=tb(context), scale=1 / math.sqrt(3),
                             causal=True)
    allowed = attnlib.causal_mask(5, c.shape[-2])
    np.testing.assert_allclose(to_numpy(causal)[..., allowed], expected[..., allowed],
                               atol=1e-12)
    assert np.all(np.isneginf(to_numpy(causal)[..., ~allowed]))


def test_qk_score_flops_by_hand():
    # L = 2, S = 3, d_model = 4, d_kv_in = 5, d_k = 6, counted term by term
    f = P.qk_score_flops(2, 3, 4, 6, d_kv_in=5)
    assert f == {"factored": 2 * (2 * 4 * 6) + 2 * (3 * 5 * 6) + 2 * (2 * 3 * 6),
                 "merged": 2 * (2 * 4 * 5) + 2 * (2 * 3 * 5)}
    # with d_k = d_model the merged form skips one projection and is cheaper
    square = P.qk_score_flops(64, 64, 32, 32)
    assert square["merged"] < square["factored"]
    # with d_k << d_model the factored form is cheaper
    thin = P.qk_score_flops(64, 64, 512, 16)
    assert thin["factored"] < thin["merged"]
    with pytest.raises(ValueError, match="d_k must be a positive integer"):
        P.qk_score_flops(2, 3, 4, 0)


def test_torch_backend_passes_gradients_to_the_matrices(rng):
    x, context, w = _make(rng, ((2,), (2,), 3, 4, 5, 6, 2, 3))
    ours = {n: torch.from_numpy(a).requires_grad_() for n, a in w.items()}
    theirs = {n: torch.from_numpy(a).requires_grad_() for n, a in w.items()}
    tx, tc = torch.from_numpy(x), torch.from_numpy(context)
    up = torch.from_numpy(rng.standard_normal((2, 3, 3)))
    P.attention_layer(tx, context=tc, **ours).backward(up)
    F.scaled_dot_product_attention(tx @ theirs["w_q"], tc @ theirs["w_k"],
                                   tc @ theirs["w_v"]).backward(up)
    for n in w:
        torch.testing.assert_close(ours[n].grad, theirs[n].grad, atol=1e-12, rtol=1e-10,
                                   msg=n)


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, error, words", [
    ("x_width", ValueError, ["x", "w_q", "(2, 3, 7)", "(5, 2)"]),
    ("context_width", ValueError, ["w_k", "context", "(6, 2)", "(2, 4, 4)", "d_kv_in"]),
    ("w_v_rows", ValueError, ["w_v", "(5, 3)"]),
    ("d_k", ValueError, ["w_q", "w_k", "d_k", "(5, 2)", "(6, 3)"]),
    ("x_1d", ValueError, ["x", "at least 2", "(5,)"]),
    ("w_3d", ValueError, ["w_q", "matrix", "(1, 5, 2)"]),
    ("bias", ValueError, ["b_v", "(3,)", "(4,)"]),
    ("int", TypeError, ["x", "floating"]),
    ("dtypes", TypeError, ["dtype", "w_v"]),
    ("list", TypeError, ["context", "list"]),
])
def test_bad_input_names_the_argument(rng, backend, case, error, words):
    x, context, w = _make(rng, ((2,), (2,), 3, 4, 5, 6, 2, 3))
    kw = {}
    if case == "x_width":
        x = rng.standard_normal((2, 3, 7))
    elif case == "context_width":
        context = context[..., :4]
        w.pop("w_v")
        w["w_v"] = rng.standard_normal((4, 3))
    elif case == "w_v_rows":
        w["w_v"] = rng.standard_normal((5, 3))
    elif case == "d_k":
        w["w_k"] = rng.standard_normal((6, 3))
    elif case == "x_1d":
        x = x[0, 0]
    elif case == "w_3d":
        w["w_q"] = w["w_q"][None]
    elif case == "bias":
        kw["b_v"] = np.zeros(4)
    elif case == "int":
        x = x.astype(np.int64)
    elif case == "dtypes":
        w["w_v"] = w["w_v"].astype(np.float32)
    args = {n: to_backend(a, backend) for n, a in {**w, **kw}.items()}
    ctx = context.tolist() if case == "list" else to_backend(context, backend)
    with pytest.raises(error) as info:
        P.attention_layer(to_backend(x, backend), context=ctx, **args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_merged_scores_bad_width(rng):
    x, context = rng.standard_normal((3, 4)), rng.standard_normal((5, 6))
    with pytest.raises(ValueError, match=r"w_qk has 4 columns but context has last dimension 6"):
        P.merged_scores(x, rng.standard_normal((4, 4)), context=context, scale=1.0)
    with pytest.raises(ValueError, match=r"x has last dimension 4 but w_qk expects 3"):
        P.merged_scores(x, rng.standard_normal((3, 6)), context=context, scale=1.0)
    with pytest.raises(ValueError, match="same width d_k"):
        P.merge_qk(rng.standard_normal((4, 2)), rng.standard_normal((4, 3)))
