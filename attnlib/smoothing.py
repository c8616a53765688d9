"""Kernel smoothing: Nadaraya–Watson regression as attention (chapter 2).

Nadaraya–Watson regression predicts the target at a query point ``x`` as a weighted
mean of the training targets ``y_j``, with weights given by a kernel ``K(x, x_j)`` and
normalised to sum to one::

    y_hat(x) = sum_j K(x, x_j) y_j / sum_j K(x, x_j)

Every kernel here is the exponential of a *score*, ``K = exp(score)``, so the weights
are ``softmax_j(score(x, x_j))``: the query is the test input, the keys are the
training inputs, the values are the training targets, and the regression is attention.

==============  ===================================  ==================================
kernel          score(x, x_j)                        as attention
==============  ===================================  ==================================
``gaussian``    ``-||x - x_j||^2 / (2 h^2)``         dot product with scale ``1/h^2``
                                                     plus a key bias
                                                     ``-||x_j||^2 / (2 h^2)``
``laplace``     ``-||x - x_j|| / h``                 a float mask (bias) on the scores
``exponential`` ``x . x_j / h^2``                    dot product with scale ``1/h^2``
==============  ===================================  ==================================

The bandwidth ``h`` plays the part of a temperature: small ``h`` gives one-hot weights
(nearest-neighbour regression, a hard lookup), large ``h`` gives uniform weights (the
mean of all targets).  The exponential ("dot-product") kernel uses ``h^2`` so that
``gaussian = exponential * (a factor of the key alone) * (a factor of the query
alone)``, and the query factor cancels in the normalisation.

Shapes, in the book's letters: inputs are ``(..., L, d)`` for the L queries and
``(..., S, d)`` for the S training points; a 1-D array ``(L,)`` or ``(S,)`` means
scalar inputs (d = 1).  Targets are ``(..., S, d_v)``, or ``(S,)`` for scalar targets,
in which case the prediction is ``(..., L)``.
"""

from __future__ import annotations

import math
from typing import Any

from ._backend import broadcast_shapes, check_array, check_float, namespace, same_dtype
from .softmax import softmax

__all__ = [
    "KERNELS",
    "kernel_scores",
    "gaussian_kernel",
    "laplace_kernel",
    "exponential_kernel",
    "nadaraya_watson_weights",
    "nadaraya_watson",
]

KERNELS = ("gaussian", "laplace", "exponential")


def _check_bandwidth(bandwidth: Any) -> float:
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) \
            or not math.isfinite(bandwidth) or bandwidth <= 0:
        raise ValueError(f"bandwidth must be a positive finite number; got {bandwidth!r}")
    return float(bandwidth)


def _as_points(xp, x: Any, name: str, letter: str):
    """Validate an input array and return it as (..., N, d): 1-D means d = 1."""
    check_array(x, name, min_ndim=1, shape_hint=f"({letter},) or (..., {letter}, d)")
    check_float(xp, name, x)
    return x[:, None] if x.ndim == 1 else x  # (..., N, d)


def _check_inputs(x_query: Any, x_train: Any, y_train: Any = None):
    xp = namespace(x_query=x_query, x_train=x_train, y_train=y_train)
    q = _as_points(xp, x_query, "x_query", "L")  # (..., L, d)
    k = _as_points(xp, x_train, "x_train", "S")  # (..., S, d)
    same_dtype({"x_query": x_query, "x_train": x_train, "y_train": y_train})
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"x_query and x_train must have the same input width d (last dimension); "
            f"got x_query {tuple(x_query.shape)} and x_train {tuple(x_train.shape)}"
        )
    broadcast_shapes({"x_query": tuple(q.shape[:-2]), "x_train": tuple(k.shape[:-2])},
                     "the leading (batch) dimensions of x_query and x_train")
    return xp, q, k


def _scores(xp, q, k, kernel: str, h: float):
    """log K(x, x_j) for every query and training point: (..., L, S)."""
    if kernel == "exponential":
        return (q @ xp.matrix_transpose(k)) / h**2  # (..., L, S)
    diff = q[..., :, None, :] - k[..., None, :, :]  # (..., L, S, d)
    if kernel == "gaussian":
        return -xp.sum(diff * diff, axis=-1) / (2 * h**2)  # (..., L, S)
    return -xp.linalg.vector_norm(diff, axis=-1) / h  # laplace, (..., L, S)


