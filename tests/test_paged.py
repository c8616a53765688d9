"""Tests of attnlib.paged: block allocator, paged KV cache, paged decode attention, and
the serving simulation (chapter 17).

Every cache test keeps a *shadow*: the plain list of keys and values each sequence was
given, so a wrong block table, a missed copy-on-write or a clobbered shared block shows
up as a difference from the shadow.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from attnlib.paged import (
    BlockAllocator,
    OutOfBlocksError,
    PagedKVCache,
    ServingRequest,
    make_serving_trace,
    paged_decode_attention,
    simulate_kv_memory,
)
from conftest import BACKENDS, reference_attention, to_backend, to_numpy


# ------------------------------------------------------------------------- the allocator
def test_allocator_hands_out_every_block_once_then_fails_naming_the_pool_size():
    alloc = BlockAllocator(5)
    blocks = [alloc.allocate() for _ in range(5)]
    assert sorted(blocks) == [0, 1, 2, 3, 4]
    assert alloc.num_free == 0 and alloc.num_used == 5
    with pytest.raises(OutOfBlocksError, match="all 5 blocks"):
        alloc.allocate()


def test_allocator_reference_counts_and_double_free():
    alloc = BlockAllocator(3)
    b = alloc.allocate()
    alloc.incref(b)
    assert alloc.refcount(b) == 2
    assert alloc.free(b) is False and alloc.refcount(b) == 1 and alloc.num_free == 2
    assert alloc.free(b) is True and alloc.refcount(b) == 0 and alloc.num_free == 3
    with pytest.raises(ValueError, match="double free"):
        alloc.free(b)
    with pytest.raises(ValueError, match="free"):
        alloc.incref(b)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        alloc.free(3)
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)


def test_allocator_reuses_the_block_freed_last():
    alloc = BlockAllocator(4)
    a, b = alloc.allocate(), alloc.allocate()
    alloc.free(a)
    assert alloc.allocate() == a  # LIFO free list
    assert b not in (a,)


# ---------------------------------------------------------------------- the paged cache
def _fill(cache, seq_id, n, rng, backend, H_kv=2, d_k=5, d_v=3, chunks=3, dtype="float64"):
    """Append n random positions to a new sequence in a few chunks; return the shadow."""
    cache.add_sequence(seq_id)
    k = rng.standard_normal((H_kv, n, d_k))
    v = rng.standard_normal((H_kv, n, d_v))
    for idx in np.array_split(np.arange(n), chunks):
        if len(idx):
            cache.append(seq_id, to_backend(k[:, idx], backend, dtype),
                         to_backend(v[:, idx], backend, dtype))
    return k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 16])
def test_gather_returns_what_was_appended(backend, block_size, rng):
    cache = PagedKVCache(64, block_size)
    shadows = {s: _fill(cache, s, n, rng, backend) for s, n in [("a", 17), ("b", 1), ("c", 31)]}
    for s, (k, v) in shadows.items():
        keys, values = cache.gather(s)
        assert tuple(keys.shape) == k.shape and tuple(values.shape) == v.shape
        np.testing.assert_array_equal(to_numpy(keys), k)
        np.testing.assert_array_equal(to_numpy(values), v)
        assert len(cache.block_table(s)) == math.ceil(k.shape[1] / block_size)
        assert cache.length(s) == k.shape[1]
    assert cache.allocator.num_used == sum(math.ceil(n / block_size) for n in (17, 1, 31))


def test_blocks_of_interleaved_sequences_are_not_contiguous_but_gather_is(rng):
    cache = PagedKVCache(16, 2)
    ka, _ = _fill(cache, "a", 1, rng, "numpy", chunks=1)
    _fill(cache, "b", 1, rng, "numpy", chunks=1)
    more = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 3))
    cache.append("a", *more)
    assert cache.block_table("a") == [0, 2] and cache.block_table("b") == [1]
    keys, _ = cache.gather("a")
    np.testing.assert_array_equal(keys, np.concatenate([ka, more[0]], axis=1))


@pytest.mark.parametrize("block_size", [1, 3, 4])
def test_fork_shares_blocks_and_copies_a_partial_last_block_on_write(block_size, rng):
    cache = PagedKVCache(32, block_size)
    k, v = _fill(cache, "p", 6, rng, "numpy")
    used = cache.allocator.num_used
    cache.fork("p", "c")
    assert cache.block_table("c") == cache.block_table("p")
    assert cache.allocator.num_used == used  # no data copied by the fork itself
    assert all(cache.allocator.refcount(b) == 2 for b in cache.block_table("p"))
    k1, v1 = rng.standard_normal((2, 1, 5)), rng.standard_normal((2, 1, 3))
    cache.append("c", k1, v1)
    partial = 6 % block_size != 0
    assert cache.copies == int(partial)
    tp, tc = cache.block_table("p"), cache.block_table("c")
    n_full = 6 // block_size
    assert tp[:n_full] == tc[:n_full]           # full blocks stay shared
    assert tc[-1] not in tp                     # the child writes only into its own block
    keys_p, values_p = cache.gather("p")
    keys_c, values_c = cache.gather("c")
    np.testing.assert_array_equal(keys_p, k)    # the parent is untouched
    np.testing.assert_array_equal(values_p, v)
    np.testing.assert_array_equal(keys_c, np.concatenate([k, k1], axis=1))
    np.testing.assert_array_equal(values_c, np.concatenate([v, v1], axis=1))
    # the parent now owns its partial block alone: its next write copies nothing
    cache.append("p", k1, v1)
    assert cache.copies == int(partial)


@pytest.mark.parametrize("backend", BACKENDS)
def test_appending_nothing_to_a_forked_sequence_copies_nothing(backend, rng):
    """Copy-on-write happens on a write: an empty append to a sequence whose partial last
    block is shared must leave the block shared, take no block and count no copy."""
    cache = PagedKVCache(8, 4)
    k, v = _fill(cache, "p", 6, rng, backend)  # blocks: one full, one half full
    cache.fork("p", "c")
    table, used = cache.block_table("p"), cache.allocator.num_used
    empty_k = to_backend(np.zeros((2, 0, 5)), backend, "float64")
    empty_v = to_backend(np.zeros((2, 0, 3)), backend, "float64")
    for seq in ("c", "p", "c"):
        cache.append(seq, empty_k, empty_v)
        assert cache.copies == 0 and cache.allocator.num_used == used
        assert cache.block_table("c") == cache.block_table("p") == table
        assert all(cache.allocator.refcount(b) == 2 for b in table)
        assert cache.length(seq) == 6
    one_k = to_backend(rng.standard_normal((2, 1, 5)), backend, "float64")
    one_v = to_backend(rng.standard_normal((2, 1, 3)), backend, "float64")
    cache.append("c", one_k, one_v)  # the first real write copies the shared block
    assert cache.copies == 1 and cache.allocator.num_used == used + 1
    assert cache.block_table("c")[0] == table[0] and cache.block_table("c")[1] != table[1]
    np.testing.assert_array_equal(to_numpy(cache.gather("p")[0]), k)
    np.testing.assert_array_equal(to_numpy(cache.gather("c")[1]),
                                  np.concatenate([v, to_numpy(one_v)], axis=1))
    full = PagedKVCache(1, 4)  # an empty append needs no free block, even with a full pool
    _fill(full, "a", 3, rng, backend, chunks=1)
    full.fork("a", "b")
    full.append("b", empty_k, empty_v)
    assert full.copies == 0 and full.allocator.num_free == 0


def test_free_returns_blocks_and_shared_blocks_survive(rng):
    cache = PagedKVCache(8, 4)
    k, _ = _fill(cache, "p", 8, rng, "numpy")
    cache.fork("p", "c")
    cache.free("p")
    assert cache.allocator.num_used == 2          # still held by the child
    np.testing.assert_array_equal(cache.gather("c")[0], k)
    cache.free("c")
    assert cache.allocator.num_free == 8


def test_errors_for_freed_unknown_and_duplicate_sequences(rng):
    cache = PagedKVCache(8, 4)
    _fill(cache, "a", 3, rng, "numpy")
    k, v = np.zeros((2, 1, 5)), np.zeros((2, 1, 3))
    cache.free("a")
    with pytest.raises(KeyError, match="was freed"):
        cache.append("a", k, v)
    with pytest.raises(KeyError, match="was freed"):
        cache.free("a")
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.append("zzz", k, v)
    with pytest.raises(KeyError, match="unknown sequence"):
        cache.fork("zzz", "y")
    cache.add_sequence("b")
    with pytest.raises(ValueError, match="already exists"):
        cache.add_sequence("b")
    with pytest.raises(ValueError, match="already exists"):
        cache.fork("b", "b")
    cache.add_sequence("a")                       # a freed id may be reused
    cache.append("a", k, v)


def test_out_of_blocks_on_append_names_the_pool_and_changes_nothing(rng):
    cache = PagedKVCache(3, 4)
    k, _ = _fill(cache, "a", 10, rng, "numpy")
    with pytest.raises(OutOfBlocksError, match="pool's 3 blocks"):
        cache.append("a", np.zeros((2, 3, 5)), np.zeros((2, 3, 3)))
    assert cache.length("a") == 10 and cache.allocator.num_free == 0
    np.testing.assert_array_equal(cache.gather("a")[0], k)
    cache.append("a", np.ones((2, 2, 5)), np.ones((2, 2, 3)))  # the last block has room
    cache.fork("a", "b")
    with pytest.raises(OutOfBlocksError):       # copy-on-write needs a block: none left
        cache.append("b", np.ones((2, 1, 5)), np.ones((2, 1, 3)))


def test_bad_appends_are_refused(rng):
    cache = PagedKVCache(8, 4)
    cache.add_sequence("a")
    with pytest.raises(ValueError, match="H_kv, L, d_k"):
        cache.append("a", np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="same H_kv and L"):
        cache.append("a", np.zeros((2, 3, 4)), np.zeros((2, 2, 4)))
    with pytest.raises(TypeError, match="floating"):
        cache.append("a", np.zeros((2, 3, 4), int), np.zeros((2, 3, 4), int))
    cache.append("a", np.zeros((2, 3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="this cache holds"):
        cache.append("a", np.zeros((1, 3, 4)), np.zeros((1, 3, 4)))
    with pytest.raises(TypeError, match="float64"):
        cache.append("a", np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32))
    with pytest.raises(TypeError, match="mix"):
        cache.append("a", torch.zeros(2, 3, 4, dtype=torch.float64),
                     torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(8, 0)


def test_random_appends_forks_and_frees_never_leak_or_share_a_written_block():
    """A randomized property test: after every operation, (1) each block's reference
    count equals the number of live block tables holding it and the free list holds
    exactly the other blocks, once each; (2) every block written by an append is held by
    that sequence alone; (3) every live sequence gathers exactly its shadow."""
    rng = np.random.default_rng(7)
    for block_size in (1, 2, 3, 4):
        cache = PagedKVCache(40, block_size)
        shadow, next_id = {}, 0
        for _ in range(300):
            live = cache.sequences
            op = rng.choice(["add", "append", "fork", "free"], p=[0.15, 0.55, 0.15, 0.15])
            if op == "add" or not live:
                cache.add_sequence(next_id)
                shadow[next_id], next_id = np.zeros((1, 0, 2)), next_id + 1
            elif op == "append":
                s = live[rng.integers(len(live))]
                n = int(rng.integers(1, 2 * block_size + 2))
                k = rng.standard_normal((1, n, 2))
                before = cache.block_table(s)
                try:
                    cache.append(s, k, 2 * k)
                except OutOfBlocksError:
                    assert cache.block_table(s) == before
                    continue
                shadow[s] = np.concatenate([shadow[s], k], axis=1)
                start = (shadow[s].shape[1] - n) // block_size
                for block in cache.block_table(s)[start:]:    # the blocks just written
                    assert cache.allocator.refcount(block) == 1
                    assert not any(block in cache.block_table(o) for o in live if o != s)
            elif op == "fork":
                p = live[rng.integers(len(live))]
                cache.fork(p, next_id)
                shadow[next_id], next_id = shadow[p].copy(), next_id + 1
            else:
                s = live[rng.integers(len(live))]
                cache.free(s)
                del shadow[s]
            holders = np.zeros(40, int)
            for s in cache.sequences:
                for block in cache.block_table(s):
                    holders[block] += 1
            counts = np.array([cache.allocator.refcount(b) for b in range(40)])
            np.testing.assert_array_equal(counts, holders)
            free = cache.allocator._free
            assert len(set(free)) == len(free) == int((holders == 0).sum())
            assert all(holders[b] == 0 for b in free)
            for s, k in shadow.items():
                if k.shape[1]:
                    np.testing.assert_array_equal(cache.gather(s)[0], k)
                    np.testing.assert_array_equal(cache.gather(s)[1], 2 * k)
        for s in cache.sequences:
            cache.free(s)
        assert cache.allocator.num_free == 40


# ------------------------------------------------------------ paged decode attention
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [1, 2, 3, 7, 16])
@pytest.mark.parametrize("H,H_kv", [(1, 1), (4, 2), (3, 1)])
def test_paged_decode_attention_equals_contiguous_attention(backend, block_size, H, H_kv, rng):
    cache = PagedKVCache(64, block_size)
    lengths = {"a": 17, "b": 1, "c": 2, "d": 31}
    shadows = {s: _fill(cache, s, n, rng, backend, H_kv=H_kv, d_k=4, d_v=3)
               for s, n in lengths.items()}
    order = ["d", "b", "a", "c"]
    q = rng.standard_normal((4, H, 4))
    out = paged_decode_attention(to_backend(q, backend), cache, order)
    assert tuple(out.shape) == (4, H, 3)
    for i, s in enumerate(order):
        k, v = shadows[s]
        group = H // H_kv
        kv_heads = [h // group for h in range(H)]
        ref = reference_attention(q[i][:, None, :], k[kv_heads], v[kv_heads])  # (H, 1, d_v)
        np.testing.assert_allclose(to_numpy(out[i]), ref[:, 0], atol=1e-12)


def test_paged_decode_attention_float32_scale_and_an_empty_sequence(rng):
    cache = PagedKVCache(16, 3)
    k, v = _fill(cache, "a", 5, rng, "torch", H_kv=1, d_k=4, d_v=4, dtype="float32")
    cache.add_sequence("empty")
    q = rng.standard_normal((2, 2, 4)).astype(np.float32)
    out = paged_decode_attention(torch.from_numpy(q), cache, ["a", "empty"], scale=0.3)
    assert out.dtype == torch.float32
    ref = reference_attention(q[0][:, None, :], k, v, scale=0.3)[:, 0]
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-5)
    assert torch.equal(out[1], torch.zeros(2, 4))


def test_paged_decode_attention_refuses_bad_input(rng):
    cache = PagedKVCache(16, 3)
    with pytest.raises(ValueError, match="empty"):
        paged_decode_attention(np.zeros((1, 2, 4)), cache, ["a"])
    _fill(cache, "a", 5, rng, "numpy", H_kv=2, d_k=4)
    with pytest.raises(ValueError, match="multiple of the cache's H_kv = 2"):
        paged_decode_attention(np.zeros((1, 3, 4)), cache, ["a"])
    with pytest.raises(ValueError, match=r"B = len\(seq_ids\) = 1"):
        paged_decode_attention(np.zeros((2, 2, 4)), cache, ["a"])
    with pytest.raises(TypeError, match="float32"):
        paged_decode_attention(np.zeros((1, 2, 4), np.float32), cache, ["a"])
    with pytest.raises(KeyError, match="unknown"):
        paged_decode_attention(np.zeros((1, 2, 4)), cache, ["b"])
    with pytest.raises(TypeError, match="PagedKVCache"):
        paged_decode_attention(np.zeros((1, 2, 4)), object(), ["a"])


def test_paged_decode_attention_matches_flex_attention_over_the_pool(rng):
    """PyTorch's paged-attention approach: flex_attention over the *whole physical pool*,
    with a mask_mod that maps each physical position back to its logical position
    through the block table (as torch's experimental PagedAttention helper does)."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    import warnings

    bs, H, d = 3, 2, 4
    cache = PagedKVCache(12, bs)
    for s, n in [("a", 7), ("b", 2)]:
        _fill(cache, s, n, rng, "torch", H_kv=H, d_k=d, d_v=d, dtype="float32")
    cache.fork("a", "c")
    extra = [torch.randn(H, 1, d), torch.randn(H, 1, d)]
    cache.append("c", *extra)
    order = ["a", "b", "c"]
    _, lengths = cache.block_tables(order)
    phys_to_logical = torch.full((3, cache.num_blocks), -1, dtype=torch.int64)
    for b, s in enumerate(order):
        for j, block in enumerate(cache.block_table(s)):
            phys_to_logical[b, block] = j
    lengths = torch.as_tensor(lengths)

    def mask_mod(b, h, q_idx, kv_idx):
        j = phys_to_logical[b, kv_idx // bs]
        return (j >= 0) & (j * bs + kv_idx % bs < lengths[b])

    N = cache.num_blocks * bs
    k_flat = cache.key_pool.permute(2, 0, 1, 3).reshape(1, H, N, d)   # (1, H, N, d)
    v_flat = cache.value_pool.permute(2, 0, 1, 3).reshape(1, H, N, d)
    q = torch.randn(3, H, d)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block_mask = fa.create_block_mask(mask_mod, 3, None, 1, N, device="cpu")
        ref = fa.flex_attention(q[:, :, None], k_flat.expand(3, -1, -1, -1),
                                v_flat.expand(3, -1, -1, -1), block_mask=block_mask)
    out = paged_decode_attention(q, cache, order)
    torch.testing.assert_close(out, ref[:, :, 0], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------- the serving simulation
def test_serving_trace_is_seeded_and_within_the_context_limit():
    a = make_serving_trace(200, seed=3, max_len=512)
    assert a == make_serving_trace(200, seed=3, max_len=512)
    assert a != make_serving_trace(200, seed=4, max_len=512)
    assert all(1 <= r.prompt_len and 1 <= r.output_len and r.final_len <= 512 for r in a)
    assert all(x.arrival <= y.arrival for x, y in itertools.pairwise(a))


def test_simulated_memory_accounting_per_policy():
    trace = make_serving_trace(60, seed=1, max_len=1024, arrival_rate=0.05)
    runs = {p: simulate_kv_memory(trace, p, block_size=16, max_len=1024)
            for p in ("max", "pow2", "oracle", "paged")}
    stored = runs["max"].stored
    for run in runs.values():
        np.testing.assert_array_equal(run.stored, stored)  # same requests, same tokens
        np.testing.assert_array_equal(run.allocated, run.stored + run.future + run.never)
        assert (run.future >= 0).all() and (run.never >= 0).all()
    np.testing.assert_array_equal(runs["max"].allocated, 1024 * runs["max"].running)
    assert (runs["oracle"].never == 0).all()
    paged = runs["paged"]
    assert (paged.allocated - paged.stored <= 15 * paged.running).all()  # < 1 block each
    assert (paged.gaps == 0).all()
    assert (runs["max"].allocated >= runs["pow2"].allocated).all()
    assert (runs["pow2"].allocated >= runs["oracle"].allocated).all()
    assert (runs["oracle"].allocated >= paged.stored).all()


def test_simulation_by_hand():
    # one request: prompt 5 tokens, 3 output tokens, arrives at step 2; block size 4
    trace = [ServingRequest(arrival=2, prompt_len=5, output_len=3)]
    paged = simulate_kv_memory(trace, "paged", block_size=4, max_len=16)
    np.testing.assert_array_equal(paged.stored, [0, 0, 5, 6, 7, 8])
    np.testing.assert_array_equal(paged.allocated, [0, 0, 8, 8, 8, 8])
    full = simulate_kv_memory(trace, "max", max_len=16)
    np.testing.assert_array_equal(full.future, [0, 0, 3, 2, 1, 0])
    np.testing.assert_array_equal(full.never, [0, 0, 8, 8, 8, 8])
    pow2 = simulate_kv_memory(trace, "pow2", max_len=16)
    np.testing.assert_array_equal(pow2.allocated, [0, 0, 8, 8, 8, 8])
    with pytest.raises(ValueError, match="policy"):
        simulate_kv_memory(trace, "buddy")


def test_first_fit_leaves_gaps_that_paging_does_not():
    # A long request between two short ones finishes first: a hole opens below the top.
    trace = [ServingRequest(0, 4, 10), ServingRequest(0, 30, 1), ServingRequest(0, 4, 10)]
    oracle = simulate_kv_memory(trace, "oracle", max_len=64)
    assert oracle.gaps[0] == 0 and oracle.gaps[2] == 31
    assert (simulate_kv_memory(trace, "paged", block_size=4).gaps == 0).all()
