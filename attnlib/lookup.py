"""Hard and soft lookups (chapter 1).

A lookup table returns the value stored under the key that matches the query.  Written
with vectors, "matches" becomes "has the largest dot product", and the table becomes a
block that maps queries (..., L, d_k) to values (..., L, d_v).  The hard version picks
one value; the soft version blends all of them with softmax weights and is attention.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from ._backend import device_of
from .sdpa import _check_qkv, scaled_dot_product_attention

__all__ = ["hard_lookup_weights", "hard_lookup", "soft_lookup"]


def hard_lookup_weights(q: Any, k: Any) -> Any:
    """One-hot weights (..., L, S) selecting, for each query, the key with the largest
    dot product (the first one on ties).

    The weights are built from ``argmax``, a step function of q and k: its derivative
    is zero wherever it exists, and torch's autograd records no path from q or k to it.
    """
    xp, target = _check_qkv(q, k)
    scores = q @ xp.matrix_transpose(k)  # (..., L, S)
    best = xp.argmax(scores, axis=-1)  # (..., L)
    keys = xp.arange(target[-1], device=device_of(q))  # (S,)
    return xp.astype(keys == best[..., None], q.dtype)  # (..., L, S)


def hard_lookup(q: Any, k: Any, v: Any) -> Any:
    """The value stored under the best-matching key: (..., L, d_v).

    q (..., L, d_k), k (..., S, d_k), v (..., S, d_v).  Each output row is exactly one
    row of v, so a gradient reaches only that one entry of the table, and none reaches
    q or k.
    """
    _check_qkv(q, k, v)
    return hard_lookup_weights(q, k) @ v  # (..., L, d_v)


def soft_lookup(q: Any, k: Any, v: Any, temperature: float = 1.0) -> Any:
    """A blend of all values with weights ``softmax(q @ k^T / temperature)``.

    This is attention with ``scale = 1 / temperature``.  As the temperature goes to
    zero the weights become one-hot and the result approaches :func:`hard_lookup`
    (when a query ties between several best keys, it approaches the mean of their
    values instead, while :func:`hard_lookup` picks the first); as it grows the weights
    become uniform and the result approaches the mean of v.

    ``temperature`` is a positive real number (Python or NumPy scalar).
    """
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number; got {temperature!r}")
    return scaled_dot_product_attention(q, k, v, scale=1.0 / float(temperature))
