"""FlashAttention from scratch: online softmax, a tiled forward and backward (chapter 15).

Plain attention writes the (L, S) scores to memory, reads them back for the softmax,
writes the weights, and reads them again for the product with V.  FlashAttention
(Dao et al., 2022) computes the same numbers tile by tile and never stores an (L, S)
array.  Two ideas make that possible:

* **Online softmax.**  A softmax-weighted sum can be accumulated one block of keys at a
  time.  Keep, per query row, the running maximum ``m`` of the scores seen so far, the
  running sum ``l`` of ``exp(score - m)`` and the running accumulator ``acc`` of
  ``exp(score - m) * v``.  When a new block raises the maximum to ``m'``, the old sum and
  accumulator are rescaled by ``exp(m - m')``::

      m'   = max(m, rowmax(s_blk))
      l'   = exp(m - m') * l   + rowsum(exp(s_blk - m'))
      acc' = exp(m - m') * acc + exp(s_blk - m') @ v_blk

  After the last block, ``out = acc / l`` and ``lse = m + log(l)``.

* **Recomputation.**  The forward pass saves only ``lse`` (one number per query).  The
  backward pass rebuilds each tile of weights as ``exp(s_blk - lse)`` and needs the
  row sums ``D = rowsum(dO * O)`` (computed up front from the output).

Everything here is written once for NumPy arrays and torch tensors, through the array
namespace of :mod:`attnlib._backend`.  Shape letters as in the book: ``...`` leading
batch/head dimensions, L queries, S keys, d_k the query/key width, d_v the value width.
Masks: a boolean mask is True where a query may attend; ``causal=True`` is bottom-right
aligned (query i sits at key position S - L + i), as in
:func:`attnlib.scaled_dot_product_attention`.

The module ends with a simulator of a two-level memory (a slow memory and a fast memory
of M elements), which refuses any step whose working set is larger than M and counts the
elements each algorithm moves between the two, the quantity the FlashAttention paper
analyses: Theta(n d + n^2) for plain attention, Theta(n^2 d^2 / M) for the tiled
algorithm (the paper writes N for our n).
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._backend import (
    check_array,
    check_float,
    check_mask,
    device_of,
    namespace,
    same_dtype,
)
from .backward import _sum_to
from .sdpa import _check_qkv

__all__ = [
    "FastMemoryOverflowError",
    "TrafficCount",
    "TwoLevelMemory",
    "flash_attention_backward",
    "flash_attention_forward",
    "flash_attention_traffic",
    "flash_block_sizes",
    "online_softmax",
    "online_softmax_weighted_sum",
    "plain_attention_traffic",
    "tile_schedule",
]

SKIPPED, PARTIAL, FULL = 0, 1, 2  # the three kinds of tile in tile_schedule


# ----------------------------------------------------------------------------- checks

def _positive_int(value: Any, name: str) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _check_scale(scale: Any, d_k: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d_k)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number; got {scale!r}")
    return float(scale)


def _check_key_lengths(xp, key_lengths: Any, batch: tuple[int, ...], S: int, like: Any):
    """Validate per-sequence key lengths; return them in the backend of ``like``,
    shaped to broadcast against scores (B, ..., L, S), plus their min and max."""
    if key_lengths is None:
        return None, S, S
    if not batch:
        raise ValueError("key_lengths needs inputs with a batch dimension: q (B, ..., L, d_k); "
                         "got inputs without leading dimensions")
    if isinstance(key_lengths, (list, tuple)):
        key_lengths = np.asarray(key_lengths, dtype=np.int64)
    check_array(key_lengths, "key_lengths", min_ndim=1, shape_hint="(B,)")
    if not namespace(key_lengths=key_lengths).isdtype(key_lengths.dtype, "integral"):
        raise TypeError(f"key_lengths must hold integers; got dtype {key_lengths.dtype}")
    if tuple(key_lengths.shape) != (batch[0],):
        raise ValueError(f"key_lengths must have shape (B,) = ({batch[0]},), one length per "
                         f"sequence of the first leading dimension; got shape "
                         f"{tuple(key_lengths.shape)}")
    values = [int(x) for x in key_lengths.tolist()]
    if any(x < 0 or x > S for x in values):
        raise ValueError(f"key_lengths must lie in 0..S = 0..{S}; got {values}")
    lengths = xp.asarray(values, device=device_of(like))
    lengths = xp.reshape(lengths, (batch[0],) + (1,) * (len(batch) - 1) + (1, 1))
    return lengths, min(values), max(values)  # lengths: (B, 1, ..., 1, 1, 1)


def _work_dtype(xp, *arrays):
    """Half-precision inputs are computed in float32 (as GPU kernels accumulate)."""
    if arrays[0].dtype in (xp.float16, getattr(xp, "bfloat16", xp.float16)):
        return tuple(xp.astype(a, xp.float32) for a in arrays), arrays[0].dtype
    return arrays, None


# ----------------------------------------------------------------------------- online softmax

def _online_step(xp, m, l, acc, s, v_blk):
    """Fold one block of scores into the running (m, l, acc) of each query row.

    m, l: (..., L); acc: (..., L, d_v); s: (..., L, b) scores, -inf where forbidden;
    v_blk: (..., b, d_v).  Rows that have seen only -inf keep m = -inf, l = 0, acc = 0.
    """
    m_new = xp.maximum(m, xp.max(s, axis=-1))  # (..., L)
    m_use = xp.where(m_new == -math.inf, xp.zeros_like(m_new), m_new)  # no -inf - -inf
    alpha = xp.exp(m - m_use)  # (..., L): rescales what was accumulated so far
    p = xp.exp(s - m_use[..., None])  # (..., L, b)
    l = alpha * l + xp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + p @ v_blk  # (..., L, d_v)
    return m_new, l, acc


def _finish(xp, m, l, acc):
    """out = acc / l and lse = m + log l; rows with no allowed key give 0 and -inf."""
    seen = l > 0
    out = acc / xp.where(seen, l, xp.ones_like(l))[..., None]
    neg_inf = xp.full(l.shape, -math.inf, dtype=l.dtype, device=device_of(l))
    lse = xp.where(seen, m + xp.log(xp.where(seen, l, xp.ones_like(l))), neg_inf)
    return out, lse


def online_softmax(x: Any, block: int) -> Any:
    """Softmax along the last axis, reading ``x`` one block of ``block`` entries at a time.

    The first pass keeps only a running maximum ``m`` and a running sum
    ``l = sum(exp(x - m))``, rescaling ``l`` by ``exp(m_old - m_new)`` whenever a block
    raises the maximum (Milakov and Gimelshein, 2018).  The second pass writes
    ``exp(x - m) / l`` block by block.  Equal to :func:`attnlib.softmax` (chapter 15).

    Args:
        x: scores (..., n), NumPy array or torch tensor with a float dtype.
        block: positive integer, how many entries are read at a time.

    Returns:
        (..., n), rows summing to one (rows of all ``-inf`` give zeros).
    """
    xp = namespace(x=x)
    check_array(x, "x", min_ndim=1, shape_hint="(..., n)")
    check_float(xp, "x", x)
    block = _positive_int(block, "block")
    n = x.shape[-1]
    m = xp.full(x.shape[:-1], -math.inf, dtype=x.dtype, device=device_of(x))  # (...,)
    l = xp.zeros(x.shape[:-1], dtype=x.dtype, device=device_of(x))
    for j0 in range(0, n, block):  # pass 1: running max and rescaled running sum
        blk = x[..., j0:j0 + block]
        m_new = xp.maximum(m, xp.max(blk, axis=-1))
        m_use = xp.where(m_new == -math.inf, xp.zeros_like(m_new), m_new)
        l = xp.exp(m - m_use) * l + xp.sum(xp.exp(blk - m_use[..., None]), axis=-1)
        m = m_new
    m_use = xp.where(m == -math.inf, xp.zeros_like(m), m)[..., None]
    l = xp.where(l > 0, l, xp.ones_like(l))[..., None]
    parts = [xp.exp(x[..., j0:j0 + block] - m_use) / l for j0 in range(0, n, block)]
    return xp.concat(parts, axis=-1) if parts else x * 0  # pass 2


def online_softmax_weighted_sum(scores: Any, values: Any, block: int) -> tuple[Any, Any]:
    """``softmax(scores) @ values`` in **one** pass over blocks of ``block`` keys.

    Each block updates the running maximum, the running sum and the rescaled
    accumulator of every row (see the module docstring); nothing of size (..., L, S)
    other than the input is ever formed.  Chapter 15 derives the rescaling.

    Args:
        scores: (..., L, S), ``-inf`` where a key is forbidden.
        values: (..., S, d_v).
        block: positive integer, keys per block.

    Returns:
        ``(out, lse)``: (..., L, d_v) and the log-sum-exp of each row, (..., L).  A row
        of all ``-inf`` gives a zero output and ``lse = -inf``.
    """
    xp = namespace(scores=scores, values=values)
    check_array(scores, "scores", min_ndim=2, shape_hint="(..., L, S)")
    check_array(values, "values", min_ndim=2, shape_hint="(..., S, d_v)")
    check_float(xp, "scores", scores)
    same_dtype({"scores": scores, "values": values})
    block = _positive_int(block, "block")
    if scores.shape[-1] != values.shape[-2]:
        raise ValueError(f"scores (..., L, S) and values (..., S, d_v) must agree on S; got "
                         f"scores {tuple(scores.shape)} and values {tuple(values.shape)}")
    batch = tuple(np.broadcast_shapes(scores.shape[:-2], values.shape[:-2]))
    L, S, d_v = scores.shape[-2], scores.shape[-1], values.shape[-1]
    m = xp.full((*batch, L), -math.inf, dtype=scores.dtype, device=device_of(scores))
    l = xp.zeros((*batch, L), dtype=scores.dtype, device=device_of(scores))
    acc = xp.zeros((*batch, L, d_v), dtype=scores.dtype, device=device_of(scores))
    for j0 in range(0, S, block):
        m, l, acc = _online_step(xp, m, l, acc, scores[..., j0:j0 + block],
                                 values[..., j0:j0 + block, :])
    return _finish(xp, m, l, acc)


# ----------------------------------------------------------------------------- tiles

def _tile_kind(i0: int, i1: int, j0: int, j1: int, L: int, S: int, causal: bool,
               shortest: int, longest: int) -> int:
    """SKIPPED, PARTIAL or FULL for the tile of queries i0..i1-1 and keys j0..j1-1.

    Causal (bottom-right): query i may see key j when j <= i + S - L.  Padding: key j of
    sequence b exists when j < length[b]; ``shortest``/``longest`` are the extreme lengths.
    """
    if j0 >= longest:
        return SKIPPED  # every sequence is padded here
    if causal and j0 > i1 - 1 + S - L:
        return SKIPPED  # even the last query of the tile is before the first key
    if causal and j1 - 1 > i0 + S - L:
        return PARTIAL  # the first query of the tile cannot see the last key
    return PARTIAL if j1 > shortest else FULL


def tile_schedule(L: int, S: int | None = None, *, block_q: int, block_k: int,
                  causal: bool = False, key_lengths: Any = None) -> np.ndarray:
    """Which tiles the tiled forward and backward visit, as an integer (T_r, T_c) array.

    Tile (r, c) holds queries ``r*block_q ...`` and keys ``c*block_k ...``.  Entries are
    ``0`` (skipped: every pair is masked, by ``causal`` or by padding beyond the longest
    of ``key_lengths``), ``1`` (visited, with a mask) and ``2`` (visited, no mask needed).
    Used by :func:`flash_attention_forward` and :func:`flash_attention_backward`, and by
    the tiling figure of chapter 15.
    """
    S = L if S is None else S
    for name, n in (("L", L), ("S", S)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {n!r}")
    block_q, block_k = _positive_int(block_q, "block_q"), _positive_int(block_k, "block_k")
    lengths = [S] if key_lengths is None else [int(x) for x in np.ravel(np.asarray(key_lengths))]
    if any(not 0 <= n <= S for n in lengths):
        raise ValueError(f"key_lengths must lie in 0 .. S = {S}; got {lengths}")
    kinds = np.zeros((-(-L // block_q), -(-S // block_k)), dtype=np.int64)
    for r, c in np.ndindex(*kinds.shape):
        i0, j0 = r * block_q, c * block_k
        kinds[r, c] = _tile_kind(i0, min(i0 + block_q, L), j0, min(j0 + block_k, S), L, S,
                                 causal, min(lengths), max(lengths))
    return kinds


def _tile_scores(xp, q_blk, k, i0, j0, j1, ctx) -> Any:
    """Masked scores of one tile: (..., b_q, b_k).  ``q_blk`` is already scaled."""
    s = q_blk @ xp.matrix_transpose(k[..., j0:j1, :])  # (..., b_q, b_k)
    mask, causal, lengths, kind, L, S = ctx
    if mask is not None:
        rows = slice(i0, i0 + q_blk.shape[-2]) if mask.shape[-2] != 1 else slice(None)
        cols = slice(j0, j1) if mask.shape[-1] != 1 else slice(None)
        tile = mask[..., rows, cols]
        if not xp.isdtype(tile.dtype, "bool"):
            s = s + tile  # a float mask is added
            tile = None
    else:
        tile = None
    if kind == PARTIAL:
        device = device_of(s)
        j = xp.arange(j0, j1, device=device)  # (b_k,)
        keep = None
        if causal:
            i = xp.arange(i0, i0 + q_blk.shape[-2], device=device)  # (b_q,)
            keep = j[None, :] <= i[:, None] + (S - L)  # (b_q, b_k)
        if lengths is not None:
            pad = j < lengths  # (B, 1, ..., 1, b_k)
            keep = pad if keep is None else xp.logical_and(keep, pad)
        tile = keep if tile is None else xp.logical_and(tile, keep)
    if tile is not None:
        neg_inf = xp.asarray(-math.inf, dtype=s.dtype, device=device_of(s))
        s = xp.where(tile, s, neg_inf)
    return s


def _prepare(q, k, v, mask, causal, scale, block_q, block_k, key_lengths):
    xp, target = _check_qkv(q, k, v, mask)  # target = (..., L, S)
    scale = _check_scale(scale, q.shape[-1])
    block_q, block_k = _positive_int(block_q, "block_q"), _positive_int(block_k, "block_k")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    if mask is not None:
        mask = check_mask(xp, mask, target, like=q)
        if mask.ndim < 2:  # e.g. an (S,) mask: give it the (L, S) axes the tiles index
            mask = xp.reshape(mask, (1,) * (2 - mask.ndim) + tuple(mask.shape))
    batch, L, S = target[:-2], target[-2], target[-1]
    lengths, shortest, longest = _check_key_lengths(xp, key_lengths, batch, S, like=q)
    return xp, batch, L, S, scale, block_q, block_k, mask, lengths, shortest, longest


# ----------------------------------------------------------------------------- forward

def flash_attention_forward(q: Any, k: Any, v: Any, mask: Any = None, *,
                            causal: bool = False, scale: float | None = None,
                            block_q: int = 128, block_k: int = 128,
                            key_lengths: Any = None) -> tuple[Any, Any]:
    """Exact attention computed tile by tile, never forming the (..., L, S) weights.

    For each block of ``block_q`` queries, the keys and values are read in blocks of
    ``block_k``; each tile of scores is folded into a running maximum, sum and output
    by the online softmax.  Tiles that the causal mask or the padding forbid entirely
    are skipped (see :func:`tile_schedule`).

    Args:
        q: queries, (..., L, d_k).
        k: keys, (..., S, d_k).
        v: values, (..., S, d_v).  The leading dimensions of q, k and v broadcast.
        mask: optional, broadcastable to (..., L, S).  Boolean: True = may attend.
            Floating: added to the scores.  (A full (L, S) mask costs the memory this
            function saves; prefer ``causal`` and ``key_lengths``.)
        causal: forbid future keys, **bottom-right aligned**: query i sits at key
            position S - L + i and sees keys 0 .. S - L + i::

                L = 2, S = 4      k0 k1 k2 k3
                            q0 [  1  1  1  0 ]
                            q1 [  1  1  1  1 ]

        scale: multiplies the scores; default 1/sqrt(d_k).
        block_q, block_k: tile sizes (positive integers; need not divide L or S).
        key_lengths: optional (B,) integers: sequence b of the first leading dimension
            has ``key_lengths[b]`` real keys, the rest are padding.

    Returns:
        ``(out, lse)``: the attention output (..., L, d_v), and the log-sum-exp of each
        row of masked, scaled scores (..., L), which is all the backward pass needs.  A
        query with no allowed key gets a zero output and ``lse = -inf``.  Float16 and
        bfloat16 inputs are computed in float32 and the output is cast back (``lse``
        stays float32).

    Equal to :func:`attnlib.scaled_dot_product_attention`; see chapter 15.
    """
    xp, batch, L, S, scale, block_q, block_k, mask, lengths, shortest, longest = _prepare(
        q, k, v, mask, causal, scale, block_q, block_k, key_lengths)
    (q, k, v), half = _work_dtype(xp, q, k, v)
    dev = device_of(q)
    out = xp.zeros((*batch, L, v.shape[-1]), dtype=q.dtype, device=dev)  # (..., L, d_v)
    lse = xp.full((*batch, L), -math.inf, dtype=q.dtype, device=dev)  # (..., L)
    for i0 in range(0, L, block_q):
        i1 = min(i0 + block_q, L)
        q_blk = q[..., i0:i1, :] * scale  # (..., b_q, d_k), scaled once per block
        m = xp.full((*batch, i1 - i0), -math.inf, dtype=q.dtype, device=dev)  # running max
        l = xp.zeros((*batch, i1 - i0), dtype=q.dtype, device=dev)  # running sum
        acc = xp.zeros((*batch, i1 - i0, v.shape[-1]), dtype=q.dtype, device=dev)
        for j0 in range(0, S, block_k):
            j1 = min(j0 + block_k, S)
            kind = _tile_kind(i0, i1, j0, j1, L, S, causal, shortest, longest)
            if kind == SKIPPED:
                continue
            s = _tile_scores(xp, q_blk, k, i0, j0, j1, (mask, causal, lengths, kind, L, S))
            m, l, acc = _online_step(xp, m, l, acc, s, v[..., j0:j1, :])
        out[..., i0:i1, :], lse[..., i0:i1] = _finish(xp, m, l, acc)
    return (out if half is None else xp.astype(out, half)), lse


# ----------------------------------------------------------------------------- backward

def _check_saved(xp, out, lse, grad_out, batch, L, d_v, like):
    check_array(out, "out", min_ndim=2, shape_hint="(..., L, d_v)")
    check_array(lse, "lse", min_ndim=1, shape_hint="(..., L)")
    check_array(grad_out, "grad_out", min_ndim=2, shape_hint="(..., L, d_v)")
    for name, a in (("out", out), ("lse", lse), ("grad_out", grad_out)):
        check_float(xp, name, a)
    expected = {"out": (*batch, L, d_v), "grad_out": (*batch, L, d_v), "lse": (*batch, L)}
    for name, a in (("out", out), ("grad_out", grad_out), ("lse", lse)):
        if tuple(a.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {expected[name]} (from q, k and v); "
                             f"got {name} {tuple(a.shape)}")
    same_dtype({"q": like, "out": out, "grad_out": grad_out})


def flash_attention_backward(q: Any, k: Any, v: Any, out: Any, lse: Any, grad_out: Any,
                             mask: Any = None, *, causal: bool = False,
                             scale: float | None = None, block_q: int = 128,
                             block_k: int = 128,
                             key_lengths: Any = None) -> tuple[Any, Any, Any]:
    """Gradients of attention with respect to q, k and v, recomputed tile by tile.

    Nothing of size (L, S) is read from the forward pass.  With ``P = exp(S - lse)``
    rebuilt for each tile from q, k and the saved ``lse`` (the FlashAttention papers
    call the scores S and the weights P; chapter 4 calls them Z and A), and
    ``D = rowsum(dO * O)`` computed once from the output::

        dV_j += P_ij^T dO_i            dP_ij = dO_i V_j^T
        dS_ij = P_ij * (dP_ij - D_i)   dQ_i += scale * dS_ij K_j
                                       dK_j += scale * dS_ij^T Q_i

    Args:
        q, k, v, mask, causal, scale, block_q, block_k, key_lengths: as for
            :func:`flash_attention_forward` (they must be the same as in the forward).
        out: the forward output (..., L, d_v).
        lse: the forward log-sum-exp (..., L).
        grad_out: ``dO``, the gradient of the loss with respect to ``out``, (..., L, d_v).

    Returns:
        ``(dq, dk, dv)`` with the shapes of q, k and v; a broadcast input receives the
        sum of its copies' gradients.  Queries with no allowed key get dq = 0.

    Equal to autograd through :func:`attnlib.scaled_dot_product_attention` and to
    :func:`attnlib.backward.sdpa_backward` (chapter 15).
    """
    xp, batch, L, S, scale, block_q, block_k, mask, lengths, shortest, longest = _prepare(
        q, k, v, mask, causal, scale, block_q, block_k, key_lengths)
    _check_saved(xp, out, lse, grad_out, batch, L, v.shape[-1], q)
    shapes = (tuple(q.shape), tuple(k.shape), tuple(v.shape))
    (q, k, v, out, grad_out), half = _work_dtype(xp, q, k, v, out, grad_out)
    lse = xp.astype(lse, q.dtype)
    D = xp.sum(grad_out * out, axis=-1)  # (..., L): rowsum(dO * O) = rowsum(dP * P)
    # exp(s - (+inf)) = 0: rows with no allowed key (lse = -inf) get zero weights
    lse = xp.where(lse == -math.inf, xp.full_like(lse, math.inf), lse)
    dev = device_of(q)
    dq = [xp.zeros((*batch, min(block_q, L - i0), q.shape[-1]), dtype=q.dtype, device=dev)
          for i0 in range(0, L, block_q)]
    dk, dv = [], []
    for j0 in range(0, S, block_k):  # keys outer, as in FlashAttention-2's backward
        j1 = min(j0 + block_k, S)
        dk_j = xp.zeros((*batch, j1 - j0, k.shape[-1]), dtype=q.dtype, device=dev)
        dv_j = xp.zeros((*batch, j1 - j0, v.shape[-1]), dtype=q.dtype, device=dev)
        for r, i0 in enumerate(range(0, L, block_q)):
            i1 = min(i0 + block_q, L)
            kind = _tile_kind(i0, i1, j0, j1, L, S, causal, shortest, longest)
            if kind == SKIPPED:
                continue
            q_i = q[..., i0:i1, :]  # (..., b_q, d_k)
            s = _tile_scores(xp, q_i * scale, k, i0, j0, j1,
                             (mask, causal, lengths, kind, L, S))  # (..., b_q, b_k)
            p = xp.exp(s - lse[..., i0:i1, None])  # the weights, recomputed
            do_i = grad_out[..., i0:i1, :]  # (..., b_q, d_v)
            dv_j = dv_j + xp.matrix_transpose(p) @ do_i  # (..., b_k, d_v)
            dp = do_i @ xp.matrix_transpose(v[..., j0:j1, :])  # (..., b_q, b_k)
            ds = p * (dp - D[..., i0:i1, None])  # (..., b_q, b_k)
            dq[r] = dq[r] + (ds @ k[..., j0:j1, :]) * scale  # (..., b_q, d_k)
            dk_j = dk_j + (xp.matrix_transpose(ds) @ q_i) * scale  # (..., b_k, d_k)
        dk.append(dk_j)
        dv.append(dv_j)
    grads = [_join(xp, parts, (*batch, 0, width), q)
             for parts, width in ((dq, q.shape[-1]), (dk, k.shape[-1]), (dv, v.shape[-1]))]
    grads = [_sum_to(xp, g, shape) for g, shape in zip(grads, shapes)]
    return tuple(g if half is None else xp.astype(g, half) for g in grads)


def _join(xp, parts, empty_shape, like):
    if parts:
        return xp.concat(parts, axis=-2)
    return xp.zeros(empty_shape, dtype=like.dtype, device=device_of(like))


# ----------------------------------------------------------------------------- memory traffic

class FastMemoryOverflowError(ValueError):
    """Raised when a step of a simulated algorithm would hold more than the fast memory's
    ``M`` elements at once (tiles chosen too large for ``M``).  ``needed``: the size of
    that working set; ``M``: the fast memory's size, both in elements."""

    def __init__(self, message: str, needed: int, M: int):
        super().__init__(message)
        self.needed, self.M = needed, M


