"""PagedAttention: a KV cache in fixed-size blocks, with block tables (chapter 17).

Chapter 11's :class:`~attnlib.kv_cache.KVCache` keeps each sequence's keys and values in
one contiguous buffer.  A server that decodes many sequences at once must then reserve,
for every request, room for the longest answer it *might* give, and most of that room
stays empty.  PagedAttention (Kwon et al. 2023, the vLLM paper) stores the cache the way
an operating system stores a process's memory: in fixed-size **blocks** (pages) of
``block_size`` token positions, taken from one shared pool, with a per-sequence **block
table** mapping logical block ``j`` (positions ``j*block_size ... (j+1)*block_size - 1``)
to a physical block of the pool::

    sequence A, 10 tokens     block table [3, 0, 5]     pool  0 [A A A A]
    (block_size = 4)          logical 0 -> physical 3         1 [B B B .]
                              logical 1 -> physical 0         2 [ free  ]
                              logical 2 -> physical 5         3 [A A A A]
                                                              4 [ free  ]
    sequence B, 3 tokens      block table [1]                 5 [A A . .]

Only the last block of a sequence can be partly empty, so at most ``block_size - 1``
slots per sequence are wasted.  Blocks have **reference counts**, so several sequences
can share blocks: :meth:`PagedKVCache.fork` gives a child sequence the parent's blocks
(a prompt shared by parallel samples), and the first write into a shared, partly filled
block copies it (**copy-on-write**).

This module holds

- :class:`BlockAllocator`: the free list and reference counts of a pool of blocks;
- :class:`PagedKVCache`: the pool of key and value blocks, (num_blocks, block_size,
  H_kv, d), and the block tables; ``append``, ``fork``, ``free``, ``gather``;
- :func:`paged_decode_attention`: one decoding step of attention for a batch of
  sequences, by gathering each sequence's blocks through its block table (NumPy or torch;
  the Triton kernel is in :mod:`attnlib.kernels.paged_triton`);
- :func:`make_serving_trace` and :func:`simulate_kv_memory`: a small simulated serving
  trace that measures how much KV-cache memory contiguous reservation and paging waste.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._backend import check_array, check_float, default_scale, device_of, namespace
from .sdpa import scaled_dot_product_attention

__all__ = [
    "BlockAllocator",
    "KVMemoryTimeline",
    "OutOfBlocksError",
    "PagedKVCache",
    "ServingRequest",
    "make_serving_trace",
    "paged_decode_attention",
    "simulate_kv_memory",
]


def _check_int(name: str, n: Any, minimum: int) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {n!r}")
    return int(n)


# ------------------------------------------------------------------------ the allocator
class OutOfBlocksError(RuntimeError):
    """Raised when the pool has fewer free blocks than a request needs."""


class BlockAllocator:
    """Hands out the blocks of a pool of ``num_blocks`` blocks, with reference counts.

    A block is *free* (reference count 0, on the free list) or *in use* (count >= 1: the
    number of block tables that hold it).  :meth:`allocate` takes a free block and gives
    it count 1; :meth:`incref` adds a holder (a forked sequence); :meth:`free` removes a
    holder and puts the block back on the free list when none is left.

    The free list is a stack: the block freed last is handed out first (it is the one
    most likely still in a cache of the processor).  Errors are loud: running out of
    blocks raises :class:`OutOfBlocksError` naming the pool size, and freeing or
    increfing a free block raises ``ValueError`` (a double free).  See chapter 17.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = _check_int("num_blocks", num_blocks, 1)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # stack: block 0 on top
        self._refcount = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks on the free list."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks with at least one holder."""
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        """How many block tables hold ``block`` (0 = free)."""
        return self._refcount[self._check_block(block)]

    def allocate(self) -> int:
        """Take a free block, give it reference count 1 and return its index."""
        if not self._free:
            raise OutOfBlocksError(
                f"out of KV-cache blocks: all {self.num_blocks} blocks of the pool are in "
                f"use; free a sequence or create the cache with a larger num_blocks")
        block = self._free.pop()
        self._refcount[block] = 1
        return block

    def incref(self, block: int) -> None:
        """Add one holder to an allocated block (a sequence that now shares it)."""
        block = self._check_block(block)
        if self._refcount[block] == 0:
            raise ValueError(f"cannot incref block {block}: it is free (not allocated)")
        self._refcount[block] += 1

    def free(self, block: int) -> bool:
        """Remove one holder; return True if that made the block free again."""
        block = self._check_block(block)
        if self._refcount[block] == 0:
            raise ValueError(f"block {block} is already free: double free")
        self._refcount[block] -= 1
        if self._refcount[block] == 0:
            self._free.append(block)
            return True
        return False

    def _check_block(self, block: Any) -> int:
        if isinstance(block, bool) or not isinstance(block, numbers.Integral) \
                or not 0 <= block < self.num_blocks:
            raise ValueError(f"block must be an integer in [0, {self.num_blocks}); "
                             f"got {block!r}")
        return int(block)

    def __repr__(self) -> str:
        return f"BlockAllocator(num_blocks={self.num_blocks}, free={self.num_free})"


