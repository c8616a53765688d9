"""Scoring functions: the ways a query can be compared with a key (chapter 5).

Attention needs one number per (query, key) pair, a *score*; the softmax over keys and
the blend of values do not care how it was computed.  This module gives five classic
scores, each returning an array of shape (..., L, S), and :func:`attend`, which turns any
such scores into attention with the same masks as
:func:`attnlib.scaled_dot_product_attention`.

=======================  ===============================  ===============  ================
function                 score of query q and key k       parameters       paper
=======================  ===============================  ===============  ================
``dot_scores``           q . k                            none             Luong "dot"
``scaled_dot_scores``    q . k / sqrt(d_k)                none             Vaswani et al.
``bilinear_scores``      q W k^T                          W (d_q, d_k)     Luong "general"
``additive_scores``      v_a . tanh(q W_q + k W_k)        W_q, W_k, v_a    Bahdanau et al.
``cosine_scores``        cos(q, k) / temperature          (temperature)    QK-norm
=======================  ===============================  ===============  ================

Parameters are passed in as arrays, so torch tensors with ``requires_grad=True`` are
trained by autograd like any other weight.  Row vectors throughout: a projection is
``q @ W`` with W of shape (d_in, d_out).  Every function takes NumPy arrays or torch
tensors, written once through :mod:`attnlib._backend`.
"""

from __future__ import annotations

import math
from typing import Any

from ._backend import (
    broadcast_shapes,
    check_array,
    check_float,
    namespace,
    same_dtype,
)
from .sdpa import _check_qkv, attention_scores, mask_scores  # mask_scores: re-exported
from .softmax import softmax

__all__ = [
    "dot_scores",
    "scaled_dot_scores",
    "bilinear_scores",
    "additive_scores",
    "cosine_scores",
    "mask_scores",
    "attend",
]


def _check_qk(q: Any, k: Any, **params: Any):
    """Checks for scores whose q and k may have different widths (bilinear, additive)."""
    params = {name: x for name, x in params.items() if x is not None}
    xp = namespace(q=q, k=k, **params)
    check_array(q, "q", min_ndim=2, shape_hint="(..., L, d_q)")
    check_array(k, "k", min_ndim=2, shape_hint="(..., S, d_k)")
    for name, x in {"q": q, "k": k, **params}.items():
        check_float(xp, name, x)
    same_dtype({"q": q, "k": k, **params})
    broadcast_shapes({"q": tuple(q.shape[:-2]), "k": tuple(k.shape[:-2])},
                     "the leading (batch, head) dimensions of q and k")
    return xp


def _check_param(w: Any, name: str, expected: tuple[int, ...], letters: str) -> None:
    if tuple(w.shape) != expected:
        raise ValueError(f"{name} must have shape {letters} = {expected}; "
                         f"got {name} {tuple(w.shape)}")


def dot_scores(q: Any, k: Any) -> Any:
    """Dot-product scores ``q @ k^T`` (Luong's "dot"): shape (..., L, S).

    Args:
        q: queries (..., L, d_k).  k: keys (..., S, d_k); leading dimensions broadcast.

    No parameters.  The variance of a score grows with d_k (chapter 3), and a long key
    wins over a well-aligned short one (chapter 5).
    """
    return attention_scores(q, k, scale=1.0)  # (..., L, S)


def scaled_dot_scores(q: Any, k: Any, scale: float | None = None) -> Any:
    """Scaled dot-product scores ``q @ k^T * scale`` (Vaswani et al.): (..., L, S).

    Args:
        q: queries (..., L, d_k).  k: keys (..., S, d_k).
        scale: default 1/sqrt(d_k), which keeps the scores' variance near 1 (chapter 3).
    """
    return attention_scores(q, k, scale=scale)  # (..., L, S)


def bilinear_scores(q: Any, k: Any, w: Any) -> Any:
    """Bilinear scores ``q @ w @ k^T`` (Luong's "general"): shape (..., L, S).

    Args:
        q: queries (..., L, d_q).
        k: keys (..., S, d_k); d_q and d_k may differ.
        w: the (d_q, d_k) matrix of the bilinear form.  With ``w`` the identity this is
            :func:`dot_scores`; with ``w = W_Q @ W_K^T`` it is the dot product of
            projected queries and keys (chapter 6).

    Cost: ``q @ w`` once (L d_q d_k multiply-adds), then an ordinary dot product.
    """
    xp = _check_qk(q, k, w=w)
    check_array(w, "w", min_ndim=2)
    _check_param(w, "w", (q.shape[-1], k.shape[-1]), "(d_q, d_k)")
    return (q @ w) @ xp.matrix_transpose(k)  # (..., L, d_k) @ (..., d_k, S)


