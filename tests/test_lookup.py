"""attnlib.lookup: the hard table, and the soft lookup as its temperature goes to 0 and inf."""

import numpy as np
import pytest
import torch

import attnlib
from conftest import BACKENDS, to_backend, to_numpy


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_lookup_returns_the_matching_row(backend):
    keys = np.eye(4)  # one-hot keys: an exact-match table
    values = np.arange(12.0).reshape(4, 3)
    queries = np.eye(4)[[2, 0, 3]]
    out = attnlib.hard_lookup(*(to_backend(a, backend) for a in (queries, keys, values)))
    np.testing.assert_array_equal(to_numpy(out), values[[2, 0, 3]])


def test_hard_lookup_breaks_ties_with_the_first_key():
    out = attnlib.hard_lookup(np.ones((1, 2)), np.ones((3, 2)), np.arange(3.0)[:, None])
    assert out[0, 0] == 0.0


def test_hard_lookup_passes_no_gradient_to_queries_or_keys(rng):
    q = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    out = attnlib.hard_lookup(q, k, v)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert dq is None and dk is None  # no path from q or k to the output
    assert (dv.abs().sum(-1) > 0).sum() <= 2  # at most one table row per query is touched


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_lookup_limits(rng, backend):
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((6, 4)), rng.standard_normal((6, 2))
    args = [to_backend(a, backend) for a in (q, k, v)]
    cold = to_numpy(attnlib.soft_lookup(*args, temperature=1e-4))
    np.testing.assert_allclose(cold, to_numpy(attnlib.hard_lookup(*args)), atol=1e-8)
    hot = to_numpy(attnlib.soft_lookup(*args, temperature=1e8))
    np.testing.assert_allclose(hot, np.broadcast_to(v.mean(0), (3, 2)), atol=1e-6)
    mid = to_numpy(attnlib.soft_lookup(*args, temperature=2.0))
    np.testing.assert_allclose(
        mid, to_numpy(attnlib.scaled_dot_product_attention(*args, scale=0.5)), atol=1e-12)


@pytest.mark.parametrize("t", [0, -1.0, float("inf"), float("nan")])
def test_soft_lookup_refuses_bad_temperature(rng, t):
    q = rng.standard_normal((1, 2))
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        attnlib.soft_lookup(q, q, q, temperature=t)