@dataclass
class TrafficCount:
    """Elements moved between the slow and the fast memory, by array name.

    ``reads[name]``: elements of ``name`` copied from slow to fast memory;
    ``writes[name]``: elements copied back.  ``peak_fast``: the largest working set the
    algorithm held in fast memory at once, in elements (never more than ``M``: the
    simulator raises :class:`FastMemoryOverflowError` first); ``peak_parts``: what that
    working set was made of, by name.  ``block_q``/``block_k``: the tile sizes it used.
    """

    reads: Counter = field(default_factory=Counter)
    writes: Counter = field(default_factory=Counter)
    peak_fast: int = 0
    peak_parts: dict = field(default_factory=dict)
    block_q: int = 0
    block_k: int = 0

    @property
    def total(self) -> int:
        """Every element read plus every element written."""
        return sum(self.reads.values()) + sum(self.writes.values())


class TwoLevelMemory:
    """A slow memory (HBM, DRAM) of unlimited size and a fast memory (SRAM, cache) of
    ``M`` elements.  Arithmetic happens only in fast memory; the simulator counts the
    elements copied each way and enforces the size of the fast memory: every step of an
    algorithm declares its working set with :meth:`hold`, which raises
    :class:`FastMemoryOverflowError` when it is larger than ``M`` (chapter 15).
    """

    def __init__(self, M: int):
        self.M = _positive_int(M, "M")
        self.count = TrafficCount()

    def read(self, name: str, n: int) -> None:
        """Copy ``n`` elements of array ``name`` from slow to fast memory."""
        self.count.reads[name] += n

    def write(self, name: str, n: int) -> None:
        """Copy ``n`` elements of array ``name`` from fast to slow memory."""
        self.count.writes[name] += n

    def hold(self, n: int = 0, /, **parts: int) -> None:
        """Declare the working set of one step: what sits in fast memory at once.

        Give it as a total ``n``, or by part (``hold(K_j=..., V_j=..., Z_ij=...)``), or
        both (they add up).  Raises :class:`FastMemoryOverflowError` if the total is
        larger than ``M``; otherwise records it if it is the largest so far.
        """
        total = n + sum(parts.values())
        if total > self.M:
            detail = "; ".join(f"{k} = {v}" for k, v in parts.items()) or f"{n}"
            raise FastMemoryOverflowError(
                f"a working set of {total} elements ({detail}) does not fit in the fast "
                f"memory of M = {self.M} elements: choose smaller tiles", total, self.M)
        if total > self.count.peak_fast:
            self.count.peak_fast = total
            self.count.peak_parts = dict(parts) if not n else {"other": n, **parts}


