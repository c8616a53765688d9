"""Scaled dot-product attention (chapter 3), written once for NumPy and torch.

Shape letters (see the notation page): ``...`` any leading batch/head dimensions,
L queries, S keys, d_k the query/key width, d_v the value width.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._backend import (
    broadcast_shapes,
    check_array,
    check_float,
    check_mask,
    default_scale,
    device_of,
    namespace,
    same_dtype,
)
from .masks import causal_mask
from .softmax import softmax

__all__ = ["attention_scores", "attention_weights", "mask_scores", "scaled_dot_product_attention"]


def _check_qkv(q: Any, k: Any, v: Any = None, mask: Any = None):
    xp = namespace(q=q, k=k, v=v, mask=mask)
    check_array(q, "q", min_ndim=2, shape_hint="(..., L, d_k)")
    check_array(k, "k", min_ndim=2, shape_hint="(..., S, d_k)")
    check_float(xp, "q", q)
    check_float(xp, "k", k)
    if v is not None:
        check_array(v, "v", min_ndim=2, shape_hint="(..., S, d_v)")
        check_float(xp, "v", v)
    same_dtype({"q": q, "k": k, "v": v})
    if q.shape[-1] == 0:
        raise ValueError(f"q and k need d_k >= 1 (their last dimension); got q {tuple(q.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must have the same last dimension d_k; got q {tuple(q.shape)} "
            f"and k {tuple(k.shape)}"
        )
    lead = {"q": tuple(q.shape[:-2]), "k": tuple(k.shape[:-2])}
    if v is not None:
        if v.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"k and v must have the same number of keys S (dimension -2); got "
                f"k {tuple(k.shape)} and v {tuple(v.shape)}"
            )
        lead["v"] = tuple(v.shape[:-2])
    batch = broadcast_shapes(lead, "the leading (batch, head) dimensions of q, k and v")
    return xp, (*batch, q.shape[-2], k.shape[-2])


def _work_dtype(xp, x):
    """float32 for 16-bit floats (their products overflow at 65504 and their sums lose
    digits, so fused kernels accumulate in float32 too); x's own dtype otherwise."""
    half = [xp.float16] + ([xp.bfloat16] if hasattr(xp, "bfloat16") else [])
    # (compare one by one: NumPy reads `dtype == None` as "is it float64?")
    return xp.float32 if any(x.dtype == h for h in half) else x.dtype


def _scores(q: Any, k: Any, mask: Any, causal: bool, scale: float | None):
    """Validated, masked, scaled scores (..., L, S) in the working dtype."""
    xp, target = _check_qkv(q, k, mask=mask)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number; got {scale!r}")
    work = _work_dtype(xp, q)
    q, k = xp.astype(q, work), xp.astype(k, work)
    scores = (q @ xp.matrix_transpose(k)) * float(scale)  # (..., L, S)
    return xp, _apply_mask(xp, scores, mask, causal, target)


def attention_scores(q: Any, k: Any, mask: Any = None, *, causal: bool = False,
                     scale: float | None = None) -> Any:
    """Masked, scaled scores ``q @ k^T * scale``: shape (..., L, S).

    Entries a boolean mask or ``causal`` forbids are ``-inf``; a float mask is added.
    Arguments as for :func:`scaled_dot_product_attention`.
    """
    xp, scores = _scores(q, k, mask, causal, scale)
    return xp.astype(scores, q.dtype)


def _apply_mask(xp, scores, mask, causal, target):
    """Forbidden entries of (..., L, S) scores to -inf; a float mask added."""
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    allowed = None
    if mask is not None:
        mask = check_mask(xp, mask, target, like=scores)
        if xp.isdtype(mask.dtype, "bool"):
            allowed = mask
        else:
            scores = scores + mask
    if causal:
        c = causal_mask(target[-2], target[-1], like=scores)  # (L, S), bottom-right aligned
        allowed = c if allowed is None else xp.logical_and(allowed, c)
    if allowed is not None:
        neg_inf = xp.asarray(-math.inf, dtype=scores.dtype, device=device_of(scores))
        scores = xp.where(allowed, scores, neg_inf)
    return scores


