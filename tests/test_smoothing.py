"""attnlib.smoothing against a float64 loop written from the definition, against
torch's fused attention, and at the limits of the bandwidth."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnlib
from attnlib import smoothing
from conftest import BACKENDS, to_backend, to_numpy

TOL = {"float32": 2e-5, "float64": 1e-12}


def reference_nw(xq, xt, y, kernel, h):
    """Nadaraya–Watson from the definition: kernel values, their sum, their ratio.

    Plain Python loops in float64, one query at a time; no softmax, no attnlib.
    """
    xq, xt, y = (np.asarray(a, dtype=np.float64) for a in (xq, xt, y))
    scalar_y = y.ndim == 1
    xq = xq[:, None] if xq.ndim == 1 else xq
    xt = xt[:, None] if xt.ndim == 1 else xt
    y = y[:, None] if scalar_y else y
    batch = np.broadcast_shapes(xq.shape[:-2], xt.shape[:-2], y.shape[:-2])
    xq = np.broadcast_to(xq, batch + xq.shape[-2:])
    xt = np.broadcast_to(xt, batch + xt.shape[-2:])
    y = np.broadcast_to(y, batch + y.shape[-2:])
    out = np.zeros(batch + (xq.shape[-2], y.shape[-1]))
    for idx in np.ndindex(*batch):
        for i, x in enumerate(xq[idx]):
            ks = []
            for xj in xt[idx]:
                dist2 = sum((a - b) ** 2 for a, b in zip(x, xj))
                if kernel == "gaussian":
                    ks.append(math.exp(-dist2 / (2 * h * h)))
                elif kernel == "laplace":
                    ks.append(math.exp(-math.sqrt(dist2) / h))
                else:
                    ks.append(math.exp(sum(a * b for a, b in zip(x, xj)) / (h * h)))
            total = sum(ks)
            out[idx][i] = sum(kj * yj for kj, yj in zip(ks, y[idx])) / total
    return out[..., 0] if scalar_y else out


# (x_query shape, x_train shape, y_train shape): scalar inputs, 1s, primes, L != S,
# d != d_v, batch dimensions and their broadcasting.
SHAPES = [
    ((1,), (1,), (1,)),
    ((3,), (17,), (17,)),
    ((31, 1), (2, 1), (2, 1)),
    ((5, 2), (17, 2), (17, 3)),
    ((2, 3, 3), (2, 31, 3), (2, 31, 1)),
    ((4, 2), (3, 7, 2), (3, 7, 5)),
]


def _data(rng, shapes, scale=1.0):
    return tuple(rng.standard_normal(s) * scale for s in shapes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("kernel", smoothing.KERNELS)
def test_matches_loop_reference(rng, backend, dtype, shapes, kernel):
    xq, xt, y = _data(rng, shapes)
    h = 0.7
    out = smoothing.nadaraya_watson(*(to_backend(a, backend, dtype) for a in (xq, xt, y)),
                                    kernel=kernel, bandwidth=h)
    assert type(out) is (np.ndarray if backend == "numpy" else torch.Tensor)
    assert str(out.dtype).endswith(dtype)
    expected = reference_nw(xq, xt, y, kernel, h)
    assert out.shape == expected.shape
    np.testing.assert_allclose(to_numpy(out), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", smoothing.KERNELS)
def test_weights_and_kernels(rng, backend, kernel):
    xq, xt = rng.standard_normal((4, 2)), rng.standard_normal((9, 2))
    w = to_numpy(smoothing.nadaraya_watson_weights(to_backend(xq, backend),
                                                   to_backend(xt, backend), kernel, 0.8))
    assert w.shape == (4, 9) and np.all(w >= 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-12)
    fn = {"gaussian": smoothing.gaussian_kernel, "laplace": smoothing.laplace_kernel,
          "exponential": smoothing.exponential_kernel}[kernel]
    K = to_numpy(fn(to_backend(xq, backend), to_backend(xt, backend), 0.8))
    np.testing.assert_allclose(w, K / K.sum(-1, keepdims=True), atol=1e-12)


def test_kernel_values_by_hand():
    x0, pts = np.array([0.0]), np.array([1.0, 2.0])
    np.testing.assert_allclose(smoothing.gaussian_kernel(x0, pts, 1.0),
                               [[math.exp(-0.5), math.exp(-2.0)]], rtol=1e-15)
    np.testing.assert_allclose(smoothing.laplace_kernel(x0, pts, 2.0),
                               [[math.exp(-0.5), math.exp(-1.0)]], rtol=1e-15)
    K = smoothing.exponential_kernel(np.array([2.0]), np.array([1.0, -1.0]), 1.0)
    np.testing.assert_allclose(K, [[math.exp(2.0), math.exp(-2.0)]], rtol=1e-15)
    # 2-D: distance is Euclidean (3-4-5 triangle)
    K = smoothing.laplace_kernel(np.zeros((1, 2)), np.array([[3.0, 4.0]]), 5.0)
    np.testing.assert_allclose(K, [[math.exp(-1.0)]], rtol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h", [0.3, 1.0, 2.5])
def test_gaussian_and_exponential_are_attnlib_sdpa(rng, backend, h):
    """Gaussian = dot product with scale 1/h^2 plus the key bias -||x_j||^2 / (2 h^2)."""
    xq, xt, y = _data(rng, ((2, 5, 3), (2, 7, 3), (2, 7, 4)))
    q, k, v = (to_backend(a, backend) for a in (xq, xt, y))
    bias = -(xt**2).sum(-1)[:, None, :] / (2 * h * h)  # (B, 1, S)
    sdpa = attnlib.scaled_dot_product_attention(q, k, v, mask=to_backend(bias, backend),
                                                scale=1 / h**2)
    nw = smoothing.nadaraya_watson(q, k, v, "gaussian", h)
    np.testing.assert_allclose(to_numpy(nw), to_numpy(sdpa), atol=1e-12)
    sdpa = attnlib.scaled_dot_product_attention(q, k, v, scale=1 / h**2)
    nw = smoothing.nadaraya_watson(q, k, v, "exponential", h)
    np.testing.assert_allclose(to_numpy(nw), to_numpy(sdpa), atol=1e-12)


@pytest.mark.parametrize("kernel", smoothing.KERNELS)
def test_matches_torch_fused_attention_with_a_bias(rng, kernel):
    """torch's SDPA with zero queries/keys and the log-kernel as an additive mask."""
    xq, xt, y = (torch.from_numpy(a) for a in _data(rng, ((6, 2), (11, 2), (11, 3))))
    h = 0.9
    if kernel == "gaussian":
        bias = -torch.cdist(xq, xt) ** 2 / (2 * h * h)
    elif kernel == "laplace":
        bias = -torch.cdist(xq, xt) / h
    else:
        bias = xq @ xt.T / h**2
    ref = F.scaled_dot_product_attention(torch.zeros(6, 1, dtype=torch.float64),
                                         torch.zeros(11, 1, dtype=torch.float64), y,
                                         attn_mask=bias)
    out = smoothing.nadaraya_watson(xq, xt, y, kernel, h)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["gaussian", "laplace"])
