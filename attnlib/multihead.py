"""Multi-head attention as plain functions (chapter 7), for NumPy and torch.

Multi-head attention runs H scaled dot-product attentions side by side, each on its own
slice of the projected queries, keys and values, and mixes their outputs with one last
projection::

    Q = query @ W_Q        (..., L, H*d_k)  --split_heads-->  (..., H, L, d_k)
    K = key   @ W_K        (..., S, H*d_k)  --split_heads-->  (..., H, S, d_k)
    V = value @ W_V        (..., S, H*d_v)  --split_heads-->  (..., H, S, d_v)
    heads = softmax(Q K^T / sqrt(d_k) + mask) V                (..., H, L, d_v)
    out   = merge_heads(heads) @ W_O                           (..., L, d_out)

Weights are written the way the book's equations read, ``x @ W`` with W of shape
(in, out).  ``torch.nn.Linear`` stores the transpose, (out, in): pass
``linear.weight.T``.  ``attnlib.nn.MultiHeadAttention`` is a torch module built on
:func:`multi_head_attention`; the two share this one implementation.
"""

from __future__ import annotations

from typing import Any

import einops
import numpy as np

from ._backend import broadcast_shapes, check_array, check_float, namespace, same_dtype
from .sdpa import attention_weights

__all__ = ["merge_heads", "multi_head_attention", "split_heads"]


def _check_n_heads(n_heads: Any) -> None:
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive integer; got {n_heads!r}")


def split_heads(x: Any, n_heads: int) -> Any:
    """Cut the last axis into ``n_heads`` slices and move the head axis forward.

    (..., L, H*d) -> (..., H, L, d): head h gets features ``h*d`` to ``(h+1)*d - 1``,
    the same split as ``torch.nn.MultiheadAttention`` (``view(B, L, H, d)`` followed
    by a transpose).

    Args:
        x: (..., L, H*d), NumPy array or torch tensor.
        n_heads: H, which must divide the last dimension of ``x``.
    """
    _check_n_heads(n_heads)
    check_array(x, "x", min_ndim=2, shape_hint="(..., L, H*d)")
    if x.shape[-1] % n_heads:
        raise ValueError(
            f"n_heads = {n_heads} must divide the last dimension of x; got x of shape "
            f"{tuple(x.shape)}"
        )
    return einops.rearrange(x, "... l (h d) -> ... h l d", h=n_heads)


def merge_heads(x: Any) -> Any:
    """Undo :func:`split_heads`: (..., H, L, d) -> (..., L, H*d), heads side by side."""
    check_array(x, "x", min_ndim=3, shape_hint="(..., H, L, d)")
    return einops.rearrange(x, "... h l d -> ... l (h d)")


def _project(x: Any, w: Any, b: Any, name: str) -> Any:
    """``x @ w + b`` after checking that the shapes fit: (..., n, d_in) -> (..., n, d_out)."""
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"w_{name} must have shape ({x.shape[-1]}, width) to project an input of shape "
            f"{tuple(x.shape)}; got w_{name} of shape {tuple(w.shape)}"
        )
    y = x @ w
    if b is None:
        return y
    if tuple(b.shape) != (w.shape[1],):
        raise ValueError(
            f"b_{name} must have shape ({w.shape[1]},) to match w_{name} "
            f"{tuple(w.shape)}; got {tuple(b.shape)}"
        )
    return y + b


def _check_heads(n_heads: int, w_q, w_k, w_v, w_o) -> None:
    """The projected widths must split into n_heads and fit together."""
    for name, w in (("w_q", w_q), ("w_v", w_v)):
        if w.ndim == 2 and w.shape[1] % n_heads:
            raise ValueError(
                f"n_heads = {n_heads} must divide the output width of {name}; got {name} "
                f"of shape {tuple(w.shape)}"
            )
    if w_k.ndim == 2 and w_q.ndim == 2 and w_k.shape[1] != w_q.shape[1]:
        raise ValueError(
            f"w_q and w_k must have the same output width H*d_k; got w_q "
            f"{tuple(w_q.shape)} and w_k {tuple(w_k.shape)}"
        )
    if w_o.ndim != 2 or (w_v.ndim == 2 and w_o.shape[0] != w_v.shape[1]):
        raise ValueError(
            f"w_o must have shape (H*d_v, d_out) = ({w_v.shape[-1]}, d_out); got w_o of "
            f"shape {tuple(w_o.shape)}"
        )


