"""Tests for attnlib.linear_attention: the definition, the parallel and recurrent forms.

The reference is a float64 loop over queries and keys written from the definition
``o_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)`` with phi computed by
torch's own ``F.elu``: no code shared with attnlib.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlib import linear_attention as la
from attnlib.masks import causal_mask

from conftest import BACKENDS, to_backend, to_numpy

SIZES = [(1, 1), (2, 3), (3, 2), (17, 17), (31, 17), (17, 31)]


def elu1(x):
    return (F.elu(torch.tensor(np.asarray(x, dtype=np.float64))) + 1).numpy()


def reference(q, k, v, allowed=None, phi=elu1):
    """Float64 kernel attention, one query and one key at a time."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    L, S = q.shape[-2], k.shape[-2]
    q, k, v = (np.broadcast_to(a, batch + a.shape[-2:]) for a in (q, k, v))
    allowed = np.broadcast_to(np.ones((L, S), bool) if allowed is None else allowed,
                              batch + (L, S))
    out = np.zeros(batch + (L, v.shape[-1]))
    for idx in np.ndindex(*batch):
        fq, fk = phi(q[idx]), phi(k[idx])
        for i in range(L):
            num, den = np.zeros(v.shape[-1]), 0.0
            for j in range(S):
                if allowed[idx][i, j]:
                    w = float(fq[i] @ fk[j])
                    num += w * v[idx][j]
                    den += w
            if den != 0:
                out[idx][i] = num / den
    return out