def _check_sizes(n: Any, d: Any, M: Any) -> tuple[int, int, int]:
    n, d, M = _positive_int(n, "n"), _positive_int(d, "d"), _positive_int(M, "M")
    if M < 4 * d:
        raise ValueError(f"M (fast memory, in elements) must be at least 4 d = {4 * d} to "
                         f"hold one row each of q, k, v and o; got M = {M}, d = {d}")
    return n, d, M


def _flash_working_set(B_r: int, B_c: int, d: int) -> dict:
    """What one step of Algorithm 1 holds in fast memory, by part (elements)."""
    return {"K_j": B_c * d, "V_j": B_c * d, "Q_i": B_r * d, "O_i": B_r * d,
            "l_i, m_i": 2 * B_r, "Z_ij": B_r * B_c,  # the tile; A_ij overwrites it
            "row max, row sum": 2 * B_r}


def flash_block_sizes(M: int, d: int) -> tuple[int, int]:
    """Tile sizes for Algorithm 1 of the FlashAttention paper in a fast memory of ``M``
    elements, chosen so that one step's working set fits.  Returns (B_r, B_c).

    ``B_c = ceil(M / 4d)`` keys, as in the paper: K_j and V_j fill about half of M.
    ``B_r = min(B_c, d)`` queries, as in the paper, lowered where needed so that
    K_j, V_j, Q_i, O_i, l_i, m_i, the (B_r, B_c) tile of scores and two row statistics
    fit in M together (the paper's sizes fit only up to a constant factor when
    M < 8 d^2 or so).  The traffic of Algorithm 1 depends on B_c alone, so lowering B_r
    changes no count.  Raises ``ValueError`` if M cannot hold even one query row.
    """
    M, d = _positive_int(M, "M"), _positive_int(d, "d")
    B_c = -(-M // (4 * d))
    room = M - 2 * B_c * d  # what K_j and V_j leave
    B_r = min(B_c, d, max(room, 0) // (2 * d + B_c + 4))
    if B_r < 1:
        raise ValueError(f"M = {M} elements is too small for FlashAttention's tiles with "
                         f"d = {d}: K_j and V_j of B_c = {B_c} rows leave {room} elements, "
                         f"fewer than the {2 * d + B_c + 4} that one query row needs")
    return B_r, B_c


def plain_attention_traffic(n: int, d: int, M: int) -> TrafficCount:
    """Elements moved by plain attention, for n = L = S and d = d_k = d_v.

    Three passes, each blocked to fit in fast memory: (1) the scores ``Z = Q K^T`` in
    square tiles of b rows of Q and b rows of K (2 b d + b^2 <= M), writing Z; (2) the
    softmax of each row of Z, writing the weights A (a row longer than M needs two
    reads: one for the maximum and the sum, one to normalise); (3) ``O = A V`` with the
    same tiles, reading A.  Z and A are the FlashAttention paper's S and P.  Total
    Theta(n d + n^2): Z and A cross the slow memory twice each.
    """
    n, d, M = _check_sizes(n, d, M)
    mem = TwoLevelMemory(M)
    b = min(n, math.isqrt(d * d + M) - d)  # largest b with 2 b d + b^2 <= M
    for i0 in range(0, n, b):  # (1) Z = Q K^T, one block of b query rows at a time
        bi = min(b, n - i0)
        mem.read("Q", bi * d)
        mem.read("K", n * d)  # the inner loop streams all of K past Q_i, b rows at a time
        mem.write("Z", bi * n)  # ... and writes each (bi, b) tile of Z
        mem.hold(Q_i=bi * d, K_j=b * d, Z_ij=bi * b)
    passes = 1 if n <= M else 2  # (2) A = softmax(Z), row by row
    mem.read("Z", passes * n * n)
    mem.write("A", n * n)
    mem.hold(row=min(n, M))
    for i0 in range(0, n, b):  # (3) O = A V, one block of b query rows at a time
        bi = min(b, n - i0)
        mem.read("A", bi * n)  # the inner loop reads A_ij and V_j, b keys at a time,
        mem.read("V", n * d)
        mem.write("O", bi * d)  # ... accumulating O_i in fast memory
        mem.hold(A_ij=bi * b, V_j=b * d, O_i=bi * d)
    mem.count.block_q = mem.count.block_k = b
    return mem.count


def flash_attention_traffic(n: int, d: int, M: int, *, block_q: int | None = None,
                            block_k: int | None = None) -> TrafficCount:
    """Elements moved by FlashAttention's forward (Algorithm 1 of Dao et al., 2022),
    for n = L = S and d = d_k = d_v.

    Keys and values are the outer loop, in blocks of B_c; queries the inner loop, in
    blocks of B_r (default :func:`flash_block_sizes`).  For every (key block, query
    block) pair the algorithm reads Q_i, O_i, l_i, m_i and writes O_i, l_i, m_i back;
    K and V are read once.  With T_c = n / B_c ~ 4 n d / M outer iterations, each
    moving about 3 n d elements of Q and O, the total is Theta(n^2 d^2 / M).

    Each step holds K_j, V_j, Q_i, O_i, l_i, m_i, the tile Z_ij and two row statistics;
    tiles (given or default) whose working set exceeds M raise
    :class:`FastMemoryOverflowError`.
    """
    n, d, M = _check_sizes(n, d, M)
    if block_q is None or block_k is None:
        B_r, B_c = flash_block_sizes(M, d)
    B_r = B_r if block_q is None else _positive_int(block_q, "block_q")
    B_c = B_c if block_k is None else _positive_int(block_k, "block_k")
    mem = TwoLevelMemory(M)
    mem.write("O", n * d)  # initialise O = 0, l = 0, m = -inf in slow memory
    mem.write("l, m", 2 * n)
    br = min(B_r, n)
    for j0 in range(0, n, B_c):  # outer loop: one block of keys and values
        bc = min(B_c, n - j0)
        mem.hold(**_flash_working_set(br, bc, d))  # the largest step of the inner loop
        mem.read("K", bc * d)
        mem.read("V", bc * d)
        # inner loop over the query blocks i (summed here): read Q_i, O_i, l_i, m_i, update
        # them with the tile Z_ij = Q_i K_j^T, write O_i, l_i, m_i back
        mem.read("Q", n * d)
        mem.read("O", n * d)
        mem.read("l, m", 2 * n)
        mem.write("O", n * d)
        mem.write("l, m", 2 * n)
    mem.count.block_q, mem.count.block_k = B_r, B_c
    return mem.count
