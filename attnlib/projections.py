"""Single-head attention with explicit projection matrices (chapter 6).

A layer of attention does not compare the token vectors themselves.  It first maps
them, with three learned matrices, to queries, keys and values::

    Q = X @ W_Q        (..., L, d_model) @ (d_model, d_k)  -> (..., L, d_k)
    K = C @ W_K        (..., S, d_kv_in) @ (d_kv_in, d_k)  -> (..., S, d_k)
    V = C @ W_V        (..., S, d_kv_in) @ (d_kv_in, d_v)  -> (..., S, d_v)

and then runs scaled dot-product attention on ``Q, K, V``.  In self-attention the
context ``C`` is ``X`` itself (so ``S = L`` and ``d_kv_in = d_model``); in
cross-attention it is another sequence.

Matrices are stored the way the equations read them, ``(d_in, d_out)``, so that a row
vector times the matrix is its projection.  (``torch.nn.Linear`` stores the transpose,
``(d_out, d_in)``: ``W_Q = linear.weight.T``.)  Every function takes NumPy arrays or
torch tensors, and returns the same kind.  The torch module of the same layer is
:class:`attnlib.nn.attention.Attention`.
"""

from __future__ import annotations

import numbers
from typing import Any

from ._backend import check_array, check_float, namespace, same_dtype
from .sdpa import attention_scores, attention_weights, scaled_dot_product_attention

__all__ = [
    "attention_layer",
    "merge_qk",
    "merged_scores",
    "project",
    "qk_score_flops",
]


def _check_matrix(xp, w: Any, name: str, what: str) -> None:
    """``w`` must be a float matrix of shape (what, d_out)."""
    check_array(w, name)
    if w.ndim != 2:
        raise ValueError(f"{name} must be a matrix of shape ({what}, d_out); "
                         f"got shape {tuple(w.shape)}")
    check_float(xp, name, w)


def _check_bias(b: Any, name: str, width: int) -> None:
    if b is not None and tuple(b.shape) != (width,):
        raise ValueError(f"{name} must have shape ({width},); got shape {tuple(b.shape)}")


def project(x: Any, w: Any, b: Any = None, *, name: str = "x", w_name: str = "w") -> Any:
    """A linear projection of each row: ``x @ w + b``.

    Args:
        x: (..., n, d_in) token vectors, one per row.
        w: (d_in, d_out) matrix, stored (in, out) as in the equations.
        b: optional bias, (d_out,).
        name, w_name: the names used in error messages.

    Returns:
        (..., n, d_out), same backend and dtype as ``x``.
    """
    xp = namespace(**{name: x, w_name: w, f"{w_name} bias": b})
    check_array(x, name, min_ndim=2, shape_hint="(..., n, d_in)")
    check_float(xp, name, x)
    _check_matrix(xp, w, w_name, "d_in")
    same_dtype({name: x, w_name: w, "bias": b})
    if x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"{name} has last dimension {x.shape[-1]} but {w_name} expects "
            f"{w.shape[0]}: {name} {tuple(x.shape)}, {w_name} {tuple(w.shape)}")
    _check_bias(b, f"the bias of {w_name}", w.shape[1])
    out = x @ w  # (..., n, d_out)
    return out if b is None else out + b


def _qkv(x, w_q, w_k, w_v, context, b_q, b_k, b_v):
    """Validate the arguments of :func:`attention_layer` and project to (q, k, v)."""
    xp = namespace(x=x, w_q=w_q, w_k=w_k, w_v=w_v, context=context, b_q=b_q, b_k=b_k, b_v=b_v)
    check_array(x, "x", min_ndim=2, shape_hint="(..., L, d_model)")
    check_float(xp, "x", x)
    source, src = (x, "x") if context is None else (context, "context")
    check_array(source, src, min_ndim=2, shape_hint="(..., S, d_kv_in)")
    check_float(xp, src, source)
    for w, name, arr, a, what in ((w_q, "w_q", x, "x", "d_model"),
                                  (w_k, "w_k", source, src, "d_kv_in"),
                                  (w_v, "w_v", source, src, "d_kv_in")):
        _check_matrix(xp, w, name, what)
        if w.shape[0] != arr.shape[-1]:
            raise ValueError(
                f"{name} must have {what} = {a}.shape[-1] = {arr.shape[-1]} rows: "
                f"got {name} {tuple(w.shape)} and {a} {tuple(arr.shape)}")
    if w_k.shape[1] != w_q.shape[1]:
        raise ValueError(
            f"w_q and w_k must map to the same width d_k (queries and keys are compared); "
            f"got w_q {tuple(w_q.shape)} and w_k {tuple(w_k.shape)}")
    same_dtype({"x": x, "context": context, "w_q": w_q, "w_k": w_k, "w_v": w_v,
                "b_q": b_q, "b_k": b_k, "b_v": b_v})
    for b, name, w in ((b_q, "b_q", w_q), (b_k, "b_k", w_k), (b_v, "b_v", w_v)):
        _check_bias(b, name, w.shape[1])
    q = project(x, w_q, b_q, name="x", w_name="w_q")             # (..., L, d_k)
    k = project(source, w_k, b_k, name=src, w_name="w_k")        # (..., S, d_k)
    v = project(source, w_v, b_v, name=src, w_name="w_v")        # (..., S, d_v)
    return q, k, v