def data(rng, L, S, d_k=4, d_v=3, batch=(2,)):
    return (rng.standard_normal(batch + (L, d_k)), rng.standard_normal(batch + (S, d_k)),
            rng.standard_normal(batch + (S, d_v)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_elu_feature_map(backend, rng):
    x = rng.standard_normal((5, 7)) * 4
    x[0, 0] = 0.0
    x[0, 1] = -800.0  # exp underflows to 0 without a warning or a NaN
    got = la.elu_feature_map(to_backend(x, backend))
    assert np.abs(to_numpy(got) - elu1(x)).max() < 1e-15
    assert np.all(to_numpy(got) >= 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("causal", [False, True])
def test_parallel_and_definition_match_reference(backend, L, S, causal, rng):
    q, k, v = data(rng, L, S)
    allowed = causal_mask(L, S) if causal else None
    ref = reference(q, k, v, allowed)
    tq, tk, tv = (to_backend(a, backend) for a in (q, k, v))
    for fn in (la.linear_attention, la.kernel_attention):
        got = fn(tq, tk, tv, causal=causal)
        assert type(got) is type(tq) and got.shape == (2, L, 3)
        assert np.abs(to_numpy(got) - ref).max() < 1e-10, fn.__name__


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 3, 17, 31])
def test_recurrent_equals_parallel(backend, n, rng):
    q, k, v = data(rng, n, n, d_k=5, d_v=2)
    tq, tk, tv = (to_backend(a, backend) for a in (q, k, v))
    rec, state = la.linear_attention_recurrent(tq, tk, tv)
    par = la.linear_attention(tq, tk, tv, causal=True)
    ref = reference(q, k, v, causal_mask(n))
    assert np.abs(to_numpy(rec) - to_numpy(par)).max() < 1e-10
    assert np.abs(to_numpy(rec) - ref).max() < 1e-10
    # The state is the sum over all tokens of phi(k_j) v_j^T and phi(k_j).
    fk = elu1(k)
    assert np.abs(to_numpy(state.kv) - np.einsum("bjr,bjd->brd", fk, v)).max() < 1e-10
    assert np.abs(to_numpy(state.z) - fk.sum(axis=1)).max() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrent_state_carries_on(backend, rng):
    q, k, v = (to_backend(a, backend) for a in data(rng, 20, 20))
    whole, _ = la.linear_attention_recurrent(q, k, v)
    parts, state = [], None
    for lo, hi in [(0, 7), (7, 8), (8, 20)]:  # a prompt, one decoded token, the rest
        out, state = la.linear_attention_recurrent(q[..., lo:hi, :], k[..., lo:hi, :],
                                                   v[..., lo:hi, :], state=state)
        parts.append(to_numpy(out))
    assert np.abs(np.concatenate(parts, axis=-2) - to_numpy(whole)).max() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_broadcasting(backend, rng):
    L, S = 9, 13
    q = rng.standard_normal((2, 3, L, 4))
    k = rng.standard_normal((1, 3, S, 4))
    v = rng.standard_normal((2, 1, S, 6))
    m = rng.random((L, S)) < 0.4
    m[2] = False  # a query with no key: zeros
    got = la.kernel_attention(*(to_backend(a, backend) for a in (q, k, v, m)))
    ref = reference(q, k, v, m)
    assert got.shape == (2, 3, L, 6)
    assert np.abs(to_numpy(got) - ref).max() < 1e-10
    assert np.all(to_numpy(got)[..., 2, :] == 0)
    w = to_numpy(la.kernel_attention_weights(to_backend(q, backend), to_backend(k, backend),
                                             to_backend(m, backend)))
    rows = w.sum(axis=-1)
    assert np.abs(np.delete(rows, 2, axis=-1) - 1).max() < 1e-12
    assert np.all(w[..., ~m] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_custom_feature_map_with_other_width(backend, causal, rng):
    # phi(x) = [x^2, 1]: r = d_k + 1, non-negative; not elementwise.
    def phi_np(x):
        return np.concatenate([x**2, np.ones(x.shape[:-1] + (1,))], axis=-1)

    def phi(x):
        if isinstance(x, torch.Tensor):
            return torch.cat([x**2, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], dim=-1)
        return phi_np(x)

    q, k, v = data(rng, 11, 11, d_k=3, d_v=4)
    ref = reference(q, k, v, causal_mask(11) if causal else None, phi=phi_np)
    tq, tk, tv = (to_backend(a, backend) for a in (q, k, v))
    got = la.linear_attention(tq, tk, tv, feature_map=phi, causal=causal)
    assert np.abs(to_numpy(got) - ref).max() < 1e-10
    if causal:
        rec, state = la.linear_attention_recurrent(tq, tk, tv, feature_map=phi)
        assert np.abs(to_numpy(rec) - ref).max() < 1e-10
        assert tuple(state.kv.shape) == (2, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_features_give_zero_output(backend, rng):
    # A ReLU feature map can switch every feature off: no NaN, a zero output.
    q, k, v = data(rng, 6, 6)
    q[:, 0] = -1.0  # relu(q_0) = 0
    relu = (lambda x: np.maximum(x, 0)) if backend == "numpy" else torch.relu
    for out in (la.linear_attention(*(to_backend(a, backend) for a in (q, k, v)),
                                    feature_map=relu),
                la.linear_attention(*(to_backend(a, backend) for a in (q, k, v)),
                                    feature_map=relu, causal=True)):
        out = to_numpy(out)
        assert np.isfinite(out).all() and np.all(out[:, 0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend, rng):
    q, k, v = data(rng, 31, 31)
    args = [to_backend(a, backend, "float32") for a in (q, k, v)]
    ref = reference(q, k, v, causal_mask(31))
    for out in (la.linear_attention(*args, causal=True),
                la.linear_attention_recurrent(*args)[0]):
        assert str(out.dtype).endswith("float32")
        assert np.abs(to_numpy(out) - ref).max() < 1e-5


def test_gradients_match_the_definition():
    gen = torch.Generator().manual_seed(0)
    grads = []
    for fn in (lambda q, k, v: la.linear_attention(q, k, v, causal=True),
               lambda q, k, v: la.linear_attention_recurrent(q, k, v)[0],
               lambda q, k, v: la.kernel_attention(q, k, v, causal=True)):
        gen.manual_seed(0)
        q, k, v = (torch.randn(2, 13, 4, generator=gen, dtype=torch.float64,
                               requires_grad=True) for _ in range(3))
        (fn(q, k, v) ** 2).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert (a - b).abs().max() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_positive_random_features_are_unbiased(backend, rng):
    d_k, scale = 4, 0.5
    q = rng.standard_normal((3, d_k)) * 0.6
    k = rng.standard_normal((5, d_k)) * 0.6
    phi = la.positive_random_features(d_k, 200_000, seed=1, scale=scale)
    fq, fk = phi(to_backend(q, backend)), phi(to_backend(k, backend))
    assert tuple(fq.shape) == (3, 200_000) and np.all(to_numpy(fq) > 0)
    estimate = to_numpy(fq @ fk.T)
    exact = np.exp(scale * q @ k.T)
    assert np.abs(estimate / exact - 1).max() < 0.03
    again = la.positive_random_features(d_k, 200_000, seed=1, scale=scale)(to_backend(q, backend))
    assert np.array_equal(to_numpy(again), to_numpy(fq))


def test_random_features_approach_softmax_attention(rng):
    # With scale 1/sqrt(d_k), linear attention with many positive random features
    # estimates softmax attention; more features, less error.
    import attnlib
    # Short queries and keys keep the estimator's relative variance near 1 per feature
    # (it is exp(|x + y|^2) - 1), so 10^5 features give errors of order 10^-3.
    q, k, v = data(rng, 8, 12, d_k=4, d_v=3, batch=())
    q, k = 0.3 * q, 0.3 * k
    exact = attnlib.scaled_dot_product_attention(q, k, v)
    errors = []
    for r in (16, 100_000):
        phi = la.positive_random_features(4, r, seed=0, scale=0.5)
        errors.append(np.abs(la.linear_attention(q, k, v, feature_map=phi) - exact).max())
    assert errors[1] < 0.005 and errors[0] > 5 * errors[1]


def test_bad_inputs(rng):
    q, k, v = data(rng, 5, 5)
    with pytest.raises(TypeError, match="feature_map"):
        la.linear_attention(q, k, v, feature_map="elu")
    with pytest.raises(ValueError, match="feature_map must map"):
        la.linear_attention(q, k, v, feature_map=lambda x: x[..., 0])
    with pytest.raises(ValueError, match="L = S"):
        la.linear_attention_recurrent(q, k[:, :4], v[:, :4])
    with pytest.raises(ValueError, match="state must hold"):
        la.linear_attention_recurrent(q, k, v, state=la.LinearAttentionState(
            np.zeros((2, 3, 3)), np.zeros((2, 3))))
    with pytest.raises(ValueError, match="d_k"):
        la.linear_attention(q[..., :3], k, v)
    with pytest.raises(ValueError, match="number of keys S"):
        la.linear_attention(q, k, v[:, :4])
    with pytest.raises(TypeError, match="floating"):
        la.linear_attention(q.astype(int), k, v)
    with pytest.raises(TypeError, match="mask must be boolean"):
        la.kernel_attention(q, k, v, np.zeros((5, 5)))
    with pytest.raises(ValueError, match="n_features"):
        la.positive_random_features(4, 0)
    with pytest.raises(ValueError, match="d_k"):
        la.positive_random_features(-1, 8)
    with pytest.raises(ValueError, match="scale"):
        la.positive_random_features(4, 8, scale=-1.0)
    with pytest.raises(ValueError, match="d_k = 4"):
        la.positive_random_features(4, 8)(np.zeros((2, 3)))