def test_bandwidth_limits(rng, backend, kernel):
    """h -> 0: nearest-neighbour regression (a hard lookup); h -> inf: the mean."""
    xt = np.sort(rng.uniform(0, 5, 13))
    y = rng.standard_normal(13)
    xq = rng.uniform(0, 5, 8)
    nearest = y[np.abs(xq[:, None] - xt[None, :]).argmin(-1)]
    small = smoothing.nadaraya_watson(*(to_backend(a, backend) for a in (xq, xt, y)),
                                      kernel=kernel, bandwidth=1e-4)
    np.testing.assert_allclose(to_numpy(small), nearest, atol=1e-12)
    big = smoothing.nadaraya_watson(*(to_backend(a, backend) for a in (xq, xt, y)),
                                    kernel=kernel, bandwidth=1e7)
    np.testing.assert_allclose(to_numpy(big), np.full(8, y.mean()), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", smoothing.KERNELS)
def test_predictions_in_convex_hull_and_no_overflow(rng, backend, kernel):
    xq, xt, y = _data(rng, ((40,), (25,), (25,)), scale=30.0)
    out = to_numpy(smoothing.nadaraya_watson(*(to_backend(a, backend, "float32")
                                               for a in (xq, xt, y)),
                                             kernel=kernel, bandwidth=0.05))
    assert np.all(np.isfinite(out))
    assert np.all(out >= y.astype(np.float32).min() - 1e-4)
    assert np.all(out <= y.astype(np.float32).max() + 1e-4)


@pytest.mark.parametrize("kernel", smoothing.KERNELS)
def test_gradcheck(rng, kernel):
    xq, xt, y = (torch.from_numpy(a).requires_grad_()
                 for a in _data(rng, ((3, 2), (5, 2), (5, 2))))
    assert torch.autograd.gradcheck(
        lambda a, b, c: smoothing.nadaraya_watson(a, b, c, kernel, 0.8), (xq, xt, y))


def test_laplace_gradient_finite_at_a_training_point():
    xt = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, 3.0], dtype=torch.float64)
    xq = torch.tensor([1.0], dtype=torch.float64, requires_grad=True)  # distance 0 to xt[1]
    smoothing.nadaraya_watson(xq, xt, y, "laplace", 0.5).sum().backward()
    assert torch.isfinite(xq.grad).all()


