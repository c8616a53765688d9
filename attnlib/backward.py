"""The backward pass of attention, written by hand (chapter 4).

Scaled dot-product attention has no parameters, yet it passes gradients to its three
inputs.  With ``S = scale * Q K^T (+ mask)``, ``A = softmax(S)`` row by row and
``O = A V``, and ``dO`` the gradient of the loss with respect to ``O``::

    dV = A^T dO                                  # (..., S, d_v)
    dA = dO V^T                                  # (..., L, S)
    dS = A * (dA - rowsum(dA * A))               # (..., L, S)  softmax backward
    dQ = scale * dS K                            # (..., L, d_k)
    dK = scale * dS^T Q                          # (..., S, d_k)

Every function takes NumPy arrays or torch tensors (one implementation, through the
array namespace of :mod:`attnlib._backend`).  Masked entries have weight 0, so the
softmax backward gives them gradient 0; a query whose keys are all masked has a row of
zero weights and so receives zero gradient, never NaN.  Masks follow the convention of
:func:`attnlib.scaled_dot_product_attention`: boolean True = may attend, floating =
added to the scores, ``causal=True`` bottom-right aligned.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._backend import check_array, check_float, default_scale, namespace, same_dtype
from .sdpa import _check_qkv, attention_weights

__all__ = ["softmax_backward", "sdpa_forward", "sdpa_backward"]


def softmax_backward(weights: Any, grad_weights: Any, axis: int = -1) -> Any:
    """Vector-Jacobian product of the softmax: the gradient with respect to its input.

    The Jacobian of ``a = softmax(s)`` is ``diag(a) - a a^T``.  It is symmetric, so the
    gradient with respect to ``s`` is ``J da = a * (da - sum(a * da))`` — computed here
    without ever forming the (n, n) Jacobian.

    Args:
        weights: the softmax output ``a``, any shape (e.g. attention weights (..., L, S)).
        grad_weights: ``da``, the gradient of the loss with respect to ``a``; same shape.
        axis: the axis along which the softmax was normalised.

    Returns:
        ``ds``, same shape as ``weights``.  Along ``axis`` it sums to zero (adding a
        constant to every score of a row changes nothing); entries with weight 0 (masked
        keys, rows with no key at all) get exactly 0.

    See chapter 4.
    """
    xp = namespace(weights=weights, grad_weights=grad_weights)
    check_array(weights, "weights", min_ndim=1)
    check_float(xp, "weights", weights)
    check_float(xp, "grad_weights", grad_weights)
    same_dtype({"weights": weights, "grad_weights": grad_weights})
    if tuple(weights.shape) != tuple(grad_weights.shape):
        raise ValueError(
            f"weights and grad_weights must have the same shape; got weights "
            f"{tuple(weights.shape)} and grad_weights {tuple(grad_weights.shape)}"
        )
    inner = xp.sum(grad_weights * weights, axis=axis, keepdims=True)  # a . da per row
    return weights * (grad_weights - inner)


def sdpa_forward(q: Any, k: Any, v: Any, mask: Any = None, *, causal: bool = False,
                 scale: float | None = None) -> tuple[Any, Any]:
    """Scaled dot-product attention that also returns what the backward pass needs.

    Arguments as for :func:`attnlib.scaled_dot_product_attention`: q (..., L, d_k),
    k (..., S, d_k), v (..., S, d_v), mask broadcastable to (..., L, S) (boolean: True =
    may attend; floating: added to the scores), ``causal`` bottom-right aligned,
    ``scale`` default 1/sqrt(d_k).

    Returns:
        ``(out, weights)``: the output (..., L, d_v) and the attention weights
        (..., L, S).  Keeping ``weights`` costs L * S numbers per batch element and head;
        chapter 4 counts that memory, and chapter 15 (FlashAttention) avoids it by
        recomputing the weights in the backward pass.
    """
    _check_qkv(q, k, v, mask)
    weights = attention_weights(q, k, mask, causal=causal, scale=scale)  # (..., L, S)
    return weights @ v, weights  # (..., L, d_v), (..., L, S)


def _sum_to(xp, x: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``x`` over the dimensions that broadcasting added or stretched to ``shape``.

    The gradient of a broadcast input is the sum of the gradients of its copies.
    """
    extra = x.ndim - len(shape)
    if extra:
        x = xp.sum(x, axis=tuple(range(extra)))
    axes = tuple(i for i, (n, m) in enumerate(zip(shape, x.shape)) if n == 1 and m != 1)
    if axes:
        x = xp.sum(x, axis=axes, keepdims=True)
    return x