def attention_layer(x: Any, w_q: Any, w_k: Any, w_v: Any, *, context: Any = None,
                    b_q: Any = None, b_k: Any = None, b_v: Any = None, mask: Any = None,
                    causal: bool = False, scale: float | None = None,
                    return_weights: bool = False) -> Any:
    """Single-head self- or cross-attention with explicit matrices (chapter 6).

    ``softmax(Q K^T * scale + mask) V`` with ``Q = x W_Q + b_Q``, ``K = C W_K + b_K``,
    ``V = C W_V + b_V``, where the context ``C`` is ``context``, or ``x`` itself when
    ``context`` is None (self-attention).  Tying queries and keys is ``w_k=w_q``.

    Args:
        x: (..., L, d_model) the sequence that asks (one query per row).
        w_q: (d_model, d_k).
        w_k: (d_kv_in, d_k); d_kv_in = d_model in self-attention.
        w_v: (d_kv_in, d_v).
        context: optional (..., S, d_kv_in) the sequence that answers (keys and values);
            None means ``x`` (self-attention, S = L).  Leading dimensions broadcast.
        b_q, b_k, b_v: optional biases, (d_k,), (d_k,), (d_v,).
        mask: optional, broadcastable to (..., L, S).  Boolean: True = may attend.
            Floating: added to the scores.
        causal: forbid later keys, bottom-right aligned (see
            :func:`attnlib.scaled_dot_product_attention`).
        scale: multiplies the scores; default 1/sqrt(d_k).
        return_weights: also return the attention weights.

    Returns:
        (..., L, d_v); with ``return_weights``, the pair (output, weights (..., L, S)).
        Same backend and dtype as ``x``.

    A width that does not match raises ``ValueError`` naming the argument, e.g. an
    ``x`` whose last dimension is not ``w_q.shape[0]``.
    """
    q, k, v = _qkv(x, w_q, w_k, w_v, context, b_q, b_k, b_v)
    if not return_weights:
        return scaled_dot_product_attention(q, k, v, mask, causal=causal, scale=scale)
    weights = attention_weights(q, k, mask, causal=causal, scale=scale)  # (..., L, S)
    return weights @ v, weights  # (..., L, d_v), (..., L, S)


def merge_qk(w_q: Any, w_k: Any) -> Any:
    """The merged query-key matrix ``W_QK = W_Q @ W_K^T``, (d_model, d_kv_in).

    Scores need only this product: ``q_i . k_j = x_i W_Q W_K^T c_j^T``.  Its rank is at
    most d_k.  See chapter 6 (when merging pays) and chapter 13 (MLA's absorption).

    Args:
        w_q: (d_model, d_k).  w_k: (d_kv_in, d_k).
    """
    xp = namespace(w_q=w_q, w_k=w_k)
    _check_matrix(xp, w_q, "w_q", "d_model")
    _check_matrix(xp, w_k, "w_k", "d_kv_in")
    same_dtype({"w_q": w_q, "w_k": w_k})
    if w_q.shape[1] != w_k.shape[1]:
        raise ValueError(f"w_q and w_k must map to the same width d_k; got w_q "
                         f"{tuple(w_q.shape)} and w_k {tuple(w_k.shape)}")
    return w_q @ xp.matrix_transpose(w_k)  # (d_model, d_kv_in)


def merged_scores(x: Any, w_qk: Any, *, scale: float, context: Any = None,
                  mask: Any = None, causal: bool = False) -> Any:
    """Attention scores from the merged matrix: ``x @ W_QK @ C^T * scale``, (..., L, S).

    Equal to :func:`attnlib.attention_scores` of ``x @ W_Q`` and ``C @ W_K`` (without
    biases).  ``scale`` is required: ``W_QK`` no longer remembers d_k, so pass
    ``1 / sqrt(d_k)`` yourself.

    Args:
        x: (..., L, d_model).  w_qk: (d_model, d_kv_in).
        context: optional (..., S, d_kv_in); None means ``x``.
        mask, causal: as for :func:`attention_layer`.
    """
    source, src = (x, "x") if context is None else (context, "context")
    xp = namespace(x=x, w_qk=w_qk, context=context)
    check_array(source, src, min_ndim=2, shape_hint="(..., S, d_kv_in)")
    _check_matrix(xp, w_qk, "w_qk", "d_model")
    if source.shape[-1] != w_qk.shape[1]:
        raise ValueError(f"w_qk has {w_qk.shape[1]} columns but {src} has last dimension "
                         f"{source.shape[-1]}: w_qk {tuple(w_qk.shape)}, {src} "
                         f"{tuple(source.shape)}")
    xw = project(x, w_qk, name="x", w_name="w_qk")  # (..., L, d_kv_in)
    return attention_scores(xw, source, mask, causal=causal, scale=scale)  # (..., L, S)


def qk_score_flops(L: int, S: int, d_model: int, d_k: int,
                   d_kv_in: int | None = None) -> dict[str, int]:
    """Floating-point operations (2 per multiply-add) to get the (L, S) scores.

    ``"factored"``: ``Q = X W_Q`` (2 L d_model d_k), ``K = C W_K`` (2 S d_kv_in d_k),
    then ``Q K^T`` (2 L S d_k).
    ``"merged"``: ``X W_QK`` (2 L d_model d_kv_in), then times ``C^T`` (2 L S d_kv_in).
    Softmax, scaling and values are the same for both and are not counted.
    """
    d_kv_in = d_model if d_kv_in is None else d_kv_in
    for name, n in (("L", L), ("S", S), ("d_model", d_model), ("d_k", d_k),
                    ("d_kv_in", d_kv_in)):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"{name} must be a positive integer; got {n!r}")
    L, S, d_model, d_k, d_kv_in = (int(n) for n in (L, S, d_model, d_k, d_kv_in))
    factored = 2 * L * d_model * d_k + 2 * S * d_kv_in * d_k + 2 * L * S * d_k
    merged = 2 * L * d_model * d_kv_in + 2 * L * S * d_kv_in
    return {"factored": factored, "merged": merged}