def kernel_scores(x_query: Any, x_train: Any, kernel: str = "gaussian",
                  bandwidth: float = 1.0) -> Any:
    """The log-kernel ``log K(x_i, x_j)`` of every query and training point: (..., L, S).

    These are the attention *scores* of Nadaraya–Watson regression: the weights are
    their softmax over the S training points (see the table in the module docstring).

    Args:
        x_query: (L,) or (..., L, d), the points where a prediction is wanted.
        x_train: (S,) or (..., S, d), the training inputs.  Same dtype and backend.
        kernel: ``"gaussian"``, ``"laplace"`` or ``"exponential"`` (dot product).
        bandwidth: h > 0, the width of the kernel (its temperature).

    Returns:
        (..., L, S), same backend, device and dtype as the inputs.  See chapter 2.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    h = _check_bandwidth(bandwidth)
    xp, q, k = _check_inputs(x_query, x_train)
    return _scores(xp, q, k, kernel, h)


def gaussian_kernel(x_query: Any, x_train: Any, bandwidth: float = 1.0) -> Any:
    """``exp(-||x_i - x_j||^2 / (2 h^2))``: (..., L, S), shapes as :func:`kernel_scores`.

    The normalising constant of the Gaussian density is left out: it cancels in
    Nadaraya–Watson's ratio.
    """
    xp = namespace(x_query=x_query, x_train=x_train)
    return xp.exp(kernel_scores(x_query, x_train, "gaussian", bandwidth))


def laplace_kernel(x_query: Any, x_train: Any, bandwidth: float = 1.0) -> Any:
    """``exp(-||x_i - x_j|| / h)``: (..., L, S), shapes as :func:`kernel_scores`."""
    xp = namespace(x_query=x_query, x_train=x_train)
    return xp.exp(kernel_scores(x_query, x_train, "laplace", bandwidth))


def exponential_kernel(x_query: Any, x_train: Any, bandwidth: float = 1.0) -> Any:
    """The dot-product kernel ``exp(x_i . x_j / h^2)``: (..., L, S).

    Unlike the other two it does not depend on distance alone: a long training vector
    pointing the query's way gets a large value even when it is far away.  Values
    overflow for large products; use :func:`nadaraya_watson`, which never forms them.
    """
    xp = namespace(x_query=x_query, x_train=x_train)
    return xp.exp(kernel_scores(x_query, x_train, "exponential", bandwidth))


def nadaraya_watson_weights(x_query: Any, x_train: Any, kernel: str = "gaussian",
                            bandwidth: float = 1.0) -> Any:
    """Normalised kernel weights ``K(x_i, x_j) / sum_j K(x_i, x_j)``: (..., L, S).

    Computed as ``softmax(kernel_scores(...))``, so no kernel value is ever formed and
    nothing overflows.  Each row is non-negative and sums to one.  See chapter 2.
    """
    return softmax(kernel_scores(x_query, x_train, kernel, bandwidth), axis=-1)


def nadaraya_watson(x_query: Any, x_train: Any, y_train: Any, kernel: str = "gaussian",
                    bandwidth: float = 1.0) -> Any:
    """Nadaraya–Watson kernel regression, for NumPy arrays or torch tensors.

    ``y_hat(x_i) = sum_j w_ij y_j`` with ``w_ij = softmax_j(score(x_i, x_j))``: attention
    whose queries are ``x_query``, keys ``x_train`` and values ``y_train``.

    Args:
        x_query: (L,) or (..., L, d), the points where a prediction is wanted.
        x_train: (S,) or (..., S, d), the training inputs.
        y_train: (S,) scalar targets, or (..., S, d_v) vector targets.
        kernel: ``"gaussian"``, ``"laplace"`` or ``"exponential"`` (dot product).
        bandwidth: h > 0; small h approaches nearest-neighbour regression, large h
            the mean of ``y_train``.

    Returns:
        (..., L) for 1-D ``y_train``, else (..., L, d_v); same backend, device and
        dtype as the inputs, differentiable with torch autograd.  Every prediction
        lies in the convex hull of the targets.

    Bad shapes, dtypes, kernels or bandwidths raise ``ValueError``/``TypeError``
    naming the argument.  See chapter 2.
    """
    xp = namespace(x_query=x_query, x_train=x_train, y_train=y_train)
    check_array(y_train, "y_train", min_ndim=1, shape_hint="(S,) or (..., S, d_v)")
    check_float(xp, "y_train", y_train)
    _check_inputs(x_query, x_train, y_train)
    S = x_train.shape[0] if x_train.ndim == 1 else x_train.shape[-2]
    n_targets = y_train.shape[0] if y_train.ndim == 1 else y_train.shape[-2]
    if n_targets != S:
        raise ValueError(
            f"x_train and y_train must hold the same number of training points S; got "
            f"x_train {tuple(x_train.shape)} and y_train {tuple(y_train.shape)}"
        )
    weights = nadaraya_watson_weights(x_query, x_train, kernel, bandwidth)  # (..., L, S)
    if y_train.ndim == 1:
        return weights @ y_train  # (..., L)
    broadcast_shapes({"weights": tuple(weights.shape[:-2]), "y_train": tuple(y_train.shape[:-2])},
                     "the leading (batch) dimensions of x_query, x_train and y_train")
    return weights @ y_train  # (..., L, d_v)
