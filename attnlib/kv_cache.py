"""The KV cache for incremental decoding, and what it costs in memory (chapters 11-13).

A decoder generates one token at a time.  With a causal mask, the keys and values of
the positions already processed never change when a new token arrives, so they are
computed once and kept: the **KV cache**.  Each decoding step then projects only the
new token, appends its key and value to the cache, and lets its query attend to every
cached key (a query of length L = 1 against S keys, **bottom-right** aligned: the new
query is the last of the S positions; chapters 8 and 11).

:class:`KVCache` holds one attention layer's keys (..., S, d_k) and values (..., S, d_v),
usually (B, H_kv, S, d); a model keeps one per layer.  It works for NumPy arrays and
torch tensors alike (the first ``append`` decides the backend, device and dtype).

The memory helpers count what such a cache costs per token, for every kind of layer
the book covers::

    MHA   2 * H   * d_h      elements per token and layer   (chapter 11)
    GQA   2 * H_kv * d_h     (1 < H_kv < H)                 (chapter 12)
    MQA   2 * d_h            (H_kv = 1)                     (chapter 12)
    MLA   d_c + d_h^R        (latent + shared RoPE key)     (chapter 13)

times the number of layers and the bytes per element (2 for float16/bfloat16).
:data:`PUBLISHED_CONFIGS` holds the attention shapes of a few published models.

For long contexts (the end of chapter 11) two things bound the cache.
:class:`SlidingWindowKVCache` keeps a fixed number of positions, the first ``n_sink``
("attention sinks", StreamingLLM, Xiao et al. 2023) and the last ``window``, in a ring
buffer; :func:`attention_sink_mask` is the mask of the same attention over a whole
sequence.  :func:`quantize_int8` stores keys and values in 8 bits with one scale per
channel or per token (:class:`Int8Tensor`), dequantised before attention.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import check_array, check_float, device_of, namespace
from .masks import causal_mask, mask_and, mask_or, sliding_window_mask

__all__ = [
    "PUBLISHED_CONFIGS",
    "CacheConfig",
    "Int8Tensor",
    "KVCache",
    "SlidingWindowKVCache",
    "attention_sink_mask",
    "kv_cache_bytes",
    "kv_cache_bytes_per_token",
    "kv_cache_elements_per_token",
    "mla_cache_elements_per_token",
    "quantize_int8",
]


def _check_int(name: str, n: Any, minimum: int) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {n!r}")
    return int(n)


def _check_new_kv(k: Any, v: Any, held_k: Any, held_v: Any):
    """Check new keys (..., L, d_k) and values (..., L, d_v) against each other and
    against the buffers a cache already holds (None before its first append)."""
    check_array(k, "k", min_ndim=2, shape_hint="(..., L, d_k)")
    check_array(v, "v", min_ndim=2, shape_hint="(..., L, d_v)")
    like = {} if held_k is None else {"cache": held_k}
    xp = namespace(k=k, v=v, **like)
    for name, x in (("k", k), ("v", v)):
        if not xp.isdtype(x.dtype, "real floating"):
            raise TypeError(f"{name} must have a floating dtype; got {x.dtype}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must share one dtype; got k {k.dtype} and v {v.dtype}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"k and v must agree on every dimension but the last, (..., L); got k "
            f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if held_k is not None:
        want_k = (*held_k.shape[:-2], "L", held_k.shape[-1])
        want_v = (*held_v.shape[:-2], "L", held_v.shape[-1])
        if k.shape[:-2] != held_k.shape[:-2] or k.shape[-1] != held_k.shape[-1] \
                or v.shape[-1] != held_v.shape[-1]:
            raise ValueError(
                f"this cache holds keys of shape {want_k} and values {want_v}; got k "
                f"{tuple(k.shape)} and v {tuple(v.shape)}")
        if k.dtype != held_k.dtype:
            raise TypeError(f"this cache holds {held_k.dtype}; got k and v of "
                            f"dtype {k.dtype}")
    return xp


# ------------------------------------------------------------------------------ the cache
class _KVBuffers:
    """What both caches share: key and value buffers, of which the first ``_filled``
    slots hold positions, and views and byte counts of that filled part."""

    _k = _v = None  # (..., allocated, d_k) and (..., allocated, d_v) buffers

    @property
    def _filled(self) -> int:
        raise NotImplementedError

    @property
    def allocated(self) -> int:
        """Slots the buffers have room for (0 before the first append)."""
        return 0 if self._k is None else self._k.shape[-2]

    @property
    def keys(self):
        """The cached keys (..., filled, d_k), a view; ``None`` before the first append."""
        return None if self._k is None else self._k[..., : self._filled, :]

    @property
    def values(self):
        """The cached values (..., filled, d_v), a view; ``None`` before the first append."""
        return None if self._v is None else self._v[..., : self._filled, :]

    @property
    def nbytes(self) -> int:
        """Bytes of the keys and values held (the filled part, not the allocation)."""
        if self._k is None:
            return 0
        item = self._k.dtype.itemsize
        per_position = math.prod(self._k.shape[:-2]) * (self._k.shape[-1] + self._v.shape[-1])
        return per_position * self._filled * item


class KVCache(_KVBuffers):
    """One layer's cache of keys and values, for incremental (token-by-token) decoding.

    Args:
        capacity: the most positions it may hold.  An int preallocates buffers of that
            length on the first :meth:`append` (as serving systems do: no copy ever,
            and a clear error when full).  ``None`` (default) grows without limit: the
            buffers double when full, so appending n tokens one by one copies O(n)
            elements in all.

    Each :meth:`append(k, v) <append>` takes the keys (..., L, d_k) and values
    (..., L, d_v) of L new positions, usually (B, H_kv, L, d), and returns the keys
    (..., S, d_k) and values (..., S, d_v) of **all** S positions so far, ready for
    attention with a bottom-right causal mask.  The leading dimensions, d_k, d_v, dtype,
    backend and device are fixed by the first append.

    The returned arrays are views of the cache's buffers (no copy).  Decoding is
    inference: with torch, run it under ``torch.no_grad()``.  See chapter 11.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self.capacity = None if capacity is None else _check_int("capacity", capacity, 1)
        self._k = None  # (..., allocated, d_k) buffer
        self._v = None  # (..., allocated, d_v) buffer
        self._length = 0

    # -- state -------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """S, the number of positions held."""
        return self._length

    def __len__(self) -> int:
        return self._length

    @property
    def _filled(self) -> int:
        return self._length

    # -- changes -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every position (length 0), keeping the buffers for the next sequence."""
        self._length = 0

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` positions (e.g. to retry from a shorter prefix)."""
        length = _check_int("length", length, 0)
        if length > self._length:
            raise ValueError(f"cannot crop to length = {length}: the cache holds only "
                             f"{self._length} positions")
        self._length = length

    def append(self, k: Any, v: Any):
        """Append L new positions and return the keys and values of all S so far.

        Args:
            k: keys of the new positions, (..., L, d_k), e.g. (B, H_kv, L, d_k).
            v: values of the new positions, (..., L, d_v).

        Returns:
            ``(keys, values)``, (..., S, d_k) and (..., S, d_v) with S = old length + L.

        Raises:
            ValueError: the cache would exceed its ``capacity``, or k and v do not match
                each other or what was appended before.
            TypeError: not arrays, not floating, or another backend, device or dtype.
        """
        xp = self._check_new(k, v)
        L = k.shape[-2]
        start, stop = self._length, self._length + L
        if self.capacity is not None and stop > self.capacity:
            raise ValueError(
                f"KVCache is full: capacity = {self.capacity} positions, it holds "
                f"{self._length}, and append got L = {L} more (k of shape "
                f"{tuple(k.shape)}); make the cache larger or crop/reset it")
        self._reserve(xp, k, v, stop)
        self._k[..., start:stop, :] = k
        self._v[..., start:stop, :] = v
        self._length = stop
        return self.keys, self.values  # (..., S, d_k), (..., S, d_v)

    # -- helpers -----------------------------------------------------------------------
    def _check_new(self, k: Any, v: Any):
        return _check_new_kv(k, v, self._k, self._v)

    def _reserve(self, xp, k: Any, v: Any, needed: int) -> None:
        """Make the buffers hold at least ``needed`` positions."""
        if self.allocated >= needed:
            return
        if self.capacity is not None:
            size = self.capacity
        else:  # grow geometrically: amortised O(1) copying per appended position
            size = max(needed, 2 * self.allocated, 16)
        lead, device = k.shape[:-2], device_of(k)
        new_k = xp.zeros((*lead, size, k.shape[-1]), dtype=k.dtype, device=device)
        new_v = xp.zeros((*lead, size, v.shape[-1]), dtype=v.dtype, device=device)
        if self._k is not None and self._length:
            new_k[..., : self._length, :] = self._k[..., : self._length, :]
            new_v[..., : self._length, :] = self._v[..., : self._length, :]
        self._k, self._v = new_k, new_v

    def __repr__(self) -> str:
        shape = "empty" if self._k is None else \
            f"keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}"
        cap = "growing" if self.capacity is None else f"capacity={self.capacity}"
        return f"KVCache({cap}, length={self._length}, {shape})"


# ------------------------------------------------------- a fixed-size cache (long contexts)
def attention_sink_mask(L: int, S: int | None = None, *, window: int, n_sink: int = 0,
                        like: Any = None):
    """The mask of sliding-window attention with attention sinks, (L, S), bottom-right.

    Query i sits at key position ``p = S - L + i`` (the L queries are the last L of the
    S positions, as when decoding).  It may attend to key j when ``j <= p`` and

    - ``j < n_sink`` (one of the first tokens, kept for ever: the "attention sinks"
      of StreamingLLM), or
    - ``p - window < j`` (one of the last ``window`` positions, itself included).

    Example, L = S = 7, n_sink = 2, window = 3::

        1 . . . . . .
        1 1 . . . . .
        1 1 1 . . . .
        1 1 1 1 . . .
        1 1 1 1 1 . .
        1 1 . 1 1 1 .
        1 1 . . 1 1 1

    ``n_sink = 0`` is plain sliding-window attention (Mistral's), ``window`` counting the
    query itself: ``sliding_window_mask(L, S, window=window - 1)``.  This is the mask
    that decoding through a :class:`SlidingWindowKVCache` computes, one row at a time.

    Args:
        L, S: numbers of queries and keys (S defaults to L).
        window: W >= 1, the recent positions each query sees (itself included).
        n_sink: the number of first positions every query sees.
        like: an array whose backend and device the mask should use.
    """
    window = _check_int("window", window, 1)
    n_sink = _check_int("n_sink", n_sink, 0)
    S = L if S is None else S
    recent = sliding_window_mask(L, S, window=window - 1, like=like)  # (L, S)
    xp = namespace(mask=recent)
    j = xp.arange(S, device=device_of(recent))[None, :]  # (1, S) key positions
    sinks = mask_and(causal_mask(L, S, like=like), j < n_sink)  # (L, S)
    return mask_or(sinks, recent)


class SlidingWindowKVCache(_KVBuffers):
    """A KV cache of fixed size: the first ``n_sink`` positions and the last ``window``.

    Args:
        window: W >= 1, the most recent positions kept (the newest included).
        n_sink: the first positions kept for ever (StreamingLLM's attention sinks;
            4 in the paper).  0 gives a plain rolling cache for sliding-window attention.

    The buffers hold ``n_sink + window`` slots, allocated on the first :meth:`append`
    and never again: memory stays constant however many tokens are decoded.  Position p
    is written to slot ``p`` while the cache fills, and then, for p >= n_sink, to slot
    ``n_sink + (p - n_sink) % window``, overwriting the oldest recent position in place
    (a ring buffer; nothing is copied or shifted).  The sink slots are never overwritten::

        n_sink = 2, window = 3, after position 6:   slot  0  1  2  3  4
                                                 position  0  1  5  6  4

    :meth:`append(k, v) <append>` returns the keys and values of every slot held, in
    slot order, not position order: attention is a sum over keys, so the order does not
    matter, and the new query (L = 1) attends to all of them.  Decoding token by token
    through this cache equals attention over the whole sequence with
    :func:`attention_sink_mask`.

    Positions.  :attr:`length` counts every token appended, so a model that rotates keys
    with RoPE *before* caching them (as ``GroupedQueryAttention`` does, at position
    ``cache.length``) uses each token's original position, and the equality above holds
    with RoPE too.  StreamingLLM instead numbers positions *within the cache*
    (:attr:`cache_positions`: sinks 0 .. n_sink - 1, then the recent tokens in order),
    so that no distance exceeds what the model saw in training; for that it caches keys
    before the rotation and rotates the cached keys anew at each step.

    A chunk of L > 1 positions (a prompt) may be appended only while it fits without
    overwriting (then the causal mask is the right one for its queries); after that,
    append one position per step.  See chapter 11.
    """

    def __init__(self, window: int, n_sink: int = 0) -> None:
        self.window = _check_int("window", window, 1)
        self.n_sink = _check_int("n_sink", n_sink, 0)
        self.capacity = self.n_sink + self.window  # slots
        self._k = None  # (..., capacity, d_k) buffer
        self._v = None  # (..., capacity, d_v) buffer
        self._seen = 0
        self._positions = np.full(self.capacity, -1, dtype=np.int64)  # position per slot

    # -- state -------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """The number of positions appended so far (the position of the next one)."""
        return self._seen

    @property
    def held(self) -> int:
        """The number of slots filled: ``min(length, n_sink + window)``."""
        return min(self._seen, self.capacity)

    @property
    def _filled(self) -> int:  # keys and values come in slot order, not position order
        return self.held

    @property
    def positions(self) -> np.ndarray:
        """The original position of the token in each held slot, (held,) int64."""
        return self._positions[: self.held].copy()

    @property
    def cache_positions(self) -> np.ndarray:
        """StreamingLLM's positions within the cache, (held,): each slot's rank by position.

        The sinks get 0 .. n_sink - 1 and the recent tokens n_sink, n_sink + 1, ... in the
        order they came, so the newest token sits at ``held - 1``.
        """
        return np.argsort(np.argsort(self.positions))


    def slot(self, position: int) -> int:
        """The slot that holds (or will hold) a given position."""
        position = _check_int("position", position, 0)
        if position < self.capacity:
            return position
        return self.n_sink + (position - self.n_sink) % self.window

    # -- changes -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every position, keeping the buffers for the next sequence."""
        self._seen = 0
        self._positions[:] = -1

    def append(self, k: Any, v: Any):
        """Append L new positions and return the keys and values of every slot held.

        Args:
            k: keys (..., L, d_k) of the new positions, e.g. (B, H_kv, L, d_k).
            v: values (..., L, d_v).

        Returns:
            ``(keys, values)``, (..., held, d_k) and (..., held, d_v), views of the buffers
            in slot order.

        Raises:
            ValueError: L > 1 positions that would overwrite a slot (append them one at
                a time), or k and v that do not match each other or the cache.
            TypeError: not arrays, not floating, or another backend, device or dtype.
        """
        xp = _check_new_kv(k, v, self._k, self._v)
        L, start = k.shape[-2], self._seen
        if L > 1 and start + L > self.capacity:
            raise ValueError(
                f"SlidingWindowKVCache(window={self.window}, n_sink={self.n_sink}) holds "
                f"{self.capacity} slots and has {start} positions; a chunk of L = {L} "
                f"(k of shape {tuple(k.shape)}) would overwrite slots that its own first "
                f"queries need. Append at most {max(self.capacity - start, 1)} positions "
                f"now, and one position per step once the cache is full")
        if self._k is None:
            lead, device = k.shape[:-2], device_of(k)
            self._k = xp.zeros((*lead, self.capacity, k.shape[-1]), dtype=k.dtype, device=device)
            self._v = xp.zeros((*lead, self.capacity, v.shape[-1]), dtype=v.dtype, device=device)
        if L:
            s = self.slot(start)  # L > 1 only while filling: slots start .. start + L - 1
            self._k[..., s : s + L, :] = k  # in place: overwrites the oldest recent slot
            self._v[..., s : s + L, :] = v
            self._positions[s : s + L] = np.arange(start, start + L)
            self._seen = start + L
        return self.keys, self.values  # (..., held, d_k), (..., held, d_v)

    def __repr__(self) -> str:
        shape = "empty" if self._k is None else \
            f"keys {tuple(self.keys.shape)}, values {tuple(self.values.shape)}"
        return (f"SlidingWindowKVCache(window={self.window}, n_sink={self.n_sink}, "
                f"length={self._seen}, held={self.held}, {shape})")


# ------------------------------------------------------------------- memory per token
def kv_cache_elements_per_token(n_kv_heads: int, head_dim: int,
                                v_head_dim: int | None = None) -> int:
    """Elements cached per token **and per layer** by MHA, GQA or MQA.

    ``n_kv_heads * (d_k + d_v)``: one key and one value per key/value head.  With
    ``d_v = d_k = d_h`` this is ``2 * H_kv * d_h``: MHA has H_kv = H, MQA H_kv = 1 and
    GQA anything between (chapters 11 and 12).

    Args:
        n_kv_heads: H_kv.
        head_dim: d_k, the key width of a head.
        v_head_dim: d_v (default ``head_dim``).
    """
    n_kv_heads = _check_int("n_kv_heads", n_kv_heads, 1)
    d_k = _check_int("head_dim", head_dim, 1)
    d_v = d_k if v_head_dim is None else _check_int("v_head_dim", v_head_dim, 1)
    return n_kv_heads * (d_k + d_v)


def mla_cache_elements_per_token(kv_lora_rank: int, rope_head_dim: int) -> int:
    """Elements cached per token **and per layer** by multi-head latent attention (MLA).

    MLA (DeepSeek-V2) caches one compressed latent c^KV of width d_c
    (``kv_lora_rank``), from which every head's keys and values are rebuilt, and one
    RoPE key of width d_h^R (``rope_head_dim``) shared by all heads: ``d_c + d_h^R``
    elements, whatever the number of heads.  DeepSeek-V2: 512 + 64 = 576, against
    2 * 128 * 128 = 32,768 for multi-head attention with its 128 heads of width 128.
    Chapter 13 builds MLA.
    """
    d_c = _check_int("kv_lora_rank", kv_lora_rank, 1)
    d_r = _check_int("rope_head_dim", rope_head_dim, 0)
    return d_c + d_r


def kv_cache_bytes_per_token(*, n_layers: int, n_kv_heads: int | None = None,
                             head_dim: int | None = None, v_head_dim: int | None = None,
                             kv_lora_rank: int | None = None,
                             rope_head_dim: int | None = None,
                             bytes_per_element: float = 2) -> float:
    """Bytes of KV cache one token costs in a whole model (all layers).

    Either MHA/GQA/MQA (give ``n_kv_heads`` and ``head_dim``, optionally
    ``v_head_dim``)::

        n_layers * n_kv_heads * (d_k + d_v) * bytes_per_element
        = 2 * n_layers * H_kv * d_h * bytes          (d_k = d_v = d_h)

    or MLA (give ``kv_lora_rank`` d_c and ``rope_head_dim`` d_h^R)::

        n_layers * (d_c + d_h^R) * bytes_per_element

    Args:
        n_layers: number of attention layers.
        bytes_per_element: 2 for float16/bfloat16 (the default), 4 for float32, 1 for
            8-bit caches.

    Returns:
        Bytes per token (a float if ``bytes_per_element`` is).  Multiply by the batch
        size and the number of tokens for a whole cache (:func:`kv_cache_bytes`).
    """
    n_layers = _check_int("n_layers", n_layers, 1)
    if isinstance(bytes_per_element, bool) or not isinstance(bytes_per_element, numbers.Real) \
            or not bytes_per_element > 0:
        raise ValueError(f"bytes_per_element must be a positive number; got "
                         f"{bytes_per_element!r}")
    mla = kv_lora_rank is not None or rope_head_dim is not None
    heads = n_kv_heads is not None or head_dim is not None or v_head_dim is not None
    if mla == heads:
        raise ValueError(
            "give either n_kv_heads and head_dim (MHA, GQA, MQA) or kv_lora_rank and "
            f"rope_head_dim (MLA); got n_kv_heads={n_kv_heads}, head_dim={head_dim}, "
            f"v_head_dim={v_head_dim}, kv_lora_rank={kv_lora_rank}, "
            f"rope_head_dim={rope_head_dim}")
    if mla:
        if kv_lora_rank is None or rope_head_dim is None:
            raise ValueError(f"MLA needs both kv_lora_rank and rope_head_dim; got "
                             f"kv_lora_rank={kv_lora_rank}, rope_head_dim={rope_head_dim}")
        per_layer = mla_cache_elements_per_token(kv_lora_rank, rope_head_dim)
    else:
        if n_kv_heads is None or head_dim is None:
            raise ValueError(f"MHA/GQA/MQA need both n_kv_heads and head_dim; got "
                             f"n_kv_heads={n_kv_heads}, head_dim={head_dim}")
        per_layer = kv_cache_elements_per_token(n_kv_heads, head_dim, v_head_dim)
    return n_layers * per_layer * bytes_per_element


@dataclass(frozen=True)
class CacheConfig:
    """The attention shape of a model, as far as its KV cache is concerned.

    Attributes:
        name: a label for tables.
        n_layers: number of attention layers.
        n_heads: H, query heads per layer.
        head_dim: d_h, the width of a query/key head (and of a value head unless
            ``v_head_dim`` is given).
        n_kv_heads: H_kv (default H, i.e. MHA; 1 is MQA).  Ignored for MLA.
        v_head_dim: d_v when it differs from d_h.
        kv_lora_rank: d_c, MLA's latent width; set it (with ``rope_head_dim``) for MLA.
        rope_head_dim: d_h^R, the width of MLA's shared RoPE key.
        d_model: the model width (for reference; not used by the cache size).
        source: a citation key or note saying where the numbers come from.
    """

    name: str
    n_layers: int
    n_heads: int
    head_dim: int
    n_kv_heads: int | None = None
    v_head_dim: int | None = None
    kv_lora_rank: int | None = None
    rope_head_dim: int | None = None
    d_model: int | None = None
    source: str = ""

    @property
    def kind(self) -> str:
        """``"MLA"``, ``"MHA"`` (H_kv = H), ``"MQA"`` (H_kv = 1) or ``"GQA"``."""
        if self.kv_lora_rank is not None:
            return "MLA"
        h_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        return "MHA" if h_kv == self.n_heads else "MQA" if h_kv == 1 else "GQA"

    def elements_per_token_per_layer(self) -> int:
        """Cached elements per token and layer (see the module docstring)."""
        if self.kind == "MLA":
            return mla_cache_elements_per_token(self.kv_lora_rank, self.rope_head_dim or 0)
        h_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        return kv_cache_elements_per_token(h_kv, self.head_dim, self.v_head_dim)

    def bytes_per_token(self, bytes_per_element: float = 2) -> float:
        """Bytes of KV cache per token over all layers (2 bytes per element default)."""
        if self.kind == "MLA":
            return kv_cache_bytes_per_token(n_layers=self.n_layers,
                                            kv_lora_rank=self.kv_lora_rank,
                                            rope_head_dim=self.rope_head_dim or 0,
                                            bytes_per_element=bytes_per_element)
        h_kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        return kv_cache_bytes_per_token(n_layers=self.n_layers, n_kv_heads=h_kv,
                                        head_dim=self.head_dim, v_head_dim=self.v_head_dim,
                                        bytes_per_element=bytes_per_element)


def kv_cache_bytes(config: CacheConfig, n_tokens: int, batch_size: int = 1, *,
                   bytes_per_element: float = 2) -> float:
    """Bytes of a whole KV cache: ``batch_size * n_tokens * bytes per token``."""
    if not isinstance(config, CacheConfig):
        raise TypeError(f"config must be a CacheConfig; got {type(config).__name__}")
    n_tokens = _check_int("n_tokens", n_tokens, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    return batch_size * n_tokens * config.bytes_per_token(bytes_per_element)


#: Attention shapes of published models (from their papers and released configuration
#: files).  ``"DeepSeek-V2 as MHA"`` is the comparison the DeepSeek-V2 paper makes:
#: the same 128 heads of width 128, with ordinary keys and values cached.
PUBLISHED_CONFIGS: dict[str, CacheConfig] = {c.name: c for c in [
    CacheConfig("Llama-2-7B", n_layers=32, n_heads=32, head_dim=128, n_kv_heads=32,
                d_model=4096, source="touvron2023llama2"),
    CacheConfig("Llama-2-70B", n_layers=80, n_heads=64, head_dim=128, n_kv_heads=8,
                d_model=8192, source="touvron2023llama2"),
    CacheConfig("Mistral-7B", n_layers=32, n_heads=32, head_dim=128, n_kv_heads=8,
                d_model=4096, source="jiang2023mistral"),
    CacheConfig("Falcon-7B", n_layers=32, n_heads=71, head_dim=64, n_kv_heads=1,
                d_model=4544, source="almazrouei2023falcon"),
    CacheConfig("DeepSeek-V2", n_layers=60, n_heads=128, head_dim=128,
                kv_lora_rank=512, rope_head_dim=64, d_model=5120,
                source="deepseekai2024deepseekv2"),
    CacheConfig("DeepSeek-V2 as MHA", n_layers=60, n_heads=128, head_dim=128,
                n_kv_heads=128, d_model=5120, source="deepseekai2024deepseekv2"),
]}


# ------------------------------------------------------------------- an 8-bit cache
_GRANULARITIES = ("channel", "token")


@dataclass(frozen=True)
class Int8Tensor:
    """Keys or values stored in 8 bits: ``x ~ data * scale`` (symmetric, absmax).

    Attributes:
        data: int8 (..., S, d), the rounded ``x / scale``, in [-127, 127].
        scale: the float scales, (..., 1, d) for ``granularity="channel"`` (one per
            channel, shared by all S tokens) or (..., S, 1) for ``"token"`` (one per
            token, shared by its d channels); the dtype of the quantised array.
        granularity: ``"channel"`` or ``"token"``.
    """

    data: Any
    scale: Any
    granularity: str

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape (..., S, d) of the quantised array."""
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored: one per element of ``data`` plus the scales."""
        return math.prod(self.data.shape) + math.prod(self.scale.shape) * self.scale.dtype.itemsize

    def dequantize(self):
        """``data * scale`` (..., S, d) in the scales' dtype: what attention then uses."""
        xp = namespace(data=self.data, scale=self.scale)
        return xp.astype(self.data, self.scale.dtype) * self.scale


def quantize_int8(x: Any, granularity: str) -> Int8Tensor:
    """Quantise keys or values (..., S, d) to int8 with absmax scales.

    Each group of numbers that shares a scale c = max|x| / 127 over the group is stored
    as ``round(x / c)``, an integer in [-127, 127] (symmetric: no zero point).  The
    rounding error of every number is at most c / 2, so a group with one large entry
    (an outlier) loses the precision of all its small ones.  The groups:

    - ``"channel"``: one scale per channel (the last axis), over all S tokens;
    - ``"token"``: one scale per token (the axis S), over its d channels.

    Keys of trained models have a few channels much larger than the rest, which is why
    KIVI (Liu et al. 2024) quantises keys per channel and values per token; chapter 11
    measures the difference.  A channel's scale covers the tokens quantised together, so
    a cache that grows must fix it per block of tokens (KIVI's groups); this function
    quantises the array it is given.

    Args:
        x: (..., S, d) float array, NumPy or torch, every entry finite, S, d >= 1.
        granularity: ``"channel"`` or ``"token"``.

    Returns:
        An :class:`Int8Tensor`; ``.dequantize()`` gives the approximation of x.
    """
    check_array(x, "x", min_ndim=2, shape_hint="(..., S, d)")
    xp = namespace(x=x)
    check_float(xp, "x", x)
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}; got {granularity!r}")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have at least one token and one channel, shape "
                         f"(..., S, d) with S, d >= 1; got shape {tuple(x.shape)}")
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"x (shape {tuple(x.shape)}) has NaN or infinite entries: no "
                         f"absmax scale can represent them")
    axis = -2 if granularity == "channel" else -1  # the axis the scale is shared along
    scale = xp.max(xp.abs(x), axis=axis, keepdims=True) / 127  # (..., 1, d) or (..., S, 1)
    safe = xp.where(scale > 0, scale, xp.ones_like(scale))  # an all-zero group stores 0
    data = xp.astype(xp.clip(xp.round(x / safe), -127, 127), xp.int8)  # (..., S, d)
    return Int8Tensor(data, scale, granularity)
