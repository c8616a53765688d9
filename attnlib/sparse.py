"""Sparse and local attention patterns, and attention that skips empty blocks (chapter 14).

A sparse pattern is a boolean mask of shape (L, S), True where query i **may attend** to
key j (the convention of every attnlib mask, chapter 8).  The builders here add the
patterns of the long-context literature to the ones of :mod:`attnlib.masks`:

=========================  ===============================================================
``sliding_window_mask``    local attention, causal or two-sided (in :mod:`attnlib.masks`)
``dilated_window_mask``    a window with gaps: every ``dilation``-th key (Longformer)
``strided_mask``           the Sparse Transformer's *strided* pattern (Child et al. 2019)
``fixed_mask``             the Sparse Transformer's *fixed* pattern
``global_mask``            global tokens that see and are seen by all (Longformer, BigBird)
``random_block_mask``      a few random key blocks per query block (BigBird)
=========================  ===============================================================

Combine them with :func:`attnlib.masks.mask_or` and :func:`attnlib.masks.mask_and`.

A mask only *hides* scores: dense masked attention computes every score and then throws
most of them away, so it costs as much as full attention.  To *save* compute, a kernel
must know which tiles of the score matrix are empty and never compute them.
:class:`BlockLayout` is that knowledge, a boolean map of (L / block, S / block) tiles, and
:func:`block_sparse_attention` is a plain loop that computes only the non-empty tiles and
equals dense masked attention.

Queries and keys are placed as in :func:`attnlib.masks.causal_mask`: query i sits at key
position ``p = i + S - L`` (``align="bottom-right"``, the default) or ``p = i``
(``"top-left"``); with L = S both are ``p = i``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

from ._backend import (
    broadcast_shapes,
    check_array,
    check_float,
    default_scale,
    device_of,
    namespace,
    same_dtype,
)
from .masks import causal_mask, mask_from_function
from .softmax import softmax

__all__ = [
    "BlockLayout",
    "block_layout",
    "block_sparse_attention",
    "dilated_window_mask",
    "fixed_mask",
    "global_mask",
    "random_block_mask",
    "strided_mask",
]

_ALIGNMENTS = ("bottom-right", "top-left")
_PARTS = ("both", "local", "strided")


# ---------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        what = "a non-negative" if minimum == 0 else f"an integer >= {minimum}, i.e. a positive"
        raise ValueError(f"{name} must be {what} integer; got {value!r}")
    return int(value)


def _sizes(L: int, S: int | None, align: str) -> tuple[int, int, int]:
    """Checked (L, S, offset): query i sits at key position i + offset."""
    S = L if S is None else S
    _check_int("L", L, 0)
    _check_int("S", S, 0)
    if align not in _ALIGNMENTS:
        raise ValueError(f"align must be one of {_ALIGNMENTS}; got {align!r}")
    return int(L), int(S), (S - L if align == "bottom-right" else 0)


def _check_part(part: str) -> None:
    if part not in _PARTS:
        raise ValueError(f"part must be one of {_PARTS}; got {part!r}")


# ---------------------------------------------------------------------------------------
# Patterns (boolean masks, True = may attend)
# ---------------------------------------------------------------------------------------


def dilated_window_mask(L: int, S: int | None = None, *, window: int, dilation: int = 1,
                        causal: bool = True, align: str = "bottom-right", like: Any = None):
    """A sliding window with gaps: ``window`` keys on each side, ``dilation`` apart.

    Query i at position p may attend to key j when ``d = p - j`` is a multiple of
    ``dilation`` and

    - ``causal=True``:  ``0 <= d <= window * dilation``  (itself and ``window`` keys back);
    - ``causal=False``: ``|d| <= window * dilation``     (``window`` keys on each side).

    Each query sees as many keys as a plain window of the same ``window``, but reaches
    ``dilation`` times as far; Longformer gives different heads different dilations
    (Beltagy et al. 2020).  ``dilation=1`` is :func:`attnlib.masks.sliding_window_mask`.
    Example, L = S = 7, window = 2, dilation = 2, causal::

        1 0 0 0 0 0 0
        0 1 0 0 0 0 0
        1 0 1 0 0 0 0
        0 1 0 1 0 0 0
        1 0 1 0 1 0 0
        0 1 0 1 0 1 0
        0 0 1 0 1 0 1

    Args:
        L, S: numbers of queries and keys (S defaults to L).
        window: non-negative integer, keys per side.
        dilation: positive integer, the gap between attended keys.
        causal: one-sided (True) or two-sided (False).
        align: ``"bottom-right"`` or ``"top-left"``, as in :func:`attnlib.masks.causal_mask`.
        like: an array whose backend and device the mask should use (NumPy if None).

    Returns:
        Boolean (L, S).  See chapter 14.
    """
    L, S, offset = _sizes(L, S, align)
    window = _check_int("window", window, 0)
    dilation = _check_int("dilation", dilation, 1)
    reach = window * dilation

    def allowed(q, k):
        d = q + offset - k  # (L, S): how far back key j is from query i
        near = (d >= 0) & (d <= reach) if causal else (abs(d) <= reach)
        return near & (d % dilation == 0)

    return mask_from_function(allowed, L, S, like=like)


def strided_mask(L: int, S: int | None = None, *, stride: int, part: str = "both",
                 causal: bool = True, align: str = "bottom-right", like: Any = None):
    """The Sparse Transformer's *strided* pattern with stride l (Child et al. 2019).

    The paper splits attention between two heads: query i at position p attends to

    - ``part="local"``:   ``A1 = {j : 0 <= p - j <= l}``, the previous l positions and
      itself;
    - ``part="strided"``: ``A2 = {j : (p - j) mod l = 0, j <= p}``, every l-th position;
    - ``part="both"``:    their union, what one head attends to in the paper's "merged"
      variant, and what two layers of factorised heads together reach in one hop.

    With l close to sqrt(n), each query sees about 2 sqrt(n) keys, yet any key can reach any
    later query in two steps (local, then strided).  The pattern suits data with a
    periodic structure (image rows of width l).  ``causal=False`` gives the two-sided
    version (``|p - j| <= l``, ``(p - j) mod l = 0``), which is not in the paper.

    Args:
        L, S: numbers of queries and keys (S defaults to L).
        stride: positive integer l.
        part: ``"both"``, ``"local"`` or ``"strided"``.
        causal, align, like: as for :func:`dilated_window_mask`.

    Returns:
        Boolean (L, S).  See chapter 14.
    """
    L, S, offset = _sizes(L, S, align)
    stride = _check_int("stride", stride, 1)
    _check_part(part)

    def allowed(q, k):
        d = q + offset - k  # (L, S): how far back key j is from query i
        local = abs(d) <= stride
        strided = d % stride == 0
        keep = {"local": local, "strided": strided, "both": local | strided}[part]
        return keep & (d >= 0) if causal else keep

    return mask_from_function(allowed, L, S, like=like)


def fixed_mask(L: int, S: int | None = None, *, stride: int, c: int, part: str = "both",
               causal: bool = True, align: str = "bottom-right", like: Any = None):
    """The Sparse Transformer's *fixed* pattern with block length l and c summary cells.

    Positions are cut into blocks of l.  Query i at position p attends to

    - ``part="local"``:   ``A1 = {j : floor(j / l) = floor(p / l)}``, its own block;
    - ``part="strided"``: ``A2 = {j : j mod l >= l - c}``, the last c positions of every
      block, "summary" cells that carry a block's content to all later blocks;
    - ``part="both"``:    their union;

    and, with ``causal=True`` (the paper's setting), only keys ``j <= p``.  The paper uses
    l in {128, 256} and c in {8, 16, 32} (Child et al. 2019).

    Args:
        L, S: numbers of queries and keys (S defaults to L).
        stride: positive integer l, the block length.
        c: integer with 1 <= c <= l, summary cells per block.
        part, causal, align, like: as for :func:`strided_mask`.

    Returns:
        Boolean (L, S).  See chapter 14.
    """
    L, S, offset = _sizes(L, S, align)
    stride = _check_int("stride", stride, 1)
    c = _check_int("c", c, 1)
    if c > stride:
        raise ValueError(f"c must be at most stride = {stride}; got c = {c}")
    _check_part(part)

    def allowed(q, k):
        p = q + offset  # (L, 1) query positions; k is (1, S)
        local = (p // stride) == (k // stride)  # (L, S)
        summary = (k % stride) >= stride - c  # (1, S)
        keep = {"local": local, "strided": summary, "both": local | summary}[part]
        return keep & (k <= p) if causal else keep

    return mask_from_function(allowed, L, S, like=like)


def _namespace_of(like: Any):
    if like is None:
        return namespace(like=np.empty(0)), "cpu"
    return namespace(like=like), device_of(like)


def global_mask(L: int, S: int | None = None, *, tokens: Sequence[int],
                align: str = "bottom-right", like: Any = None):
    """Global tokens: they attend to every key and every query attends to them.

    Returns only the global part: row i is all True when query i sits at a global position,
    column j is all True when key j is global.  Add it to a local pattern with
    :func:`attnlib.masks.mask_or` (Longformer's window + global attention, Beltagy et al.
    2020; BigBird adds random blocks, Zaheer et al. 2020), and restrict it with
    :func:`attnlib.masks.mask_and` and a causal mask for a decoder.

    Args:
        L, S: numbers of queries and keys (S defaults to L).
        tokens: key positions (integers in 0 .. S - 1) of the global tokens, e.g. ``[0]``
            for a [CLS] token.
        align, like: as for :func:`dilated_window_mask`.

    Returns:
        Boolean (L, S).  See chapter 14.
    """
    L, S, offset = _sizes(L, S, align)
    positions = sorted({_check_int("every entry of tokens", t, 0) for t in tokens})
    if positions and positions[-1] >= S:
        raise ValueError(f"tokens must be key positions below S = {S}; got {positions}")
    is_global = np.zeros(S, dtype=bool)
    is_global[positions] = True
    query_pos = np.arange(L) + offset  # (L,)
    query_global = np.zeros(L, dtype=bool)
    inside = (query_pos >= 0) & (query_pos < S)
    query_global[inside] = is_global[query_pos[inside]]
    xp, device = _namespace_of(like)
    gk = xp.asarray(is_global, device=device)  # (S,)
    gq = xp.asarray(query_global, device=device)  # (L,)
    return gq[:, None] | gk[None, :]  # (L, S)


def random_block_mask(L: int, S: int | None = None, *, block_size: int, n_random: int,
                      seed: int = 0, like: Any = None):
    """Each block of queries attends to ``n_random`` key blocks drawn at random.

    BigBird's random attention (Zaheer et al. 2020), at block granularity: queries
    ``qb * block_size ..`` attend to every key of ``n_random`` distinct key blocks, drawn
    uniformly (NumPy ``default_rng(seed)``; the same seed gives the same mask).  BigBird
    draws them outside the window and global blocks; here they are drawn from all blocks,
    so they may overlap a local pattern they are or-ed with.  The last block of queries or
    keys may be shorter than ``block_size``.

    Args:
        L, S: numbers of queries and keys (S defaults to L).
        block_size: positive integer.
        n_random: non-negative integer, key blocks per query block (capped at the number
            of key blocks).
        seed: seed of the random draw.
        like: an array whose backend and device the mask should use (NumPy if None).

    Returns:
        Boolean (L, S).  See chapter 14.
    """
    L, S, _ = _sizes(L, S, "top-left")
    block_size = _check_int("block_size", block_size, 1)
    n_random = _check_int("n_random", n_random, 0)
    n_qb, n_kb = -(-L // block_size), -(-S // block_size)
    rng = np.random.default_rng(seed)
    blocks = np.zeros((n_qb, n_kb), dtype=bool)
    for qb in range(n_qb):
        blocks[qb, rng.choice(n_kb, size=min(n_random, n_kb), replace=False)] = True
    dense = np.repeat(np.repeat(blocks, block_size, axis=0), block_size, axis=1)[:L, :S]
    xp, device = _namespace_of(like)
    return xp.asarray(dense, device=device)  # (L, S)


# ---------------------------------------------------------------------------------------
# Block layouts
# ---------------------------------------------------------------------------------------


def _as_numpy_bool(mask: Any, name: str) -> np.ndarray:
    check_array(mask, name, min_ndim=2, shape_hint="(L, S)")
    xp = namespace(**{name: mask})
    if not xp.isdtype(mask.dtype, "bool"):
        raise TypeError(f"{name} must be boolean (True = may attend); got {mask.dtype} "
                        f"with shape {tuple(mask.shape)}")
    if mask.ndim != 2:
        raise ValueError(f"{name} must have shape (L, S), one pattern shared by every batch "
                         f"element and head; got shape {tuple(mask.shape)}")
    if hasattr(mask, "detach"):  # a torch tensor, possibly on a GPU
        return mask.detach().cpu().numpy()
    return np.asarray(mask)


class BlockLayout:
    """Which (block_size x block_size) tiles of an (L, S) score matrix hold any work.

    Tile (qb, kb) covers queries ``qb * block_size`` up to (not including)
    ``(qb + 1) * block_size`` and the same range of keys; the last row and column of tiles
    are shorter when L or S is not a multiple of ``block_size``.

    Attributes:
        active: (ceil(L / block_size), ceil(S / block_size)) boolean NumPy array, True for
            a tile that must be computed.
        full: same shape, True for an active tile in which **every** entry is allowed, so
            a kernel can skip applying the mask there (FlexAttention's "full blocks").
        block_size, L, S: the tile size and the score-matrix shape.

    Build one from any mask with :func:`block_layout`, or directly from a block map,
    ``BlockLayout(blocks, block_size, L, S)``: a layout given this way allows every entry
    of its active tiles (``full = active``), as in the block-sparse kernels of the Sparse
    Transformer.  See chapter 14.
    """

    def __init__(self, active: Any, block_size: int, L: int, S: int, full: Any = None):
        self.block_size = _check_int("block_size", block_size, 1)
        self.L, self.S = _check_int("L", L, 0), _check_int("S", S, 0)
        shape = (-(-self.L // self.block_size), -(-self.S // self.block_size))
        self.active = np.array(active, dtype=bool)
        if self.active.shape != shape:
            raise ValueError(f"active must have shape (ceil(L / block_size), ceil(S / "
                             f"block_size)) = {shape} for L = {L}, S = {S}, block_size = "
                             f"{block_size}; got {self.active.shape}")
        self.full = self.active.copy() if full is None else np.array(full, dtype=bool)
        if self.full.shape != shape:
            raise ValueError(f"full must have shape {shape}; got {self.full.shape}")
        if np.any(self.full & ~self.active):
            raise ValueError("full marks a tile that is not active")

    @property
    def shape(self) -> tuple[int, int]:
        """(number of query blocks, number of key blocks)."""
        return self.active.shape

    def tile_sizes(self) -> np.ndarray:
        """(n_qb, n_kb) integers: the number of score entries in each tile."""
        rows = np.minimum(self.block_size, self.L - self.block_size * np.arange(self.shape[0]))
        cols = np.minimum(self.block_size, self.S - self.block_size * np.arange(self.shape[1]))
        return rows[:, None] * cols[None, :]

    @property
    def fraction_computed(self) -> float:
        """Fraction of the L * S scores a kernel that skips inactive tiles computes."""
        total = self.L * self.S
        return float((self.tile_sizes() * self.active).sum() / total) if total else 0.0

    @property
    def tile_fraction(self) -> float:
        """Fraction of the tiles that are active."""
        return float(self.active.mean()) if self.active.size else 0.0

    def to_dense(self, like: Any = None):
        """The (L, S) boolean mask that allows every entry of every active tile."""
        b = self.block_size
        dense = np.repeat(np.repeat(self.active, b, axis=0), b, axis=1)[: self.L, : self.S]
        xp, device = _namespace_of(like)
        return xp.asarray(dense, device=device)

    def __repr__(self) -> str:
        return (f"BlockLayout(L={self.L}, S={self.S}, block_size={self.block_size}, "
                f"active tiles {int(self.active.sum())}/{self.active.size}, "
                f"full {int(self.full.sum())}, fraction computed {self.fraction_computed:.3f})")


def block_layout(mask: Any, block_size: int) -> BlockLayout:
    """The block layout of a boolean (L, S) mask: which tiles hold an allowed entry.

    Args:
        mask: boolean (L, S), NumPy or torch, True = may attend.
        block_size: positive integer, the tile edge; L and S need not be multiples of it.

    Returns:
        A :class:`BlockLayout` whose ``active`` tiles hold at least one allowed entry and
        whose ``full`` tiles hold nothing else.  See chapter 14.
    """
    block_size = _check_int("block_size", block_size, 1)
    m = _as_numpy_bool(mask, "mask")  # (L, S)
    L, S = m.shape
    n_qb, n_kb = -(-L // block_size), -(-S // block_size)
    padded = np.zeros((n_qb * block_size, n_kb * block_size), dtype=bool)
    padded[:L, :S] = m
    counts = np.count_nonzero(padded.reshape(n_qb, block_size, n_kb, block_size), axis=(1, 3))
    layout = BlockLayout(counts > 0, block_size, L, S)
    layout.full = counts == layout.tile_sizes()
    return layout


# ---------------------------------------------------------------------------------------
# Attention that computes only the active tiles
# ---------------------------------------------------------------------------------------


def _check_qkv(q: Any, k: Any, v: Any):
    xp = namespace(q=q, k=k, v=v)
    for name, x, hint in (("q", q, "(..., L, d_k)"), ("k", k, "(..., S, d_k)"),
                          ("v", v, "(..., S, d_v)")):
        check_array(x, name, min_ndim=2, shape_hint=hint)
        check_float(xp, name, x)
    same_dtype({"q": q, "k": k, "v": v})
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same last dimension d_k; got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of keys S (dimension -2); got "
                         f"k {tuple(k.shape)} and v {tuple(v.shape)}")
    batch = broadcast_shapes({"q": tuple(q.shape[:-2]), "k": tuple(k.shape[:-2]),
                              "v": tuple(v.shape[:-2])},
                             "the leading (batch, head) dimensions of q, k and v")
    return xp, batch


def _key_rows(kbs: np.ndarray, block_size: int, S: int):
    """Key indices covered by key blocks ``kbs``, and a slice when they are contiguous."""
    idx = np.concatenate([np.arange(kb * block_size, min(S, (kb + 1) * block_size))
                          for kb in kbs])
    contiguous = idx[-1] - idx[0] + 1 == idx.size
    return idx, (slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else None)


def _resolve_pattern(xp, q, pattern, block_size, layout, L, S, causal):
    """(layout, mask or None) for block_sparse_attention; the mask includes causality."""
    if isinstance(pattern, BlockLayout):
        if layout is not None:
            raise ValueError("pass a BlockLayout either as pattern or as layout, not both")
        if block_size is not None and block_size != pattern.block_size:
            raise ValueError(f"block_size = {block_size!r} disagrees with the layout's "
                             f"block_size = {pattern.block_size}")
        if (pattern.L, pattern.S) != (L, S):
            raise ValueError(f"the layout is for (L, S) = ({pattern.L}, {pattern.S}); q and "
                             f"k give (L, S) = ({L}, {S})")
        if causal:  # drop the tiles that lie entirely in the future
            future = block_layout(causal_mask(L, S), pattern.block_size).active
            return BlockLayout(pattern.active & future, pattern.block_size, L, S), None
        return pattern, None
    if layout is not None:
        block_size = layout.block_size if block_size is None else block_size
    if block_size is None:
        raise ValueError("block_size is required when pattern is a mask or None")
    block_size = _check_int("block_size", block_size, 1)
    if pattern is None:
        mask = causal_mask(L, S, like=q) if causal else None
        dense = causal_mask(L, S) if causal else np.ones((L, S), dtype=bool)
        return block_layout(dense, block_size), mask
    namespace(q=q, mask=pattern)  # same backend and device
    check_array(pattern, "mask", min_ndim=2, shape_hint="(L, S)")
    if tuple(pattern.shape) != (L, S):
        raise ValueError(f"mask must have shape (L, S) = ({L}, {S}); got "
                         f"{tuple(pattern.shape)}")
    if not xp.isdtype(pattern.dtype, "bool"):
        raise TypeError(f"mask must be boolean (True = may attend); got {pattern.dtype}")
    mask = xp.logical_and(pattern, causal_mask(L, S, like=q)) if causal else pattern
    if layout is None:
        return block_layout(mask, block_size), mask
    if (layout.block_size, layout.L, layout.S) != (block_size, L, S):
        raise ValueError(f"layout is for block_size {layout.block_size} and (L, S) = "
                         f"({layout.L}, {layout.S}); got block_size {block_size} and "
                         f"(L, S) = ({L}, {S})")
    return layout, mask


def block_sparse_attention(q: Any, k: Any, v: Any, pattern: Any = None,
                           block_size: int | None = None, *, causal: bool = False,
                           scale: float | None = None,
                           layout: BlockLayout | None = None) -> Any:
    """Scaled dot-product attention that computes only the active tiles of the scores.

    For each block of queries it gathers the keys and values of the active key blocks,
    runs ordinary masked attention on that narrow slice (scores, the part of the mask
    that falls inside it, skipped when every active tile of the row is a
    :class:`BlockLayout` ``full`` tile, softmax, weighted sum) and writes the result.
    Inactive tiles are never computed, so the work is proportional to
    ``layout.fraction_computed``, not to L * S.  Because a skipped tile holds only masked
    scores, whose softmax weights are exactly zero, the result **equals** dense masked
    attention, ``scaled_dot_product_attention(q, k, v, mask, causal=causal)``.

    Args:
        q: queries, (..., L, d_k).
        k: keys, (..., S, d_k).
        v: values, (..., S, d_v).  Leading dimensions broadcast, as in attnlib's SDPA.
        pattern: one of
            - a boolean mask (L, S), True = may attend, shared by every batch element and
              head, in the backend of q (e.g. from :func:`sliding_window_mask`);
            - a :class:`BlockLayout`: every entry of its active tiles is allowed (compare
              with dense attention using ``layout.to_dense()``);
            - None: no mask (with ``causal=True``, causal attention by tiles).
        block_size: tile edge, required for a mask or None (L and S need not be multiples
            of it); with a layout, None or the layout's own.
        causal: and the pattern with the bottom-right causal mask (attnlib's convention:
            query i sees keys 0 .. S - L + i); tiles entirely in the future are skipped.
        scale: multiplies the scores; default 1/sqrt(d_k).
        layout: optional, with a mask only: ``block_layout(mask & causal, block_size)``
            computed in advance, to reuse it across calls (layers, heads, steps) as
            FlexAttention reuses its block mask.  It is trusted, not recomputed: a tile
            it marks inactive is skipped even if the mask allows entries there.

    Returns:
        (..., L, d_v), backend, device and dtype of q.  A query with no allowed key gets
        zeros, as in attnlib's SDPA.  See chapter 14.
    """
    xp, batch = _check_qkv(q, k, v)
    L, S, d_v = q.shape[-2], k.shape[-2], v.shape[-1]
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite real number; got {scale!r}")
    layout, mask = _resolve_pattern(xp, q, pattern, block_size, layout, L, S, causal)
    b, offset, device = layout.block_size, S - L, device_of(q)
    neg_inf = xp.asarray(-math.inf, dtype=q.dtype, device=device)
    outs = []
    for qb in range(layout.shape[0]):
        r0, r1 = qb * b, min(L, (qb + 1) * b)
        kbs = np.flatnonzero(layout.active[qb])
        if kbs.size == 0:  # nothing to attend to: zeros, like a fully masked row
            outs.append(xp.zeros((*batch, r1 - r0, d_v), dtype=q.dtype, device=device))
            continue
        idx, window = _key_rows(kbs, b, S)
        idx_x = xp.asarray(idx, device=device)
        if window is not None:  # contiguous key blocks: a view, no copy
            k_sel, v_sel = k[..., window, :], v[..., window, :]  # (..., n_sel, d_k), (..., n_sel, d_v)
        else:  # scattered key blocks: gather them
            k_sel, v_sel = xp.take(k, idx_x, axis=-2), xp.take(v, idx_x, axis=-2)
        sub = None  # the mask inside the gathered tiles, (rows, n_sel)
        if mask is not None and not layout.full[qb, kbs].all():
            rows = mask[r0:r1]  # (rows, S)
            sub = rows[:, window] if window is not None else xp.take(rows, idx_x, axis=-1)
        if causal and mask is None and idx[-1] > r0 + offset:  # a layout: causal by hand
            pos = xp.asarray(np.arange(r0, r1) + offset, device=device)  # (rows,)
            sub = idx_x[None, :] <= pos[:, None]  # (rows, n_sel)
        scores = (q[..., r0:r1, :] @ xp.matrix_transpose(k_sel)) * scale  # (..., rows, n_sel)
        if sub is not None:
            scores = xp.where(sub, scores, neg_inf)
        outs.append(softmax(scores, axis=-1) @ v_sel)  # (..., rows, d_v)
    if not outs:  # L = 0
        return xp.zeros((*batch, 0, d_v), dtype=q.dtype, device=device)
    return xp.concat([xp.broadcast_to(o, (*batch, *o.shape[-2:])) for o in outs], axis=-2)