def _check_grad_out(xp, grad_out: Any, q: Any, expected: tuple[int, ...]) -> None:
    check_array(grad_out, "grad_out", min_ndim=2, shape_hint="(..., L, d_v)")
    check_float(xp, "grad_out", grad_out)
    same_dtype({"q": q, "grad_out": grad_out})
    if tuple(grad_out.shape) != expected:
        raise ValueError(
            f"grad_out must have the shape of the attention output (..., L, d_v) = "
            f"{expected}; got grad_out {tuple(grad_out.shape)}"
        )


def _qk_target(q, k) -> tuple[int, ...]:
    """The shape (..., L, S) of the weights from q and k alone (before v broadcasts)."""
    return (*np.broadcast_shapes(tuple(q.shape[:-2]), tuple(k.shape[:-2])),
            q.shape[-2], k.shape[-2])


def sdpa_backward(q: Any, k: Any, v: Any, grad_out: Any, mask: Any = None, *,
                  causal: bool = False, scale: float | None = None,
                  weights: Any = None) -> tuple[Any, Any, Any]:
    """Gradients of scaled dot-product attention with respect to q, k and v, by hand.

    Args:
        q: queries, (..., L, d_k).
        k: keys, (..., S, d_k).
        v: values, (..., S, d_v).  The leading dimensions of q, k and v broadcast.
        grad_out: ``dO``, the gradient of the loss with respect to the output,
            (..., L, d_v) with the broadcast leading dimensions.
        mask: optional, broadcastable to (..., L, S).  Boolean: True = may attend.
            Floating: added to the scores.  As in
            :func:`attnlib.scaled_dot_product_attention`.
        causal: forbid future keys, bottom-right aligned (query i sits at key S - L + i).
        scale: multiplies the scores; default 1/sqrt(d_k).
        weights: optional attention weights (..., L, S) saved by :func:`sdpa_forward`.
            When omitted they are recomputed from q and k (trading compute for memory,
            as FlashAttention does in chapter 15).

    Returns:
        ``(dq, dk, dv)`` with the shapes of q (..., L, d_k), k (..., S, d_k) and
        v (..., S, d_v).  A broadcast input receives the sum of its copies' gradients.
        Masked entries contribute nothing; a query with no allowed key gets dq = 0.

    See chapter 4 for the derivation.
    """
    xp, target = _check_qkv(q, k, v, mask)  # target = (..., L, S)
    _check_grad_out(xp, grad_out, q, (*target[:-1], v.shape[-1]))
    if weights is None:
        weights = attention_weights(q, k, mask, causal=causal, scale=scale)
    elif tuple(weights.shape) not in (tuple(target), _qk_target(q, k)):
        raise ValueError(f"weights must have shape (..., L, S) = {tuple(target)}; "
                         f"got weights {tuple(weights.shape)}")
    # the weights have the batch shape of q and k; v may add batch dimensions of its own
    weights = xp.broadcast_to(weights, tuple(target))  # (..., L, S)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    dv = xp.matrix_transpose(weights) @ grad_out  # (..., S, d_v)
    d_weights = grad_out @ xp.matrix_transpose(v)  # (..., L, S)
    d_scores = softmax_backward(weights, d_weights)  # (..., L, S)
    dq = (d_scores @ k) * scale  # (..., L, d_k)
    dk = (xp.matrix_transpose(d_scores) @ q) * scale  # (..., S, d_k)
    return (_sum_to(xp, dq, tuple(q.shape)), _sum_to(xp, dk, tuple(k.shape)),
            _sum_to(xp, dv, tuple(v.shape)))
