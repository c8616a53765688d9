"""Mask builders (chapter 3 uses them; chapter 8 is about them).

Convention, everywhere in attnlib: a boolean mask is True where a query **may attend**
to a key, the same meaning as ``torch.nn.functional.scaled_dot_product_attention``'s
boolean ``attn_mask`` (and the opposite of ``nn.MultiheadAttention``'s
``key_padding_mask``).  Masks are built in the backend of ``like`` (NumPy when
``like`` is None), on its device.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import numpy as np

from ._backend import check_array, device_of, namespace

__all__ = [
    "bias_to_mask",
    "causal_mask",
    "key_padding_mask",
    "mask_and",
    "mask_from_function",
    "mask_or",
    "mask_to_bias",
    "padding_mask",
    "query_padding_mask",
    "sliding_window_mask",
]

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
    return _lengths_mask(lengths, S, "S", like)[:, None, :]  # (B, 1, S)


# ---------------------------------------------------------------------------------------
# Chapter 8: the rest of the mask builders.  Shapes are chosen to broadcast against
# per-head scores of shape (B, H, L, S) without any reshaping by the caller.
# ---------------------------------------------------------------------------------------


def _check_size(name: str, n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {n!r}")


def _lengths_mask(lengths: Any, n: int | None, n_name: str, like: Any):
    """(B, n) boolean: True at positions ``j < lengths[b]``; ``n`` defaults to max length."""
    if isinstance(lengths, (list, tuple)):
        lengths = np.asarray(lengths, dtype=np.int64)
    check_array(lengths, "lengths", min_ndim=1)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must have shape (B,); got shape {tuple(lengths.shape)}")
    xp = namespace(lengths=lengths)
    if not xp.isdtype(lengths.dtype, "integral"):
        raise TypeError(f"lengths must hold integers; got dtype {lengths.dtype}")
    values = [int(v) for v in lengths.tolist()]
    if any(v < 0 for v in values):
        raise ValueError(f"lengths must be non-negative; got {values}")
    n = max(values, default=0) if n is None else n
    _check_size(n_name, n)
    if any(v > n for v in values):
        raise ValueError(f"every length must be at most {n_name} = {n}; got lengths {values}")
    xp, device = _xp_and_device(lengths if like is None else like)
    counts = xp.asarray(values, device=device)  # (B,)
    j = xp.arange(n, device=device)  # (n,)
    return j[None, :] < counts[:, None]  # (B, n)


def key_padding_mask(lengths: Any, S: int | None = None, *, like: Any = None):
    """Key-padding mask of shape (B, 1, 1, S): True where key j of sequence b is real.

    It broadcasts against per-head scores (B, H, L, S): every head and every query of
    sequence b ignores the padded keys ``j >= lengths[b]``.  Forgetting it lets real
    tokens attend to padding, which changes *their* outputs (chapter 8).

    ``torch.nn.MultiheadAttention``'s ``key_padding_mask`` has the opposite meaning
    (True = ignore) and shape (B, S): convert with ``~m[:, 0, 0]`` one way and
    ``~kpm[:, None, None, :]`` the other.

    Args:
        lengths: (B,) integers: the number of real tokens of each sequence (a list, a
            NumPy array or a torch tensor).
        S: padded key length (default: the largest length).
        like: an array whose backend and device the mask should use (default: those of
            ``lengths``; NumPy for a list).
    """
    return _lengths_mask(lengths, S, "S", like)[:, None, None, :]  # (B, 1, 1, S)


def query_padding_mask(lengths: Any, L: int | None = None, *, like: Any = None):
    """Query-padding mask of shape (B, 1, L, 1): True where query i of sequence b is real.

    It broadcasts against scores (B, H, L, S) by rows: a padded query's whole row is
    masked, so its weights and output are zeros (in attnlib).  Real queries are not
    affected, so this mask is optional when the loss ignores padded positions; combine
    it with :func:`key_padding_mask` by :func:`mask_and` to get (B, 1, L, S).

    Args:
        lengths: (B,) integers, as for :func:`key_padding_mask`.
        L: padded query length (default: the largest length).
        like: an array whose backend and device the mask should use.
    """
    return _lengths_mask(lengths, L, "L", like)[:, None, :, None]  # (B, 1, L, 1)


def sliding_window_mask(L: int, S: int | None = None, *, window: int, causal: bool = True,
                        align: str = "bottom-right", like: Any = None):
    """Local attention mask of shape (L, S): each query sees only nearby keys.

    Query i sits at key position ``p = i + offset`` (``offset = S - L`` bottom-right,
    ``0`` top-left, as in :func:`causal_mask`).  It may attend to key j when

    - ``causal=True``:  ``p - window <= j <= p``  (itself and ``window`` keys before);
    - ``causal=False``: ``|j - p| <= window``     (``window`` keys on each side).

    ``window = 0`` keeps only the diagonal; a window at least as large as the last
    query's position (S - 1, bottom-right aligned) gives back the causal mask (or no
    mask).  This is flash-attn's ``window_size=(window, 0)`` (causal)
    or ``(window, window)``.  Some libraries count the query itself in the window size:
    check the convention before porting a number.  Example with L = S = 5, window = 1::

        causal=True           causal=False
        1 0 0 0 0             1 1 0 0 0
        1 1 0 0 0             1 1 1 0 0
        0 1 1 0 0             0 1 1 1 0
        0 0 1 1 0             0 0 1 1 1
        0 0 0 1 1             0 0 0 1 1

    Args:
        L, S: numbers of queries and keys (S defaults to L).
        window: a non-negative integer.
        causal: one-sided (True) or two-sided (False).
        align: ``"bottom-right"`` or ``"top-left"``, where the queries sit among the keys.
        like: an array whose backend and device the mask should use.
    """
    S = L if S is None else S
    _check_size("L", L)
    _check_size("S", S)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window must be a non-negative integer; got {window!r}")
    if align not in _ALIGNMENTS:
        raise ValueError(f"align must be one of {_ALIGNMENTS}; got {align!r}")
    xp, device = _xp_and_device(like)
    offset = S - L if align == "bottom-right" else 0
    p = xp.arange(L, device=device)[:, None] + offset  # (L, 1) query positions
    j = xp.arange(S, device=device)[None, :]  # (1, S) key positions
    if causal:
        return (j <= p) & (j >= p - window)  # (L, S)
    return (j <= p + window) & (j >= p - window)  # (L, S)


def _combine(masks: tuple, op: str):
    if not masks:
        raise ValueError(f"mask_{op} needs at least one mask")
    named = {f"masks[{n}]": m for n, m in enumerate(masks)}
    xp = namespace(**named)
    for name, m in named.items():
        if not xp.isdtype(m.dtype, "bool"):
            raise TypeError(f"{name} must be boolean (True = may attend); got {m.dtype} "
                            f"with shape {tuple(m.shape)}. Convert an additive mask with "
                            f"bias_to_mask first.")
    try:
        np.broadcast_shapes(*(tuple(m.shape) for m in masks))
    except ValueError:
        seen = ", ".join(f"{n} {tuple(m.shape)}" for n, m in named.items())
        raise ValueError(f"masks do not broadcast: {seen}") from None
    out = masks[0]
    for m in masks[1:]:
        out = xp.logical_and(out, m) if op == "and" else xp.logical_or(out, m)
    return out


def mask_and(*masks: Any):
    """Entries allowed by **every** mask: their broadcast logical and.

    ``mask_and(key_padding_mask(lengths), causal_mask(L))`` gives (B, 1, L, S): causal
    *and* no padding.  Masks must be boolean and broadcast together.
    """
    return _combine(masks, "and")


def mask_or(*masks: Any):
    """Entries allowed by **any** mask: their broadcast logical or.

    E.g. a sliding window *or* a few global keys (Longformer-style patterns, chapter 14).
    """
    return _combine(masks, "or")


def mask_to_bias(mask: Any, *, dtype: Any = None, masked_value: float = -math.inf):
    """Boolean mask -> additive bias: 0 where allowed, ``masked_value`` where not.

    Adding the bias to the scores before the softmax has the effect of the boolean mask.
    With ``masked_value = -inf`` a forbidden key gets weight exactly 0.  A finite "big
    negative" such as -1e9 is common in older code; it is cast to ``dtype`` and so
    **becomes -inf in float16**, whose largest finite magnitude is 65504.  A finite value
    also turns a row with every key masked into a uniform row instead of an empty one
    (chapter 8 shows both).

    Args:
        mask: boolean, any shape (e.g. (L, S) or (B, 1, 1, S)); True = may attend.
        dtype: float dtype of the result in the mask's backend (e.g. ``np.float16`` or
            ``torch.float16``, or a name like ``"float16"``); default the backend's
            default float (float64 for NumPy, ``torch.get_default_dtype()`` for torch).
        masked_value: the value for forbidden entries (default ``-inf``); must be
            negative.

    Returns:
        A float array with the mask's shape, backend and device.
    """
    xp = namespace(mask=mask)
    if not xp.isdtype(mask.dtype, "bool"):
        raise TypeError(f"mask must be boolean (True = may attend); got {mask.dtype}")
    if not isinstance(masked_value, (int, float)) or isinstance(masked_value, bool) \
            or math.isnan(masked_value) or masked_value >= 0:
        raise ValueError(f"masked_value must be a negative number; got {masked_value!r}")
    if isinstance(dtype, str):
        dtype = getattr(xp, dtype)
    zero = xp.zeros(mask.shape, dtype=dtype, device=device_of(mask))
    if not xp.isdtype(zero.dtype, "real floating"):
        raise TypeError(f"dtype must be a floating dtype; got {dtype}")
    with np.errstate(over="ignore"):  # -1e9 in float16 is -inf: documented above
        fill = xp.asarray(masked_value, dtype=zero.dtype, device=device_of(mask))
    return xp.where(mask, zero, fill)


def bias_to_mask(bias: Any, *, threshold: float = -math.inf):
    """Additive bias -> boolean mask: True where ``bias > threshold``.

    With the default threshold only ``-inf`` entries count as forbidden, so a finite
    bias (ALiBi's, or a relative-position bias) maps to all True.  For a bias written
    with a big finite negative, pass a threshold above it (e.g. -1e4 for -1e9 masks).

    Args:
        bias: float array, any shape.
        threshold: entries at or below it are forbidden.
    """
    xp = namespace(bias=bias)
    if not xp.isdtype(bias.dtype, "real floating"):
        raise TypeError(f"bias must have a floating dtype; got {bias.dtype}")
    return bias > threshold


def _n_positional(fn: Callable) -> int:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in kinds and p.default is inspect.Parameter.empty for p in params)


def mask_from_function(mask_mod: Callable, L: int, S: int | None = None, *,
                       B: int | None = None, H: int | None = None, like: Any = None):
    """Materialise a mask written as a function of positions.

    ``mask_mod(q_idx, kv_idx) -> bool`` returns whether query ``q_idx`` may attend to
    key ``kv_idx``; it is called once, with broadcasting integer arrays q_idx (L, 1) and
    kv_idx (1, S), and the result is the (L, S) mask.  A four-argument
    ``mask_mod(b, h, q_idx, kv_idx)``, the signature of PyTorch's FlexAttention, is
    called with b (B, 1, 1, 1), h (1, H, 1, 1), q_idx (1, 1, L, 1) and kv_idx
    (1, 1, 1, S) and gives a (B, H, L, S) mask (B and H default to 1).

    Write the function with operators (``<=``, ``&``, ``|``, ``~``, ``abs``, ``%``) and
    it works on NumPy and torch alike.  Example, causal within documents::

        doc = np.array([0, 0, 0, 1, 1])
        m = mask_from_function(lambda q, k: (q >= k) & (doc[q] == doc[k]), 5)

    Args:
        mask_mod: the function, of 2 or 4 positional arguments.
        L, S: numbers of queries and keys (S defaults to L).
        B, H: batch and head sizes, for a four-argument function only.
        like: an array whose backend and device the index arrays and mask should use.

    Returns:
        Boolean (L, S) or (B, H, L, S), materialised (not a broadcast view).
    """
    S = L if S is None else S
    _check_size("L", L)
    _check_size("S", S)
    xp, device = _xp_and_device(like)
    n_args = _n_positional(mask_mod)
    if n_args == 4:
        B, H = (1 if B is None else B), (1 if H is None else H)
        _check_size("B", B)
        _check_size("H", H)
        shape = (B, H, L, S)
        b = xp.reshape(xp.arange(B, device=device), (B, 1, 1, 1))
        h = xp.reshape(xp.arange(H, device=device), (1, H, 1, 1))
        q = xp.reshape(xp.arange(L, device=device), (1, 1, L, 1))
        kv = xp.reshape(xp.arange(S, device=device), (1, 1, 1, S))
        out = mask_mod(b, h, q, kv)
    elif n_args == 2:
        if B is not None or H is not None:
            raise ValueError("B and H are only for a four-argument mask_mod(b, h, q_idx, "
                             "kv_idx); this mask_mod takes (q_idx, kv_idx)")
        shape = (L, S)
        out = mask_mod(xp.arange(L, device=device)[:, None], xp.arange(S, device=device)[None, :])
    else:
        raise ValueError(f"mask_mod must take 2 arguments (q_idx, kv_idx) or 4 (b, h, "
                         f"q_idx, kv_idx); got a function of {n_args}")
    out = xp.asarray(out, device=device)
    if not xp.isdtype(out.dtype, "bool"):
        raise TypeError(f"mask_mod must return booleans; got {out.dtype}")
    try:
        ok = tuple(np.broadcast_shapes(tuple(out.shape), shape)) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"mask_mod returned shape {tuple(out.shape)}, which does not "
                         f"broadcast to {shape}")
    return xp.logical_and(out, xp.ones(shape, dtype=xp.bool, device=device))
