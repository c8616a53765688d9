"""attnlib.softmax and attnlib.logsumexp against torch, at the edges of float range."""

import numpy as np
import pytest
import torch

import attnlib
from conftest import BACKENDS, to_backend, to_numpy


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_matches_torch(rng, backend, axis):
    x = rng.standard_normal((3, 4, 5)) * 10
    out = attnlib.softmax(to_backend(x, backend), axis=axis)
    np.testing.assert_allclose(to_numpy(out), torch.softmax(torch.from_numpy(x), axis).numpy(),
                               atol=1e-14)
    lse = attnlib.logsumexp(to_backend(x, backend), axis=axis)
    np.testing.assert_allclose(to_numpy(lse), torch.logsumexp(torch.from_numpy(x), axis).numpy(),
                               atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, big", [("float16", 6e4), ("float32", 1e4), ("float64", 1e300)])
def test_no_overflow_for_large_logits(backend, dtype, big):
    x = np.array([[big, big / 2, -big], [0.0, big, big]])
    out = to_numpy(attnlib.softmax(to_backend(x, backend, dtype)))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, [[1, 0, 0], [0, 0.5, 0.5]], atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_minus_inf_give_zeros(backend):
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, 0.0]])
    out = to_numpy(attnlib.softmax(to_backend(x, backend)))
    np.testing.assert_array_equal(out, [[0, 0, 0], [0.5, 0, 0.5]])
    lse = to_numpy(attnlib.logsumexp(to_backend(x, backend)))
    assert lse[0] == -np.inf and np.isclose(lse[1], np.log(2))


def test_minus_inf_rows_have_finite_gradients():
    x = torch.tensor([[-np.inf, -np.inf], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    (attnlib.softmax(x) * torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shift_invariance(rng, backend):
    x = rng.standard_normal((4, 6))
    a = to_numpy(attnlib.softmax(to_backend(x, backend)))
    b = to_numpy(attnlib.softmax(to_backend(x + 123.0, backend)))
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_softmax_refuses_integers_and_lists():
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        attnlib.softmax(np.arange(3))
    with pytest.raises(TypeError, match="x must be a NumPy array or a torch tensor"):
        attnlib.softmax([1.0, 2.0])