def additive_scores(q: Any, k: Any, w_q: Any, w_k: Any, v_a: Any, b: Any = None) -> Any:
    """Additive scores ``v_a . tanh(q @ w_q + k @ w_k + b)`` (Bahdanau et al.): (..., L, S).

    Args:
        q: queries (..., L, d_q).
        k: keys (..., S, d_k); d_q and d_k may differ.
        w_q: (d_q, d_a) projection of the queries.
        w_k: (d_k, d_a) projection of the keys.
        v_a: (d_a,) the vector that reads the hidden layer out into one number.
        b: optional (d_a,) bias inside the tanh.  Bahdanau et al. write none; most
            implementations have one (a ``Linear`` layer with a bias), and without it
            the score is an odd function: s(-q, -k) = -s(q, k).

    A one-hidden-layer network applied to every (query, key) pair.  It builds an
    (..., L, S, d_a) hidden tensor: d_a times the memory of the scores, and no single
    matrix product computes it (chapter 5 counts the cost).
    """
    xp = _check_qk(q, k, w_q=w_q, w_k=w_k, v_a=v_a, b=b)
    check_array(w_q, "w_q", min_ndim=2)
    d_a = w_q.shape[-1]
    _check_param(w_q, "w_q", (q.shape[-1], d_a), "(d_q, d_a)")
    _check_param(w_k, "w_k", (k.shape[-1], d_a), "(d_k, d_a)")
    _check_param(v_a, "v_a", (d_a,), "(d_a,)")
    hq = (q @ w_q)[..., :, None, :]  # (..., L, 1, d_a)
    if b is not None:
        _check_param(b, "b", (d_a,), "(d_a,)")
        hq = hq + b
    hk = (k @ w_k)[..., None, :, :]  # (..., 1, S, d_a)
    hidden = xp.tanh(hq + hk)  # (..., L, S, d_a)
    return xp.sum(hidden * v_a, axis=-1)  # (..., L, S)


def cosine_scores(q: Any, k: Any, temperature: Any = 1.0, eps: float = 1e-12) -> Any:
    """Cosine-similarity scores ``cos(q_i, k_j) / temperature``: shape (..., L, S).

    Args:
        q: queries (..., L, d_k).  k: keys (..., S, d_k).
        temperature: a positive number, or a 0-d array (a torch tensor with
            ``requires_grad=True`` is learned).  The scores lie in
            [-1/temperature, 1/temperature], so the weights can only be sharp when the
            temperature is small.
        eps: a vector shorter than ``eps`` is divided by ``eps`` instead of its norm,
            so a zero vector gives zero scores rather than NaN.

    Key length is ignored: only directions count (chapter 5).
    """
    xp, _ = _check_qkv(q, k)
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number; "
                             f"got {temperature!r}")
    else:
        namespace(q=q, temperature=temperature)
        check_float(xp, "temperature", temperature)
        if temperature.ndim != 0:
            raise ValueError(f"temperature must be a number or a 0-d array; got shape "
                             f"{tuple(temperature.shape)}")
    # eps itself underflows to 0 in float16: never divide by less than the dtype allows
    eps = max(float(eps), float(xp.finfo(q.dtype).smallest_normal))
    q_hat = q / xp.clip(xp.linalg.vector_norm(q, axis=-1, keepdims=True), min=eps)
    k_hat = k / xp.clip(xp.linalg.vector_norm(k, axis=-1, keepdims=True), min=eps)
    return (q_hat @ xp.matrix_transpose(k_hat)) / temperature  # (..., L, S)


def attend(scores: Any, v: Any, mask: Any = None, *, causal: bool = False,
           return_weights: bool = False) -> Any:
    """Attention from precomputed scores: ``softmax(mask(scores)) @ v``.

    Args:
        scores: (..., L, S), from any function of this module (or your own).
        v: values (..., S, d_v); leading dimensions broadcast with those of scores.
        mask: optional, broadcastable to (..., L, S); boolean True = may attend,
            floating = added to the scores.
        causal: forbid future keys, bottom-right aligned (query i sits at key S - L + i).
        return_weights: also return the attention weights (..., L, S).

    Returns:
        The output (..., L, d_v), or ``(output, weights)``.  A query with no allowed
        key gets zero weights and a zero output.  With ``scaled_dot_scores`` this is
        exactly :func:`attnlib.scaled_dot_product_attention`.
    """
    namespace(scores=scores, v=v, mask=mask)
    check_array(v, "v", min_ndim=2, shape_hint="(..., S, d_v)")
    check_array(scores, "scores", min_ndim=2, shape_hint="(..., L, S)")
    same_dtype({"scores": scores, "v": v})
    if v.shape[-2] != scores.shape[-1]:
        raise ValueError(f"v must have S = scores.shape[-1] rows; got scores "
                         f"{tuple(scores.shape)} and v {tuple(v.shape)}")
    broadcast_shapes({"scores": tuple(scores.shape[:-2]), "v": tuple(v.shape[:-2])},
                     "the leading (batch, head) dimensions of scores and v")
    weights = softmax(mask_scores(scores, mask, causal=causal), axis=-1)  # (..., L, S)
    out = weights @ v  # (..., L, d_v)
    return (out, weights) if return_weights else out
