"""attnlib.scoring against float64 loops written from the definitions, and torch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib import scoring as sc
from conftest import BACKENDS, reference_attention, to_backend, to_numpy

TOL = {"float32": 3e-5, "float64": 1e-12}

# (batch dims of q, batch dims of k, L, S, d_q, d_k, d_a)
SHAPES = [
    ((), (), 1, 1, 1, 1, 1),
    ((), (), 3, 2, 2, 5, 3),
    ((2,), (2,), 17, 31, 3, 3, 7),
    ((2, 3), (1, 3), 5, 2, 4, 6, 1),
    ((1,), (3,), 2, 3, 16, 8, 17),
]


def _loop_scores(kind, q, k, **p):
    """One score at a time, in float64, straight from the formula."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    q = np.broadcast_to(q, batch + q.shape[-2:])
    k = np.broadcast_to(k, batch + k.shape[-2:])
    L, S = q.shape[-2], k.shape[-2]
    out = np.zeros(batch + (L, S))
    for idx in np.ndindex(*batch):
        for i in range(L):
            for j in range(S):
                a, b = q[idx][i], k[idx][j]
                if kind == "dot":
                    s = sum(x * y for x, y in zip(a, b))
                elif kind == "scaled_dot":
                    s = sum(x * y for x, y in zip(a, b)) / math.sqrt(len(a))
                elif kind == "bilinear":
                    w = p["w"]
                    s = sum(a[m] * w[m, n] * b[n] for m in range(len(a)) for n in range(len(b)))
                elif kind.startswith("additive"):
                    h = [math.tanh(sum(a[m] * p["w_q"][m, c] for m in range(len(a)))
                                   + sum(b[n] * p["w_k"][n, c] for n in range(len(b)))
                                   + (p["b"][c] if "b" in p else 0.0))
                         for c in range(len(p["v_a"]))]
                    s = sum(p["v_a"][c] * h[c] for c in range(len(h)))
                elif kind == "cosine":
                    s = (a @ b) / (math.sqrt(a @ a) * math.sqrt(b @ b)) / p["temperature"]
                out[idx][i, j] = s
    return out


def _inputs(rng, shape, kind):
    bq, bk, L, S, dq, dk, da = shape
    if kind in ("dot", "scaled_dot", "cosine"):
        dq = dk
    q, k = rng.standard_normal(bq + (L, dq)), rng.standard_normal(bk + (S, dk))
    params = {"dot": {}, "scaled_dot": {}, "cosine": {"temperature": 0.3},
              "bilinear": {"w": rng.standard_normal((dq, dk))},
              "additive": {"w_q": rng.standard_normal((dq, da)) / math.sqrt(dq),
                           "w_k": rng.standard_normal((dk, da)) / math.sqrt(dk),
                           "v_a": rng.standard_normal(da)}}
    params["additive_bias"] = {**params["additive"], "b": rng.standard_normal(da)}
    params = params[kind]
    return q, k, params


FUNCS = {"dot": sc.dot_scores, "scaled_dot": sc.scaled_dot_scores,
         "bilinear": sc.bilinear_scores, "additive": sc.additive_scores,
         "additive_bias": sc.additive_scores, "cosine": sc.cosine_scores}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", list(FUNCS))
def test_scores_match_loops(rng, backend, dtype, shape, kind):
    q, k, params = _inputs(rng, shape, kind)
    conv = {n: (p if isinstance(p, float) else to_backend(p, backend, dtype))
            for n, p in params.items()}
    out = FUNCS[kind](to_backend(q, backend, dtype), to_backend(k, backend, dtype), **conv)
    assert type(out) is (np.ndarray if backend == "numpy" else torch.Tensor)
    assert str(out.dtype).endswith(dtype)
    expected = _loop_scores(kind, q, k, **params)
    assert out.shape == expected.shape
    np.testing.assert_allclose(to_numpy(out), expected, atol=TOL[dtype] * 10,
                               rtol=TOL[dtype])