def mask_scores(scores: Any, mask: Any = None, *, causal: bool = False) -> Any:
    """Apply an attention mask to scores of any origin: shape (..., L, S) in and out.

    Same convention as :func:`scaled_dot_product_attention`: a boolean mask is True
    where a query may attend (forbidden entries become ``-inf``); a floating mask is
    added; ``causal=True`` is bottom-right aligned and combines with ``mask`` by logical
    and.  Chapter 5 uses it for scores that are not dot products.
    """
    xp = namespace(scores=scores, mask=mask)
    check_array(scores, "scores", min_ndim=2, shape_hint="(..., L, S)")
    check_float(xp, "scores", scores)
    return _apply_mask(xp, scores, mask, causal, tuple(scores.shape))


def attention_weights(q: Any, k: Any, mask: Any = None, *, causal: bool = False,
                      scale: float | None = None) -> Any:
    """Attention weights ``softmax(q @ k^T * scale)``: shape (..., L, S).

    Each row is a probability distribution over the S keys; a row whose keys are all
    masked is all zeros.  Arguments as for :func:`scaled_dot_product_attention`.
    """
    xp, scores = _scores(q, k, mask, causal, scale)
    return xp.astype(softmax(scores, axis=-1), q.dtype)


def scaled_dot_product_attention(q: Any, k: Any, v: Any, mask: Any = None, *,
                                 causal: bool = False, scale: float | None = None) -> Any:
    """``softmax(q @ k^T * scale + mask) @ v``, for NumPy arrays or torch tensors.

    Args:
        q: queries, (..., L, d_k).
        k: keys, (..., S, d_k).
        v: values, (..., S, d_v).  The leading dimensions of q, k and v broadcast.
        mask: optional, broadcastable to (..., L, S).  Boolean: True = may attend
            (as in ``F.scaled_dot_product_attention``).  Floating: added to the scores
            (use ``-inf`` to forbid).  Integer masks are refused as ambiguous.
        causal: forbid keys "in the future", **bottom-right aligned**: query i sits at
            key position S - L + i and sees keys 0 .. S - L + i.  With L = S this is the
            usual lower triangle; combined with ``mask`` by logical and.
        scale: multiplies the scores; default 1/sqrt(d_k).

    Returns:
        (..., L, d_v), same backend, device and dtype as q.

    Alignment when L != S (here L = 2, S = 4; 1 = may attend)::

        attnlib causal=True (bottom-right)    torch SDPA is_causal=True (top-left)
            k0 k1 k2 k3                           k0 k1 k2 k3
        q0 [ 1  1  1  0 ]                     q0 [ 1  0  0  0 ]
        q1 [ 1  1  1  1 ]                     q1 [ 1  1  0  0 ]

    PyTorch's ``is_causal=True`` is top-left aligned (``tril(ones(L, S))``); its
    bottom-right variant is ``torch.nn.attention.bias.causal_lower_right``.  The two
    agree only when L = S.  attnlib chooses bottom-right because that is what decoding
    with a KV cache needs: the new queries are the last L of the S positions.

    A query whose keys are all masked gets zero weights and a zero output (not NaN),
    with finite gradients.  Float16 and bfloat16 inputs are computed in float32 (their
    products overflow at 65504) and the result is cast back, as fused kernels do.
    Bad shapes, dtypes or mixed backends raise ``ValueError`` or ``TypeError`` naming
    the argument.  See chapter 3; the masks are chapter 8.
    """
    xp, _ = _check_qkv(q, k, v, mask)
    _, scores = _scores(q, k, mask, causal, scale)  # (..., L, S), float32 for 16-bit inputs
    weights = softmax(scores, axis=-1)
    return xp.astype(weights @ xp.astype(v, weights.dtype), q.dtype)  # (..., L, d_v)