def _check_head_mask(mask: Any, target: tuple[int, ...]) -> None:
    """A clear message for the classic mistake: a (B, L, S) mask against (B, H, L, S)."""
    try:
        ok = tuple(np.broadcast_shapes(tuple(mask.shape), target)) == tuple(target)
    except ValueError:
        ok = False
    if not ok:
        hint = ""
        if mask.ndim == len(target) - 1:
            hint = (" A mask without a head axis needs one: use mask[:, None] to turn "
                    "(B, L, S) into (B, 1, L, S).")
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the per-head "
            f"scores' shape {tuple(target)} = (..., H, L, S).{hint}"
        )


def _check_inputs(n_heads: int, mask: Any, **arrays: Any) -> None:
    """Backends, dtypes and widths of the arguments of :func:`multi_head_attention`."""
    _check_n_heads(n_heads)
    xp = namespace(mask=mask, **arrays)
    query, key, value = arrays["query"], arrays["key"], arrays["value"]
    for name, x in (("query", query), ("key", key), ("value", value)):
        check_array(x, name, min_ndim=2, shape_hint="(..., L or S, width)")
        check_float(xp, name, x)
    same_dtype(arrays)
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key and value must have the same length S; got key "
                         f"{tuple(key.shape)} and value {tuple(value.shape)}")
    _check_heads(n_heads, arrays["w_q"], arrays["w_k"], arrays["w_v"], arrays["w_o"])


def multi_head_attention(query: Any, key: Any, value: Any, w_q: Any, w_k: Any, w_v: Any,
                         w_o: Any, *, n_heads: int, b_q: Any = None, b_k: Any = None,
                         b_v: Any = None, b_o: Any = None, mask: Any = None,
                         causal: bool = False, scale: float | None = None,
                         return_weights: bool = False) -> Any:
    """Multi-head attention with explicit weight matrices (chapter 7).

    Args:
        query: (..., L, d_model).
        key: (..., S, d_key_in); for self-attention pass ``query`` again.
        value: (..., S, d_value_in); usually the same array as ``key``.
        w_q: (d_model, H*d_k).  w_k: (d_key_in, H*d_k).  w_v: (d_value_in, H*d_v).
        w_o: (H*d_v, d_out).  Weights act as ``x @ w`` (an ``nn.Linear`` weight is the
            transpose).
        n_heads: H; it must divide the output widths of ``w_q`` and ``w_v``.
        b_q, b_k, b_v, b_o: optional biases, shapes (H*d_k,), (H*d_k,), (H*d_v,), (d_out,).
        mask: optional, broadcastable to the per-head scores (..., H, L, S).  Boolean:
            True = may attend.  Floating: added to the scores.  A key-padding mask is
            (B, 1, 1, S) (see ``attnlib.masks.key_padding_mask``); a (B, L, S) mask needs
            a head axis, ``mask[:, None]``.  Masks are chapter 8.
        causal: bottom-right aligned causal mask, as in
            :func:`attnlib.scaled_dot_product_attention`.
        scale: multiplies the scores; default 1/sqrt(d_k).
        return_weights: also return the per-head weights.

    Returns:
        out (..., L, d_out), and with ``return_weights`` also the weights
        (..., H, L, S).  A query with every key masked gets zero weights (not NaN).
    """
    _check_inputs(n_heads, mask, query=query, key=key, value=value, w_q=w_q, w_k=w_k,
                  w_v=w_v, w_o=w_o, b_q=b_q, b_k=b_k, b_v=b_v, b_o=b_o)
    q = split_heads(_project(query, w_q, b_q, "q"), n_heads)  # (..., H, L, d_k)
    k = split_heads(_project(key, w_k, b_k, "k"), n_heads)  # (..., H, S, d_k)
    v = split_heads(_project(value, w_v, b_v, "v"), n_heads)  # (..., H, S, d_v)
    if mask is not None:
        batch = broadcast_shapes({"query": tuple(q.shape[:-2]), "key": tuple(k.shape[:-2])},
                                 "the leading (batch) dimensions of query and key")
        _check_head_mask(mask, batch + (q.shape[-2], k.shape[-2]))
    weights = attention_weights(q, k, mask, causal=causal, scale=scale)  # (..., H, L, S)
    heads = weights @ v  # (..., H, L, d_v)
    out = _project(merge_heads(heads), w_o, b_o, "o")  # (..., L, d_out)
    return (out, weights) if return_weights else out
