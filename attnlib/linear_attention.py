"""Linear attention: attention with a factorised kernel (chapter 14).

Chapter 2 read softmax attention as kernel smoothing: query i gives key j the weight
``K(q_i, k_j) / sum_l K(q_i, k_l)`` with the kernel ``K(q, k) = exp(q . k / sqrt(d_k))``.
Linear attention (Katharopoulos et al. 2020) swaps that kernel for one that factorises,
``K(q, k) = phi(q) . phi(k)`` with a *feature map* phi from d_k to r non-negative
features.  Then the sums over keys can be taken once, before any query is seen::

    o_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / phi(q_i)^T (sum_j phi(k_j))
        =  phi(q_i)^T  KV                  / phi(q_i)^T  z

with ``KV`` of shape (r, d_v) and ``z`` of shape (r,).  Cost: O(n r d_v) instead of
O(n^2 d).  With a causal mask the sums become running sums, a recurrence with a state
of fixed size: the transformer is an RNN.

=================================  ===========================================================
``kernel_attention``               the definition, O(L S): weights ``phi(q) phi(k)^T``, masked
                                   and normalised row by row
``linear_attention``               the parallel form, O((L + S) r d_v); ``causal=True`` uses
                                   cumulative sums
``linear_attention_recurrent``     the causal recurrent form, one token at a time, with a
                                   state ``(KV, z)`` that can be carried on (decoding)
=================================  ===========================================================

All three give the same result (up to rounding).  Shape letters: ``...`` leading batch or
head dimensions, L queries, S keys, d_k query/key width, d_v value width, r features.
Feature maps must be non-negative; a query whose denominator ``phi(q)^T z`` is zero (no
key, or all features zero) gets a zero output, like a fully masked row in attnlib's SDPA.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import numpy as np

from ._backend import (
    broadcast_shapes,
    check_array,
    check_float,
    check_mask,
    device_of,
    namespace,
    same_dtype,
)
from .masks import causal_mask

__all__ = [
    "LinearAttentionState",
    "elu_feature_map",
    "kernel_attention",
    "kernel_attention_weights",
    "linear_attention",
    "linear_attention_recurrent",
    "positive_random_features",
]

FeatureMap = Callable[[Any], Any]


# ---------------------------------------------------------------------------------------
# Feature maps
# ---------------------------------------------------------------------------------------


def elu_feature_map(x: Any) -> Any:
    """``elu(x) + 1``, elementwise: x + 1 for x > 0, exp(x) otherwise (r = d_k).

    The feature map of Katharopoulos et al. (2020): positive everywhere, so every weight
    is positive and every denominator non-zero, and smooth, so gradients flow.

    Args:
        x: (..., d_k), NumPy or torch, floating.

    Returns:
        (..., d_k), same backend and dtype.
    """
    xp = namespace(x=x)
    check_float(xp, "x", x)
    zero = xp.zeros_like(x)
    return xp.maximum(x, zero) + xp.exp(xp.minimum(x, zero))  # x + 1 if x > 0, else e^x


def positive_random_features(d_k: int, n_features: int, *, seed: int = 0,
                             scale: float = 1.0) -> FeatureMap:
    """A random feature map whose kernel approximates ``exp(scale * q . k)`` on average.

    ``phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(r)`` with ``x' = sqrt(scale) x`` and the rows
    of W (r, d_k) drawn from a standard normal (NumPy ``default_rng(seed)``).  For every
    q and k, ``E[phi(q) . phi(k)] = exp(scale * q . k)``: the softmax kernel, unbiased.
    These are the positive random features of the Performer (Choromanski et al. 2021),
    without their orthogonalisation.  With ``scale = 1 / sqrt(d_k)`` linear attention
    with this map estimates softmax attention; the estimate's variance grows quickly with
    ``|q| |k|``, i.e. with how peaked the softmax attention is (chapter 14 measures it).

    Args:
        d_k: width of the queries and keys.
        n_features: r, the number of random features (more: less variance).
        seed: seed of W; the same seed gives the same map.
        scale: the kernel's inverse temperature.

    Returns:
        A function ``phi(x)``: (..., d_k) -> (..., r), for NumPy arrays or torch tensors.
    """
    for name, n in (("d_k", d_k), ("n_features", n_features)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be a positive integer; got {n!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number; got {scale!r}")
    W = np.random.default_rng(seed).standard_normal((n_features, d_k))  # (r, d_k)
    root = math.sqrt(scale)

    def phi(x: Any) -> Any:
        xp = namespace(x=x)
        check_float(xp, "x", x)
        if x.shape[-1] != d_k:
            raise ValueError(f"x must have last dimension d_k = {d_k}; got shape "
                             f"{tuple(x.shape)}")
        w = xp.asarray(W, dtype=x.dtype, device=device_of(x))  # (r, d_k)
        xs = x * root  # (..., d_k)
        sq = xp.sum(xs * xs, axis=-1, keepdims=True) / 2  # (..., 1)
        return xp.exp(xs @ xp.matrix_transpose(w) - sq) / math.sqrt(n_features)  # (..., r)

    return phi


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------


def _check_qkv(q: Any, k: Any, v: Any = None):
    xp = namespace(q=q, k=k, v=v)
    check_array(q, "q", min_ndim=2, shape_hint="(..., L, d_k)")
    check_array(k, "k", min_ndim=2, shape_hint="(..., S, d_k)")
    check_float(xp, "q", q)
    check_float(xp, "k", k)
    lead = {"q": tuple(q.shape[:-2]), "k": tuple(k.shape[:-2])}
    if v is not None:
        check_array(v, "v", min_ndim=2, shape_hint="(..., S, d_v)")
        check_float(xp, "v", v)
        if v.shape[-2] != k.shape[-2]:
            raise ValueError(f"k and v must have the same number of keys S (dimension -2); "
                             f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
        lead["v"] = tuple(v.shape[:-2])
    same_dtype({"q": q, "k": k, "v": v})
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last dimension d_k; got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    batch = broadcast_shapes(lead, "the leading (batch, head) dimensions of q, k and v")
    return xp, batch


def _features(xp, feature_map: FeatureMap, q: Any, k: Any):
    if not callable(feature_map):
        raise TypeError(f"feature_map must be a function (..., d_k) -> (..., r); got "
                        f"{type(feature_map).__name__}")
    fq, fk = feature_map(q), feature_map(k)  # (..., L, r), (..., S, r)
    if fq.shape[:-1] != q.shape[:-1] or fk.shape[:-1] != k.shape[:-1] \
            or fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map must map (..., d_k) to (..., r) with one r; got "
                         f"q {tuple(q.shape)} -> {tuple(fq.shape)} and k {tuple(k.shape)} "
                         f"-> {tuple(fk.shape)}")
    return fq, fk


def _divide(xp, num: Any, den: Any):
    """num / den[..., None], with zero where den is zero: (..., L, d_v)."""
    safe = xp.where(den == 0, xp.ones_like(den), den)  # (..., L)
    return xp.where((den == 0)[..., None], xp.zeros_like(num), num / safe[..., None])


# ---------------------------------------------------------------------------------------
# The three forms
# ---------------------------------------------------------------------------------------


def kernel_attention_weights(q: Any, k: Any, mask: Any = None, *,
                             feature_map: FeatureMap = elu_feature_map,
                             causal: bool = False) -> Any:
    """Weights of attention with the kernel ``phi(q) . phi(k)``: (..., L, S), O(L S).

    ``a_ij = phi(q_i) . phi(k_j) / sum_l phi(q_i) . phi(k_l)`` over the allowed keys:
    softmax attention with ``exp(q . k / sqrt(d_k))`` replaced by another kernel.  Each
    row is non-negative and sums to one (zero for a row with no allowed key).

    Args:
        q: (..., L, d_k).  k: (..., S, d_k).
        mask: optional boolean, broadcastable to (..., L, S), True = may attend.
        feature_map: phi, (..., d_k) -> (..., r), non-negative; default elu(x) + 1.
        causal: and the mask with attnlib's bottom-right causal mask.

    Returns:
        (..., L, S), backend and dtype of q.  See chapter 14.
    """
    xp, batch = _check_qkv(q, k)
    fq, fk = _features(xp, feature_map, q, k)
    kern = fq @ xp.matrix_transpose(fk)  # (..., L, S)
    target = (*batch, q.shape[-2], k.shape[-2])
    allowed = None
    if mask is not None:
        allowed = check_mask(xp, mask, target, like=kern)
        if not xp.isdtype(allowed.dtype, "bool"):
            raise TypeError(f"mask must be boolean (True = may attend); got {mask.dtype}")
    if causal:
        c = causal_mask(q.shape[-2], k.shape[-2], like=q)  # (L, S)
        allowed = c if allowed is None else xp.logical_and(allowed, c)
    if allowed is not None:
        kern = xp.where(allowed, kern, xp.zeros_like(kern))
    total = xp.sum(kern, axis=-1)  # (..., L)
    safe = xp.where(total == 0, xp.ones_like(total), total)
    return kern / safe[..., None]  # (..., L, S)


def kernel_attention(q: Any, k: Any, v: Any, mask: Any = None, *,
                     feature_map: FeatureMap = elu_feature_map, causal: bool = False) -> Any:
    """``kernel_attention_weights(q, k, ...) @ v``: (..., L, d_v), the O(L S) definition.

    The reference that :func:`linear_attention` and :func:`linear_attention_recurrent`
    must equal.  Arguments as for :func:`kernel_attention_weights`; v is (..., S, d_v).
    """
    _check_qkv(q, k, v)
    return kernel_attention_weights(q, k, mask, feature_map=feature_map, causal=causal) @ v


def linear_attention(q: Any, k: Any, v: Any, *, feature_map: FeatureMap = elu_feature_map,
                     causal: bool = False) -> Any:
    """Linear attention in its parallel form (Katharopoulos et al. 2020).

    Non-causal: ``KV = phi(K)^T V`` (..., r, d_v) and ``z = phi(K)^T 1`` (..., r) are
    computed once, and ``o_i = phi(q_i)^T KV / phi(q_i)^T z``: O((L + S) r d_v) time, and
    no (L, S) matrix anywhere.

    Causal (bottom-right, as attnlib's SDPA: query i sits at key position S - L + i):
    query i uses the running sums up to its position, ``KV_p = sum_{j <= p} phi(k_j) v_j^T``
    and ``z_p``, taken with cumulative sums over the keys.  This form stores one (r, d_v)
    state per key, O(S r d_v) memory; :func:`linear_attention_recurrent` keeps only one.

    Args:
        q: queries, (..., L, d_k).
        k: keys, (..., S, d_k).
        v: values, (..., S, d_v).  Leading dimensions broadcast.
        feature_map: phi, (..., d_k) -> (..., r), non-negative; default elu(x) + 1.
        causal: causal masking, bottom-right aligned.

    Returns:
        (..., L, d_v), backend and dtype of q; equal to :func:`kernel_attention` with the
        same arguments.  See chapter 14.
    """
    xp, batch = _check_qkv(q, k, v)
    fq, fk = _features(xp, feature_map, q, k)  # (..., L, r), (..., S, r)
    L, S = q.shape[-2], k.shape[-2]
    if not causal:
        kv = xp.matrix_transpose(fk) @ v  # (..., r, d_v)
        z = xp.sum(fk, axis=-2)  # (..., r)
        num = fq @ kv  # (..., L, d_v)
        den = xp.sum(fq * z[..., None, :], axis=-1)  # (..., L)
        return _divide(xp, num, den)
    kv = xp.cumulative_sum(fk[..., :, :, None] * v[..., :, None, :], axis=-3)  # (..., S, r, d_v)
    z = xp.cumulative_sum(fk, axis=-2)  # (..., S, r)
    n_seen = min(L, S)  # queries at positions >= 0; the first L - S (if L > S) see nothing
    kv, z = kv[..., S - n_seen:, :, :], z[..., S - n_seen:, :]  # the last n_seen prefixes
    fq_seen = fq[..., L - n_seen:, :]  # (..., n_seen, r)
    num = (fq_seen[..., :, None, :] @ kv)[..., 0, :]  # (..., n_seen, d_v)
    den = xp.sum(fq_seen * z, axis=-1)  # (..., n_seen)
    out = _divide(xp, num, den)
    if n_seen == L:
        return out
    out = xp.broadcast_to(out, (*batch, n_seen, v.shape[-1]))
    zeros = xp.zeros((*batch, L - n_seen, v.shape[-1]), dtype=q.dtype, device=device_of(q))
    return xp.concat([zeros, out], axis=-2)


class LinearAttentionState(NamedTuple):
    """The state of causal linear attention after some tokens.

    Attributes:
        kv: (..., r, d_v), ``sum_j phi(k_j) v_j^T`` over the tokens seen.
        z: (..., r), ``sum_j phi(k_j)``.
    """

    kv: Any
    z: Any


def linear_attention_recurrent(q: Any, k: Any, v: Any, *,
                               feature_map: FeatureMap = elu_feature_map,
                               state: LinearAttentionState | None = None):
    """Causal linear attention as a recurrence: one token at a time, O(r d_v) state.

    For t = 0 .. n - 1::

        KV_t = KV_{t-1} + phi(k_t) v_t^T        (r, d_v)
        z_t  = z_{t-1}  + phi(k_t)              (r,)
        o_t  = phi(q_t)^T KV_t / phi(q_t)^T z_t

    This is an RNN whose state does not grow with the sequence, unlike a KV cache
    (chapter 11): decoding a token costs the same at position 10 and at 10^6.  Pass the
    returned state back in to go on where a previous call stopped.

    Args:
        q: (..., n, d_k), k: (..., n, d_k), v: (..., n, d_v): n new tokens (L = S = n).
        feature_map: phi, (..., d_k) -> (..., r), non-negative; default elu(x) + 1.
        state: a :class:`LinearAttentionState` from an earlier call, or None (empty).

    Returns:
        ``(out, state)``: out (..., n, d_v), equal to ``linear_attention(..., causal=True)``
        on the whole sequence; state the :class:`LinearAttentionState` after the n tokens.
        See chapter 14.
    """
    xp, batch = _check_qkv(q, k, v)
    if q.shape[-2] != k.shape[-2]:
        raise ValueError(f"the recurrent form takes one query per key (L = S); got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    fq, fk = _features(xp, feature_map, q, k)  # (..., n, r)
    r, d_v = fk.shape[-1], v.shape[-1]
    if state is None:
        kv = xp.zeros((*batch, r, d_v), dtype=q.dtype, device=device_of(q))
        z = xp.zeros((*batch, r), dtype=q.dtype, device=device_of(q))
    else:
        kv, z = state
        namespace(q=q, **{"state.kv": kv, "state.z": z})
        if tuple(kv.shape[-2:]) != (r, d_v) or z.shape[-1] != r:
            raise ValueError(f"state must hold kv (..., r, d_v) = (..., {r}, {d_v}) and z "
                             f"(..., {r}); got kv {tuple(kv.shape)} and z {tuple(z.shape)}")
    outs = []
    for t in range(q.shape[-2]):
        kv = kv + fk[..., t, :, None] * v[..., t, None, :]  # (..., r, d_v)
        z = z + fk[..., t, :]  # (..., r)
        num = (fq[..., t, None, :] @ kv)[..., 0, :]  # (..., d_v)
        den = xp.sum(fq[..., t, :] * z, axis=-1)  # (...,)
        outs.append(_divide(xp, num[..., None, :], den[..., None])[..., 0, :])
    if not outs:
        return xp.zeros((*batch, 0, d_v), dtype=q.dtype, device=device_of(q)), \
            LinearAttentionState(kv, z)
    outs = [xp.broadcast_to(o, (*kv.shape[:-2], d_v)) for o in outs]
    return xp.stack(outs, axis=-2), LinearAttentionState(kv, z)  # (..., n, d_v)