def test_scores_match_torch_functions(rng):
    q, k = torch.randn(2, 5, 4, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    w = torch.randn(4, 6, dtype=torch.float64)
    # F.bilinear(x1, x2, A) = x1^T A[o] x2 for paired rows; pair every query with every key
    qq = q[:, :, None].expand(2, 5, 7, 4).reshape(-1, 4)
    kk = k[:, None].expand(2, 5, 7, 6).reshape(-1, 6)
    ref = F.bilinear(qq, kk, w[None]).reshape(2, 5, 7)
    torch.testing.assert_close(sc.bilinear_scores(q, k, w), ref, atol=1e-12, rtol=1e-12)
    k4 = torch.randn(2, 7, 4, dtype=torch.float64)
    cos = F.cosine_similarity(q[:, :, None], k4[:, None], dim=-1) / 0.05
    torch.testing.assert_close(sc.cosine_scores(q, k4, 0.05), cos, atol=1e-10, rtol=1e-12)
    # additive = a one-hidden-layer MLP applied to every (query, key) pair
    w_q = torch.nn.Linear(4, 9, bias=False).double()
    w_k = torch.nn.Linear(6, 9, bias=False).double()
    v_a = torch.nn.Linear(9, 1, bias=False).double()
    mlp = v_a(torch.tanh(w_q(q)[:, :, None] + w_k(k)[:, None]))[..., 0]
    ours = sc.additive_scores(q, k, w_q.weight.T, w_k.weight.T, v_a.weight[0])
    torch.testing.assert_close(ours, mlp, atol=1e-12, rtol=1e-12)
    # with a bias inside the tanh (a Linear layer with bias on the query side)
    w_qb = torch.nn.Linear(4, 9).double()
    mlp = v_a(torch.tanh(w_qb(q)[:, :, None] + w_k(k)[:, None]))[..., 0]
    ours = sc.additive_scores(q, k, w_qb.weight.T, w_k.weight.T, v_a.weight[0], w_qb.bias)
    torch.testing.assert_close(ours, mlp, atol=1e-12, rtol=1e-12)
    # without a bias the score is odd: s(-q, -k) = -s(q, k)
    odd = sc.additive_scores(-q, -k, w_q.weight.T, w_k.weight.T, v_a.weight[0])
    torch.testing.assert_close(odd, -sc.additive_scores(q, k, w_q.weight.T, w_k.weight.T,
                                                        v_a.weight[0]), atol=1e-12, rtol=0)


def test_special_cases_agree(rng):
    q, k = rng.standard_normal((3, 5)), rng.standard_normal((4, 5))
    np.testing.assert_allclose(sc.bilinear_scores(q, k, np.eye(5)), q @ k.T, atol=1e-14)
    np.testing.assert_allclose(sc.bilinear_scores(q, k, np.eye(5) / math.sqrt(5)),
                               sc.scaled_dot_scores(q, k), atol=1e-14)
    # cosine ignores lengths; a zero vector gives zero scores, not NaN
    np.testing.assert_allclose(sc.cosine_scores(3 * q, 0.1 * k), sc.cosine_scores(q, k),
                               atol=1e-14)
    z = sc.cosine_scores(np.zeros((2, 5)), k)
    assert np.all(z == 0)
    assert np.abs(sc.cosine_scores(q, k, 0.25)).max() <= 4 + 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("L, S", [(1, 1), (3, 5), (6, 4), (17, 31)])
def test_attend_with_scaled_dot_equals_sdpa(rng, backend, causal, L, S):
    q, k, v = (rng.standard_normal(s) for s in ((2, L, 3), (2, S, 3), (2, S, 5)))
    mask = rng.random((2, L, S)) > 0.3
    mask[0, 0] = False
    allowed = mask & attnlib.causal_mask(L, S) if causal else mask
    tq, tk, tv, tm = (to_backend(a, backend) for a in (q, k, v, mask))
    out, w = sc.attend(sc.scaled_dot_scores(tq, tk), tv, tm, causal=causal,
                       return_weights=True)
    np.testing.assert_allclose(to_numpy(out), reference_attention(q, k, v, allowed), atol=1e-12)
    np.testing.assert_allclose(
        to_numpy(out), to_numpy(attnlib.scaled_dot_product_attention(tq, tk, tv, tm,
                                                                      causal=causal)),
        atol=1e-14)
    assert np.all(to_numpy(w)[~np.broadcast_to(allowed, w.shape)] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attend_float_mask_is_added(rng, backend):
    scores, v = rng.standard_normal((2, 3, 4)), rng.standard_normal((4, 2))
    bias = rng.standard_normal((3, 4))
    out = sc.attend(to_backend(scores, backend), to_backend(v, backend),
                    to_backend(bias, backend))
    ref = torch.softmax(torch.from_numpy(scores + bias), -1) @ torch.from_numpy(v)
    np.testing.assert_allclose(to_numpy(out), ref.numpy(), atol=1e-14)


@pytest.mark.parametrize("kind", ["bilinear", "additive", "additive_bias", "cosine"])
def test_parameters_get_gradients(rng, kind):
    """gradcheck: autograd through our scores equals finite differences."""
    q, k, params = _inputs(rng, ((2,), (2,), 3, 4, 3, 5, 2), kind)
    if kind == "cosine":
        params = {"temperature": np.array(0.7)}
    tensors = [torch.from_numpy(a).requires_grad_() for a in (q, k, *params.values())]
    v = torch.from_numpy(rng.standard_normal((2, 4, 2)))

    def f(q, k, *p):
        return sc.attend(FUNCS[kind](q, k, **dict(zip(params, p))), v, causal=True)

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, error, words", [
    ("w_shape", ValueError, ["w", "(d_q, d_k)", "(3, 4)", "(4, 3)"]),
    ("w_q_shape", ValueError, ["w_q", "(d_q, d_a)", "(4, 2)"]),
    ("w_k_shape", ValueError, ["w_k", "(d_k, d_a)", "(4, 2)", "(3, 2)"]),
    ("v_a_shape", ValueError, ["v_a", "(d_a,)", "(2,)", "(3,)"]),
    ("b_shape", ValueError, ["b must", "(d_a,)", "(2,)", "(1, 2)"]),
    ("temperature", ValueError, ["temperature", "positive"]),
    ("cos_width", ValueError, ["q and k", "d_k"]),
    ("w_dtype", TypeError, ["dtype", "w is", "float32"]),
    ("attend_v", ValueError, ["v", "(2, 5, 4)", "(3, 6)"]),
    ("attend_mask", ValueError, ["mask", "(5, 5)"]),
    ("batch", ValueError, ["broadcast", "q (2,)", "k (3,)"]),
])
def test_bad_input_names_the_argument(rng, backend, case, error, words):
    q, k = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 4, 4))
    f = lambda a: to_backend(a, backend)  # noqa: E731
    with pytest.raises(error) as info:
        if case == "w_shape":
            sc.bilinear_scores(f(q), f(k), f(rng.standard_normal((4, 3))))
        elif case == "b_shape":
            sc.additive_scores(*map(f, (q, k, np.ones((3, 2)), np.ones((4, 2)), np.ones(2),
                                        np.ones((1, 2)))))
        elif case in ("w_q_shape", "w_k_shape", "v_a_shape"):
            w_q, w_k, v_a = np.ones((3, 2)), np.ones((4, 2)), np.ones(2)
            if case == "w_q_shape":
                w_q = np.ones((4, 2))
            elif case == "w_k_shape":
                w_k = np.ones((3, 2))
            else:
                v_a = np.ones(3)
            sc.additive_scores(f(q), f(k), f(w_q), f(w_k), f(v_a))
        elif case == "temperature":
            sc.cosine_scores(f(q), f(q), temperature=0.0)
        elif case == "cos_width":
            sc.cosine_scores(f(q), f(k))
        elif case == "w_dtype":
            sc.bilinear_scores(f(q), f(k), f(np.ones((3, 4), np.float32)))
        elif case == "attend_v":
            sc.attend(f(np.ones((2, 5, 4))), f(np.ones((3, 6))))
        elif case == "attend_mask":
            sc.attend(f(np.ones((2, 5, 4))), f(np.ones((4, 6))), f(np.ones((5, 5), bool)))
        elif case == "batch":
            sc.bilinear_scores(f(q), f(np.ones((3, 4, 4))), f(np.ones((3, 4))))
    for w in words:
        assert w in str(info.value), (w, str(info.value))
