"""The softmax and the log-sum-exp, computed without overflow (chapters 1 and 3).

Both subtract the row maximum before exponentiating: ``softmax(x) = softmax(x - m)``
for any constant ``m``, and with ``m = max(x)`` the largest exponent is ``exp(0) = 1``,
so nothing overflows.  A row whose entries are all ``-inf`` (a query that may attend to
nothing) gives zeros, not NaN, and passes finite gradients.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from ._backend import check_array, check_float, namespace

__all__ = ["softmax", "logsumexp"]


def _safe_max(xp, x, axis: int):
    """Row maximum, with rows that are all -inf (or empty of finite values) set to 0."""
    m = xp.max(x, axis=axis, keepdims=True)
    return xp.where(xp.isfinite(m), m, xp.zeros_like(m))


def _check_axis(x: Any, axis: Any) -> None:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an integer; got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for x of shape {tuple(x.shape)}")


def softmax(x: Any, axis: int = -1) -> Any:
    """Numerically stable softmax along ``axis``.

    Args:
        x: scores of any shape, NumPy array or torch tensor with a float dtype.
        axis: the axis that sums to one.

    Returns:
        An array like ``x`` whose entries along ``axis`` are non-negative and sum to
        one, except where every entry was ``-inf``: those rows are all zeros.

    See chapter 1 (why softmax) and chapter 3 (why subtract the maximum).
    """
    xp = namespace(x=x)
    check_float(xp, "x", x)
    check_array(x, "x", min_ndim=1)
    _check_axis(x, axis)
    e = xp.exp(x - _safe_max(xp, x, axis))
    total = xp.sum(e, axis=axis, keepdims=True)
    # an empty row (all -inf) gives zeros; a NaN anywhere in a row makes it all NaN
    return e / xp.where(total == 0, xp.ones_like(total), total)


def logsumexp(x: Any, axis: int = -1, keepdims: bool = False) -> Any:
    """``log(sum(exp(x)))`` along ``axis``, without overflow.

    A row of all ``-inf`` gives ``-inf`` (the log of an empty sum).  FlashAttention
    (chapter 15) saves exactly this quantity for its backward pass.
    """
    xp = namespace(x=x)
    check_float(xp, "x", x)
    check_array(x, "x", min_ndim=1)
    _check_axis(x, axis)
    m = _safe_max(xp, x, axis)
    total = xp.sum(xp.exp(x - m), axis=axis, keepdims=True)
    # log(0) = -inf for empty rows, without NumPy's divide-by-zero warning; NaN stays NaN
    log_total = xp.log(xp.where(total == 0, xp.ones_like(total), total))
    neg_inf = xp.full_like(total, -math.inf)
    out = xp.where(total == 0, neg_inf, log_total) + m
    return out if keepdims else xp.squeeze(out, axis=axis)
