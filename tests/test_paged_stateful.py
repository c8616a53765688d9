"""The paged KV cache under a stateful test: random appends, forks and frees (issue 9).

Hypothesis drives :class:`attnlib.paged.PagedKVCache` through random sequences of
operations (new sequence, append k tokens, fork, free, touching a freed sequence,
freeing a free block) and checks after every step that

- no block leaks: free blocks + blocks in use == num_blocks, and the free list is
  exactly the set of blocks whose reference count is 0, without duplicates;
- no double free: every reference count equals the number of live block tables that
  hold the block (so it is never negative), and no live table holds a free block;
  freeing a free block raises ``ValueError`` and changes nothing;
- no two live sequences ever write the same physical block: the pools are instrumented
  so that every write into them is recorded with the block's reference count at that
  moment, which must be 1, and the block must be in no other live block table;
- every live sequence reads back exactly its tokens: ``gather`` equals a shadow model
  that keeps each sequence's tokens in a plain Python list;
- running out of blocks happens exactly when the request needs more blocks than are
  free (counted independently here, copy-on-write included) and changes nothing.

Every token's key and value rows are made from a unique integer, so a stale or
clobbered slot cannot go unnoticed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from attnlib.paged import OutOfBlocksError, PagedKVCache

try:  # the shared "ci" (default) and "slow" profiles of the property-based tests
    import strategies  # noqa: F401
except ImportError:  # pragma: no cover - the settings below still apply
    pass

H_KV, D_K, D_V = 2, 3, 1
MAX_LIVE = 6  # live sequences at most, to keep the block tables short


class RecordingPool(np.ndarray):
    """A pool that reports every write ``pool[block, ...] = x`` to ``pool.on_write``."""

    def __setitem__(self, index, value):
        on_write = getattr(self, "on_write", None)
        if on_write is not None:
            block = index[0] if isinstance(index, tuple) else index
            on_write(int(block))
        super().__setitem__(index, value)


def token_rows(token: int):
    """Key (H_kv, 1, d_k) and value (H_kv, 1, d_v) rows that only this token has."""
    k = token + np.arange(H_KV * D_K, dtype=np.float64).reshape(H_KV, 1, D_K) / 8
    v = -token - np.arange(H_KV * D_V, dtype=np.float64).reshape(H_KV, 1, D_V) / 8
    return k, v


def rows_of(tokens: list[int]):
    """Keys (H_kv, n, d_k) and values (H_kv, n, d_v) of a list of tokens."""
    if not tokens:
        return np.zeros((H_KV, 0, D_K)), np.zeros((H_KV, 0, D_V))
    ks, vs = zip(*(token_rows(t) for t in tokens))
    return np.concatenate(ks, axis=1), np.concatenate(vs, axis=1)


class PagedCacheMachine(RuleBasedStateMachine):
    """Every rule is always enabled (it does nothing when it has nothing to act on), so
    Hypothesis never has to retry its choice of rule."""

    @initialize(num_blocks=st.integers(1, 16), block_size=st.integers(1, 4))
    def create(self, num_blocks, block_size):
        self.cache = PagedKVCache(num_blocks, block_size)
        self.num_blocks, self.bs = num_blocks, block_size
        # Create the pools ourselves (the layout documented on PagedKVCache), instrumented
        for name, d in (("key_pool", D_K), ("value_pool", D_V)):
            pool = np.zeros((num_blocks, block_size, H_KV, d)).view(RecordingPool)
            pool.on_write = self._record_write
            setattr(self.cache, name, pool)
        self.shadow: dict[int, list[int]] = {}  # live sequence -> its tokens
        self.freed: list[int] = []  # sequences freed so far
        self.writes: list[tuple[int, int, list[int]]] = []  # (block, refcount, holders)
        self.writer = None  # the sequence being appended to
        self.next_id = 0
        self.next_token = 0

    # -- instrumentation ----------------------------------------------------------------
    def _record_write(self, block: int) -> None:
        others = [s for s in self.cache.sequences
                  if s != self.writer and block in self.cache.block_table(s)]
        self.writes.append((block, self.cache.allocator.refcount(block), others))

    def _refcounts(self):
        return [self.cache.allocator.refcount(b) for b in range(self.num_blocks)]

    def _state(self):
        """Everything an operation that fails must leave unchanged."""
        return (self._refcounts(), self.cache.allocator.num_free,
                {s: (self.cache.block_table(s), self.cache.length(s))
                 for s in self.cache.sequences})

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _pick(self, data, ids, label):
        """One of ``ids`` drawn by Hypothesis, or None when there is none."""
        return data.draw(st.sampled_from(sorted(ids)), label=label) if ids else None

    # -- rules --------------------------------------------------------------------------
    @rule()
    def new_sequence(self):
        if len(self.shadow) >= MAX_LIVE:
            return
        seq = self._new_id()
        self.cache.add_sequence(seq)
        self.shadow[seq] = []
        assert self.cache.block_table(seq) == [] and self.cache.length(seq) == 0

    @rule(data=st.data(), n=st.integers(0, 9))
    def append(self, data, n):
        seq = self._pick(data, self.shadow, "seq")
        if seq is None:
            return
        tokens = list(range(self.next_token, self.next_token + n))
        self.next_token += n
        k, v = rows_of(tokens)
        S, table = len(self.shadow[seq]), self.cache.block_table(seq)
        # copy-on-write: only a real write (n > 0) into a shared, partly filled last block
        last_shared = (n > 0 and S % self.bs != 0
                       and self.cache.allocator.refcount(table[-1]) > 1)
        needed = math.ceil((S + n) / self.bs) - math.ceil(S / self.bs) + int(last_shared)
        free_before, before = self.cache.allocator.num_free, self._state()
        self.writes, self.writer = [], seq
        try:
            self.cache.append(seq, k, v)
        except OutOfBlocksError as e:
            assert needed > free_before, f"refused although {needed} <= {free_before} free"
            assert f"needs {needed} new blocks" in str(e)
            assert self._state() == before, "a refused append changed the cache"
            assert self.writes == [], "a refused append wrote into the pool"
            return
        finally:
            self.writer = None
        for block, count, others in self.writes:  # the writes, as they happened
            assert count == 1, f"wrote block {block} while {count} tables held it"
            assert not others, f"wrote block {block}, also held by sequences {others}"
        assert needed <= free_before, f"accepted although {needed} > {free_before} free"
        assert self.cache.allocator.num_free == free_before - needed
        self.shadow[seq].extend(tokens)
        new_table = self.cache.block_table(seq)
        written = {new_table[p // self.bs] for p in range(S, S + n)}
        assert written <= {b for b, _, _ in self.writes}, "positions not written"
        keep = len(table) - int(last_shared)  # untouched blocks stay where they were
        assert new_table[:keep] == table[:keep]

    @rule(data=st.data())
    def fork(self, data):
        parent = self._pick(data, self.shadow, "parent")
        if parent is None or len(self.shadow) >= MAX_LIVE:
            return
        child = self._new_id()
        before = self._refcounts()
        self.cache.fork(parent, child)
        self.shadow[child] = list(self.shadow[parent])
        table = self.cache.block_table(parent)
        assert self.cache.block_table(child) == table
        after = self._refcounts()
        for b in range(self.num_blocks):
            assert after[b] == before[b] + table.count(b)

    @rule(data=st.data())
    def free(self, data):
        seq = self._pick(data, self.shadow, "seq")
        if seq is None:
            return
        table = self.cache.block_table(seq)
        before = self._refcounts()
        self.cache.free(seq)
        del self.shadow[seq]
        after = self._refcounts()
        for b in range(self.num_blocks):
            assert after[b] == before[b] - table.count(b)
        self.freed.append(seq)

    @rule(data=st.data(), n=st.integers(1, 3))
    def touch_a_freed_sequence(self, data, n):
        seq = self._pick(data, self.freed, "freed seq")
        if seq is None:
            return
        before = self._state()
        k, v = rows_of([0] * n)
        for call in (lambda: self.cache.append(seq, k, v), lambda: self.cache.gather(seq),
                     lambda: self.cache.free(seq), lambda: self.cache.fork(seq, -seq)):
            with pytest.raises(KeyError, match="was freed"):
                call()
        assert self._state() == before

    @rule(data=st.data())
    def free_a_free_block(self, data):
        free_blocks = [b for b, c in enumerate(self._refcounts()) if c == 0]
        if not free_blocks:
            return
        block = data.draw(st.sampled_from(free_blocks))
        before = self._state()
        with pytest.raises(ValueError, match="double free"):
            self.cache.allocator.free(block)
        with pytest.raises(ValueError, match="free"):
            self.cache.allocator.incref(block)
        assert self._state() == before

    # -- invariants ---------------------------------------------------------------------
    @invariant()
    def no_block_leaks(self):
        alloc = self.cache.allocator
        free_list = list(alloc._free)
        assert len(free_list) == len(set(free_list)), f"free list has repeats: {free_list}"
        counts = self._refcounts()
        in_use = {b for b, c in enumerate(counts) if c > 0}
        assert set(free_list) == {b for b, c in enumerate(counts) if c == 0}
        assert alloc.num_free + len(in_use) == self.num_blocks

    @invariant()
    def refcounts_equal_holders(self):
        holders = [0] * self.num_blocks
        for seq in self.cache.sequences:
            for b in self.cache.block_table(seq):
                holders[b] += 1
        assert self._refcounts() == holders  # so never negative, and no live block free

    @invariant()
    def tables_fit_lengths(self):
        assert sorted(self.cache.sequences) == sorted(self.shadow)
        for seq, tokens in self.shadow.items():
            assert self.cache.length(seq) == len(tokens)
            table = self.cache.block_table(seq)
            assert len(table) == math.ceil(len(tokens) / self.bs)
            assert len(set(table)) == len(table), f"a table repeats a block: {table}"

    @invariant()
    def contents_equal_the_shadow(self):
        for seq, tokens in self.shadow.items():
            keys, values = self.cache.gather(seq)
            want_k, want_v = rows_of(tokens)
            np.testing.assert_array_equal(np.asarray(keys), want_k)
            np.testing.assert_array_equal(np.asarray(values), want_v)


PagedCacheMachine.TestCase.settings = settings(
    max_examples=max(200, settings.default.max_examples),  # 200 in CI, more when slow
    stateful_step_count=30,
    deadline=None,
)
TestPagedCache = PagedCacheMachine.TestCase
