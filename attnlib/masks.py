"""Mask builders (chapter 3 uses them; chapter 8 is about them).

Convention, everywhere in attnlib: a boolean mask is True where a query **may attend**
to a key, the same meaning as ``torch.nn.functional.scaled_dot_product_attention``'s
boolean ``attn_mask`` (and the opposite of ``nn.MultiheadAttention``'s
``key_padding_mask``).  Masks are built in the backend of ``like`` (NumPy when
``like`` is None), on its device.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._backend import check_array, device_of, namespace

__all__ = ["causal_mask", "padding_mask"]

_ALIGNMENTS = ("bottom-right", "top-left")


def _xp_and_device(like: Any):
    if like is None:
        return namespace(like=np.empty(0)), "cpu"
    return namespace(like=like), device_of(like)


def causal_mask(L: int, S: int | None = None, *, align: str = "bottom-right", like: Any = None):
    """Boolean causal mask of shape (L, S): True where query i may attend to key j.

    With L = S both alignments agree: query i sees keys 0..i.  With L != S they differ::

        bottom-right (attnlib's default)      top-left (torch SDPA's is_causal=True)
        L = 2, S = 4: query i is at           L = 2, S = 4: query i is at
        key position S - L + i                key position i

            k0 k1 k2 k3                           k0 k1 k2 k3
        q0 [ 1  1  1  0 ]                     q0 [ 1  0  0  0 ]
        q1 [ 1  1  1  1 ]                     q1 [ 1  1  0  0 ]

    Bottom-right is what decoding with a KV cache needs: the L new queries are the
    *last* L positions of the S keys.  With L > S, bottom-right leaves the first
    L - S queries with no key at all (attnlib then returns zeros for them).

    Args:
        L: number of queries.  S: number of keys (default L).
        align: ``"bottom-right"`` or ``"top-left"``.
        like: an array whose backend and device the mask should use.
    """
    S = L if S is None else S
    for name, n in (("L", L), ("S", S)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {n!r}")
    if align not in _ALIGNMENTS:
        raise ValueError(f"align must be one of {_ALIGNMENTS}; got {align!r}")
    xp, device = _xp_and_device(like)
    offset = S - L if align == "bottom-right" else 0
    i = xp.arange(L, device=device)[:, None]
    j = xp.arange(S, device=device)[None, :]
    return j <= i + offset


def padding_mask(lengths: Any, S: int | None = None, *, like: Any = None):
    """Key-padding mask of shape (B, 1, S) from the true length of each sequence.

    Entry ``[b, 0, j]`` is True when key j of sequence b is a real token
    (``j < lengths[b]``).  The middle axis of size 1 lets it broadcast against scores
    of shape (B, L, S); for scores of shape (B, H, L, S) use ``mask[:, None]``.

    Args:
        lengths: (B,) integers, a list, a NumPy array or a torch tensor.
        S: padded length (default: the largest length).
        like: an array whose backend and device the mask should use (default: the
            backend of ``lengths``, NumPy for a list).
    """
    if isinstance(lengths, (list, tuple)):
        lengths = np.asarray(lengths)
    check_array(lengths, "lengths", min_ndim=1)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must have shape (B,); got shape {tuple(lengths.shape)}")
    xp = namespace(lengths=lengths)
    if not xp.isdtype(lengths.dtype, "integral"):
        raise TypeError(f"lengths must hold integers; got dtype {lengths.dtype}")
    values = [int(n) for n in lengths.tolist()]
    if any(n < 0 for n in values):
        raise ValueError(f"lengths must be non-negative; got {values}")
    S = max(values, default=0) if S is None else S
    if any(n > S for n in values):
        raise ValueError(f"every length must be at most S = {S}; got lengths {values}")
    xp, device = _xp_and_device(lengths if like is None else like)
    n = xp.asarray(values, device=device)
    j = xp.arange(S, device=device)
    return (j[None, :] < n[:, None])[:, None, :]