# ---------------------------------------------------------------------- the paged cache
class PagedKVCache:
    """Keys and values of many sequences in one pool of fixed-size blocks.

    Args:
        num_blocks: size of the pool, in blocks.
        block_size: token positions per block (any integer >= 1; vLLM's default is 16).

    The pools of keys and values, :attr:`key_pool` (num_blocks, block_size, H_kv, d_k)
    and :attr:`value_pool` (num_blocks, block_size, H_kv, d_v), are created by the first
    :meth:`append`, which fixes H_kv, d_k, d_v, the dtype, the backend (NumPy or torch)
    and the device, as for :class:`~attnlib.kv_cache.KVCache`.

    A sequence is created by :meth:`add_sequence` (or :meth:`fork`), grows by
    :meth:`append`, is read back by :meth:`gather` and gives its blocks back by
    :meth:`free`.  Sequence ids are any hashable values.  Decoding is inference: with
    torch, run it under ``torch.no_grad()``.  See chapter 17.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.block_size = _check_int("block_size", block_size, 1)
        self.key_pool = None    # (num_blocks, block_size, H_kv, d_k)
        self.value_pool = None  # (num_blocks, block_size, H_kv, d_v)
        self._tables: dict[Hashable, list[int]] = {}
        self._lengths: dict[Hashable, int] = {}
        self._freed: set = set()
        self.copies = 0  # blocks copied on write so far

    # -- state -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def sequences(self) -> list:
        """Ids of the live sequences."""
        return list(self._tables)

    def length(self, seq_id: Hashable) -> int:
        """S, the number of positions the sequence holds."""
        return self._lengths[self._check_live(seq_id)]

    def block_table(self, seq_id: Hashable) -> list[int]:
        """The sequence's block table: physical block of each logical block (a copy)."""
        return list(self._tables[self._check_live(seq_id)])

    def block_tables(self, seq_ids: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
        """Padded block tables (B, max blocks) and lengths (B,) of several sequences.

        Entries past a sequence's last block are 0 (a valid index, masked by the length).
        The table has at least one column, so even empty sequences can be gathered.
        """
        seq_ids = list(seq_ids)
        tables = [self._tables[self._check_live(s)] for s in seq_ids]
        width = max([1, *(len(t) for t in tables)])
        out = np.zeros((len(seq_ids), width), dtype=np.int64)  # (B, n_max)
        for row, table in zip(out, tables):
            row[: len(table)] = table
        lengths = np.array([self._lengths[s] for s in seq_ids], dtype=np.int64)  # (B,)
        return out, lengths

    @property
    def tokens_stored(self) -> int:
        """Positions held, summed over the live sequences (shared ones counted each time)."""
        return sum(self._lengths.values())

    @property
    def slots_in_use(self) -> int:
        """Token slots of the blocks in use (each shared block counted once)."""
        return self.allocator.num_used * self.block_size

    # -- sequences ---------------------------------------------------------------------
    def add_sequence(self, seq_id: Hashable) -> None:
        """Start an empty sequence (no block is taken until its first append)."""
        if not isinstance(seq_id, Hashable):
            raise TypeError(f"seq_id must be hashable (a str or an int, say); got "
                            f"{type(seq_id).__name__} {seq_id!r}")
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self._freed.discard(seq_id)
        self._tables[seq_id] = []
        self._lengths[seq_id] = 0

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """Start ``child`` as a copy of ``parent`` that shares all of its blocks.

        No data is copied: each of the parent's blocks gains a holder.  Later appends to
        either sequence copy a shared, partly filled last block before writing into it.
        """
        parent = self._check_live(parent)
        if child in self._tables:
            raise ValueError(f"cannot fork into sequence {child!r}: it already exists")
        for block in self._tables[parent]:
            self.allocator.incref(block)
        self._freed.discard(child)
        self._tables[child] = list(self._tables[parent])
        self._lengths[child] = self._lengths[parent]

    def free(self, seq_id: Hashable) -> None:
        """End a sequence: drop its hold on every block (shared blocks stay in use)."""
        seq_id = self._check_live(seq_id)
        for block in self._tables.pop(seq_id):
            self.allocator.free(block)
        del self._lengths[seq_id]
        self._freed.add(seq_id)

    def append(self, seq_id: Hashable, k: Any, v: Any) -> None:
        """Append L new positions to a sequence.

        Args:
            seq_id: a live sequence (from :meth:`add_sequence` or :meth:`fork`).
            k: keys of the new positions, (H_kv, L, d_k).
            v: values of the new positions, (H_kv, L, d_v).

        New blocks are taken from the pool as needed.  If the last block is shared with
        another sequence (after a fork) and not full, it is first copied to a fresh block
        (copy-on-write), so no other sequence sees the new positions; appending L = 0
        positions writes nothing and so copies nothing.  If the pool has too few free
        blocks, :class:`OutOfBlocksError` is raised before anything changes.
        """
        seq_id = self._check_live(seq_id)
        self._check_new(k, v)
        table, S, bs = self._tables[seq_id], self._lengths[seq_id], self.block_size
        L = k.shape[-2]
        # copy-on-write only when a position is really written into a shared partial block
        cow = L > 0 and S % bs != 0 and self.allocator.refcount(table[-1]) > 1
        needed = math.ceil((S + L) / bs) - len(table) + int(cow)
        if needed > self.allocator.num_free:
            raise OutOfBlocksError(
                f"out of KV-cache blocks: appending L = {L} positions to sequence "
                f"{seq_id!r} (length {S}) needs {needed} new blocks of {bs} positions, "
                f"but only {self.allocator.num_free} of the pool's {self.num_blocks} "
                f"blocks are free")
        if cow:
            self._copy_last_block(table)
        xp = namespace(k=k, v=v)
        k_rows = xp.permute_dims(k, (1, 0, 2))  # (L, H_kv, d_k): the pool's layout
        v_rows = xp.permute_dims(v, (1, 0, 2))  # (L, H_kv, d_v)
        done = 0
        while done < L:
            pos = S + done
            if pos % bs == 0:
                table.append(self.allocator.allocate())
            offset, n = pos % bs, min(bs - pos % bs, L - done)
            block = table[pos // bs]
            self.key_pool[block, offset:offset + n] = k_rows[done:done + n]
            self.value_pool[block, offset:offset + n] = v_rows[done:done + n]
            done += n
        self._lengths[seq_id] = S + L

    def gather(self, seq_id: Hashable):
        """The sequence's keys (H_kv, S, d_k) and values (H_kv, S, d_v), contiguous.

        Built by reading the pool through the block table (a copy, not a view).
        """
        seq_id = self._check_live(seq_id)
        if self.key_pool is None:
            raise ValueError(f"sequence {seq_id!r} is empty: nothing was ever appended "
                             f"to this cache, so its shapes are unknown")
        tables, lengths = self.block_tables([seq_id])
        keys, values = _gather_blocks(self.key_pool, self.value_pool, tables)
        S = int(lengths[0])
        return keys[0, :, :S], values[0, :, :S]  # (H_kv, S, d_k), (H_kv, S, d_v)

    # -- helpers -----------------------------------------------------------------------
    def _check_live(self, seq_id: Hashable) -> Hashable:
        if seq_id in self._tables:
            return seq_id
        if seq_id in self._freed:
            raise KeyError(f"sequence {seq_id!r} was freed; its blocks are back in the "
                           f"pool and it can no longer be used")
        raise KeyError(f"unknown sequence {seq_id!r}; create it with add_sequence() or "
                       f"fork() first (live sequences: {self.sequences})")

    def _copy_last_block(self, table: list[int]) -> None:
        """Copy-on-write: give the sequence its own copy of its shared last block."""
        old, new = table[-1], self.allocator.allocate()
        self.key_pool[new] = self.key_pool[old]
        self.value_pool[new] = self.value_pool[old]
        self.allocator.free(old)  # one holder fewer; still held by the other sequences
        table[-1] = new
        self.copies += 1

    def _check_new(self, k: Any, v: Any) -> None:
        check_array(k, "k", min_ndim=3, shape_hint="(H_kv, L, d_k)")
        check_array(v, "v", min_ndim=3, shape_hint="(H_kv, L, d_v)")
        pools = {} if self.key_pool is None else {"key_pool": self.key_pool}
        xp = namespace(k=k, v=v, **pools)
        check_float(xp, "k", k)
        check_float(xp, "v", v)
        if k.ndim != 3 or v.ndim != 3 or k.shape[:2] != v.shape[:2]:
            raise ValueError(f"k and v must be (H_kv, L, d_k) and (H_kv, L, d_v) with the "
                             f"same H_kv and L; got k {tuple(k.shape)} and v "
                             f"{tuple(v.shape)}")
        if k.dtype != v.dtype:
            raise TypeError(f"k and v must share one dtype; got k {k.dtype} and v {v.dtype}")
        if self.key_pool is None:
            H_kv, d_k, d_v = k.shape[0], k.shape[2], v.shape[2]
            shape = (self.num_blocks, self.block_size, H_kv)
            self.key_pool = xp.zeros((*shape, d_k), dtype=k.dtype, device=device_of(k))
            self.value_pool = xp.zeros((*shape, d_v), dtype=v.dtype, device=device_of(v))
            return
        H_kv, d_k, d_v = self.key_pool.shape[2], self.key_pool.shape[3], \
            self.value_pool.shape[3]
        if (k.shape[0], k.shape[2], v.shape[2]) != (H_kv, d_k, d_v):
            raise ValueError(f"this cache holds keys ({H_kv}, L, {d_k}) and values "
                             f"({H_kv}, L, {d_v}); got k {tuple(k.shape)} and v "
                             f"{tuple(v.shape)}")
        if k.dtype != self.key_pool.dtype:
            raise TypeError(f"this cache holds {self.key_pool.dtype}; got k and v of "
                            f"dtype {k.dtype}")

    def __repr__(self) -> str:
        return (f"PagedKVCache(num_blocks={self.num_blocks}, block_size={self.block_size}, "
                f"sequences={len(self._tables)}, free blocks={self.allocator.num_free})")


def _gather_blocks(key_pool: Any, value_pool: Any, tables: np.ndarray):
    """Read whole blocks through padded block tables (B, n_max).

    Returns keys (B, H_kv, n_max * block_size, d_k) and values (B, H_kv, ..., d_v).
    """
    xp = namespace(key_pool=key_pool, value_pool=value_pool)
    B, n_max = tables.shape
    _, bs, H_kv, d_k = key_pool.shape
    d_v = value_pool.shape[-1]
    idx = xp.asarray(tables.reshape(-1), device=device_of(key_pool))  # (B * n_max,)
    keys = xp.take(key_pool, idx, axis=0)      # (B * n_max, bs, H_kv, d_k)
    values = xp.take(value_pool, idx, axis=0)  # (B * n_max, bs, H_kv, d_v)
    keys = xp.reshape(keys, (B, n_max * bs, H_kv, d_k))
    values = xp.reshape(values, (B, n_max * bs, H_kv, d_v))
    return xp.permute_dims(keys, (0, 2, 1, 3)), xp.permute_dims(values, (0, 2, 1, 3))


# ---------------------------------------------------------------- paged decode attention
def paged_decode_attention(q: Any, cache: PagedKVCache, seq_ids: Sequence[Hashable], *,
                           scale: float | None = None) -> Any:
    """One decoding step of attention over a paged KV cache, by block-table gather.

    Args:
        q: the new query of each sequence, (B, H, d_k): one position per sequence.
            H may be a multiple of the cache's H_kv (grouped-query attention, chapter
            12): query head i reads key/value head ``i // (H // H_kv)``.
        cache: the :class:`PagedKVCache` holding every sequence's keys and values,
            the new position included (append before attending).
        seq_ids: the B sequence ids, in the order of q's rows.
        scale: multiplies the scores; default 1/sqrt(d_k).

    Returns:
        (B, H, d_v), same backend, device and dtype as q.

    Each sequence's blocks are gathered through its block table into a padded
    (B, H_kv, S_max, d) array, positions past the sequence's length are masked (True =
    may attend), and :func:`~attnlib.sdpa.scaled_dot_product_attention` does the rest,
    so the result equals contiguous attention over each sequence's S keys.  A sequence
    with no positions gets zeros.  See chapter 17; the Triton kernel
    :func:`attnlib.kernels.paged_triton.paged_decode_attention_triton` computes the same
    thing without the padded copy.
    """
    seq_ids = list(seq_ids)
    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache; got {type(cache).__name__}")
    if cache.key_pool is None:
        raise ValueError("the cache is empty: append keys and values before attending")
    xp = namespace(q=q, key_pool=cache.key_pool)
    check_array(q, "q", min_ndim=3, shape_hint="(B, H, d_k)")
    check_float(xp, "q", q)
    H_kv, d_k = cache.key_pool.shape[2], cache.key_pool.shape[3]
    if q.ndim != 3 or q.shape[0] != len(seq_ids) or q.shape[-1] != d_k \
            or q.shape[1] % H_kv:
        raise ValueError(
            f"q must be (B, H, d_k) with B = len(seq_ids) = {len(seq_ids)}, d_k = {d_k} "
            f"and H a multiple of the cache's H_kv = {H_kv}; got q {tuple(q.shape)}")
    if q.dtype != cache.key_pool.dtype:
        raise TypeError(f"q is {q.dtype} but the cache holds {cache.key_pool.dtype}")
    B, H, G = q.shape[0], q.shape[1], q.shape[1] // H_kv
    tables, lengths = cache.block_tables(seq_ids)           # (B, n_max), (B,)
    keys, values = _gather_blocks(cache.key_pool, cache.value_pool, tables)
    S_max = keys.shape[2]                                   # n_max * block_size
    valid = np.arange(S_max)[None, :] < lengths[:, None]    # (B, S_max)
    mask = xp.asarray(valid[:, None, None, :], device=device_of(q))  # (B, 1, 1, S_max)
    q_groups = xp.reshape(q, (B, H_kv, G, d_k))  # a group's G heads as G query rows
    out = scaled_dot_product_attention(q_groups, keys, values, mask,
                                       scale=default_scale(d_k) if scale is None else scale)
    return xp.reshape(out, (B, H, values.shape[-1]))        # (B, H, d_v)


# ------------------------------------------------------------- a simulated serving trace
@dataclass(frozen=True)
class ServingRequest:
    """One request of a serving trace: it arrives at decoding step ``arrival`` with a
    prompt of ``prompt_len`` tokens and will generate ``output_len`` tokens."""

    arrival: int
    prompt_len: int
    output_len: int

    @property
    def final_len(self) -> int:
        return self.prompt_len + self.output_len


def make_serving_trace(n_requests: int, *, arrival_rate: float = 0.1,
                       median_prompt: float = 150.0, median_output: float = 200.0,
                       sigma: float = 0.8, max_len: int = 2048,
                       seed: int = 0) -> list[ServingRequest]:
    """A seeded random trace: Poisson arrivals, log-normal prompt and output lengths.

    Args:
        n_requests: number of requests.
        arrival_rate: mean arrivals per decoding step.
        median_prompt, median_output: medians of the log-normal lengths (tokens).
        sigma: standard deviation of log(length); larger means more varied lengths.
        max_len: the model's context limit: lengths are clipped so that
            prompt + output <= max_len.
        seed: seed of the NumPy generator.
    """
    n_requests = _check_int("n_requests", n_requests, 1)
    max_len = _check_int("max_len", max_len, 2)
    rng = np.random.default_rng(seed)
    arrivals = np.floor(np.cumsum(rng.exponential(1.0 / arrival_rate, n_requests)))
    prompt = np.exp(np.log(median_prompt) + sigma * rng.standard_normal(n_requests))
    output = np.exp(np.log(median_output) + sigma * rng.standard_normal(n_requests))
    prompt = np.clip(np.round(prompt), 1, max_len - 1).astype(int)
    output = np.clip(np.round(output), 1, max_len - prompt).astype(int)
    return [ServingRequest(int(a), int(p), int(o)) for a, p, o in zip(arrivals, prompt, output)]


@dataclass
class KVMemoryTimeline:
    """Token slots of KV cache at each decoding step of a simulated trace.

    Every attribute is an int array of shape (T,) over the T steps:

    - ``stored``: positions actually holding a key and value;
    - ``future``: slots reserved for positions the requests will write later;
    - ``never``: slots reserved that no position will ever use (internal
      fragmentation: a reservation longer than the final length, or the unused tail of
      a paged sequence's last block);
    - ``allocated`` = stored + future + never: slots handed to requests;
    - ``gaps``: free slots below the highest allocated address (external fragmentation
      of a contiguous first-fit allocator; 0 for paging, where any free block will do).
    """

    policy: str
    stored: np.ndarray
    future: np.ndarray
    never: np.ndarray
    allocated: np.ndarray
    gaps: np.ndarray
    running: np.ndarray  # requests in the batch at each step

    @property
    def waste(self) -> np.ndarray:
        """Fraction of the allocated slots that hold no token, per step (NaN if none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.allocated > 0,
                            (self.allocated - self.stored) / np.maximum(self.allocated, 1),
                            np.nan)


def _reservation(req: ServingRequest, policy: str, max_len: int) -> int:
    if policy == "max":
        return max_len
    if policy == "pow2":
        return min(max_len, 1 << (req.final_len - 1).bit_length())
    return req.final_len  # "oracle"


def _first_fit(live: dict, size: int) -> int:
    """Lowest address where ``size`` slots fit between the live (start, size) ranges."""
    start = 0
    for s, n in sorted(live.values()):
        if s - start >= size:
            return start
        start = max(start, s + n)
    return start


def simulate_kv_memory(trace: Sequence[ServingRequest], policy: str, *,
                       block_size: int = 16, max_len: int = 2048) -> KVMemoryTimeline:
    """Replay a trace and count the KV-cache slots a memory policy allocates.

    Args:
        trace: requests from :func:`make_serving_trace`.
        policy: how a request's cache is allocated:

            - ``"max"``: one contiguous range of ``max_len`` slots (the context limit),
              reserved on arrival;
            - ``"pow2"``: a contiguous range of the next power of two >= the final
              length (a system that knows each output length to within 2x);
            - ``"oracle"``: a contiguous range of exactly the final length (a system
              that knows the future);
            - ``"paged"``: blocks of ``block_size`` slots, taken one at a time from a
              :class:`BlockAllocator` as the sequence grows.

        block_size: slots per block for ``"paged"``.
        max_len: the context limit for ``"max"`` and ``"pow2"``.

    At each step the requests that arrive store their prompt, every running request
    writes one more position, and requests that wrote their last position are freed.
    Memory is unlimited, so every policy runs the same requests at the same time and
    only the accounting differs.  Contiguous ranges are placed first-fit in one address
    space.
    """
    if policy not in ("max", "pow2", "oracle", "paged"):
        raise ValueError(f"policy must be 'max', 'pow2', 'oracle' or 'paged'; got {policy!r}")
    block_size = _check_int("block_size", block_size, 1)
    if any(r.final_len > max_len for r in trace):
        raise ValueError(f"a request is longer than max_len = {max_len}")
    pending = sorted(trace, key=lambda r: r.arrival)
    T = max(r.arrival + r.output_len for r in pending) + 1
    cols = {k: np.zeros(T, dtype=np.int64)
            for k in ("stored", "future", "never", "allocated", "gaps", "running")}
    allocator = BlockAllocator(sum(math.ceil(r.final_len / block_size) for r in trace))
    running: dict[int, list] = {}   # id -> [request, length, slots or block list]
    live: dict[int, tuple[int, int]] = {}  # id -> (start, size) for contiguous policies
    nxt = 0
    for t in range(T):
        while nxt < len(pending) and pending[nxt].arrival <= t:  # admit: store the prompt
            req = pending[nxt]
            running[nxt] = [req, req.prompt_len - 1, []]  # grows by one just below
            if policy != "paged":
                size = _reservation(req, policy, max_len)
                live[nxt] = (_first_fit(live, size), size)
            nxt += 1
        for rid, state in running.items():                       # decode one position
            req, state[1] = state[0], state[1] + 1
            if policy == "paged":
                while len(state[2]) * block_size < state[1]:
                    state[2].append(allocator.allocate())
            alloc = live[rid][1] if policy != "paged" else len(state[2]) * block_size
            used_later = min(alloc, req.final_len)
            cols["stored"][t] += state[1]
            cols["future"][t] += used_later - state[1]
            cols["never"][t] += alloc - used_later
            cols["allocated"][t] += alloc
        if live:
            cols["gaps"][t] = max(s + n for s, n in live.values()) - cols["allocated"][t]
        cols["running"][t] = len(running)
        for rid in [r for r, s in running.items() if s[1] == s[0].final_len]:  # finish
            for block in running.pop(rid)[2]:
                allocator.free(block)
            live.pop(rid, None)
    return KVMemoryTimeline(policy=policy, **cols)