def test_torch_float16_and_device_kept(rng):
    xq, xt, y = (torch.from_numpy(a).half() for a in _data(rng, ((4,), (6,), (6,))))
    out = smoothing.nadaraya_watson(xq, xt, y, "gaussian", 0.5)
    assert out.dtype == torch.float16 and out.device == xq.device
    ref = reference_nw(xq.double().numpy(), xt.double().numpy(), y.double().numpy(),
                       "gaussian", 0.5)
    assert np.abs(out.double().numpy() - ref).max() < 1e-2


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, error, words", [
    ("kernel", ValueError, ["kernel", "'cosine'"]),
    ("h0", ValueError, ["bandwidth", "0"]),
    ("hneg", ValueError, ["bandwidth", "-1"]),
    ("hnan", ValueError, ["bandwidth", "nan"]),
    ("hbool", ValueError, ["bandwidth", "True"]),
    ("d", ValueError, ["x_query", "x_train", "(4, 2)", "(6, 3)"]),
    ("S", ValueError, ["x_train", "y_train", "(6, 2)", "(5,)"]),
    ("scalar_vs_vector", ValueError, ["x_query", "(3, 6)", "(6,)"]),
    ("int", TypeError, ["y_train", "floating"]),
    ("int_query", TypeError, ["x_query", "floating"]),
    ("dtypes", TypeError, ["x_train", "dtype"]),
    ("batch", ValueError, ["broadcast", "(2,)", "(3,)"]),
    ("scalar0d", ValueError, ["x_query", "at least 1"]),
    ("list", TypeError, ["x_train", "list"]),
])
def test_bad_input_names_the_argument(rng, backend, case, error, words):
    xq, xt, y = rng.standard_normal((4, 2)), rng.standard_normal((6, 2)), rng.standard_normal(6)
    kernel, h = "gaussian", 1.0
    if case == "kernel":
        kernel = "cosine"
    elif case.startswith("h"):
        h = {"h0": 0, "hneg": -1.0, "hnan": float("nan"), "hbool": True}[case]
    elif case == "d":
        xt = rng.standard_normal((6, 3))
    elif case == "S":
        y = y[:5]
    elif case == "scalar_vs_vector":
        xq, xt = rng.standard_normal((3, 6)), rng.standard_normal(6)
    elif case == "int":
        y = np.arange(6)
    elif case == "int_query":
        xq = np.ones((4, 2), dtype=np.int64)
    elif case == "dtypes":
        xt = xt.astype(np.float32)
    elif case == "batch":
        xq, xt, y = (rng.standard_normal((2, 4, 2)), rng.standard_normal((3, 6, 2)),
                     rng.standard_normal((3, 6, 1)))
    elif case == "scalar0d":
        xq = np.array(1.0)
    args = [to_backend(a, backend) for a in (xq, xt, y)]
    if case == "list":
        args[1] = xt.tolist()
    if case == "scalar0d" and backend == "torch":
        args[0] = torch.tensor(1.0, dtype=torch.float64)  # to_backend would make it 1-D
    with pytest.raises(error) as info:
        smoothing.nadaraya_watson(*args, kernel=kernel, bandwidth=h)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_mixed_backends_refused(rng):
    with pytest.raises(TypeError, match="x_train is a torch tensor"):
        smoothing.nadaraya_watson(np.zeros(3), torch.zeros(4, dtype=torch.float64), np.zeros(4))
