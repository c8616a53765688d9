"""Tests for attnlib.sparse: patterns, block layouts and block-sparse attention.

Every pattern is compared with a loop over (query, key) pairs written from the paper's
set definitions; block-sparse attention with dense masked attention (attnlib and an
independent float64 loop) and with PyTorch's FlexAttention.
"""

import warnings

import numpy as np
import pytest
import torch

import attnlib
from attnlib import sparse as sp
from attnlib.masks import causal_mask, mask_or, sliding_window_mask

from conftest import BACKENDS, reference_attention, to_backend, to_numpy

SIZES = [(1, 1), (2, 3), (3, 2), (17, 17), (31, 17), (17, 31), (31, 31)]
ALIGNS = ["bottom-right", "top-left"]


def loop_mask(L, S, keys_of, align="bottom-right"):
    """(L, S) boolean from ``keys_of(p)``, the set of keys a query at position p sees."""
    offset = S - L if align == "bottom-right" else 0
    m = np.zeros((L, S), dtype=bool)
    for i in range(L):
        for j in keys_of(i + offset):
            if 0 <= j < S:
                m[i, j] = True
    return m


def as_numpy(m):
    return m.numpy() if isinstance(m, torch.Tensor) else np.asarray(m)


def like_of(backend):
    return None if backend == "numpy" else torch.zeros(1)


def check_backend(m, backend):
    assert isinstance(m, np.ndarray if backend == "numpy" else torch.Tensor)
    assert m.dtype in (np.bool_, torch.bool)


# ---------------------------------------------------------------------------------------
# Patterns against their definitions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("window,dilation", [(0, 1), (1, 1), (2, 3), (40, 5)])
@pytest.mark.parametrize("causal", [True, False])
def test_dilated_window(backend, L, S, align, window, dilation, causal):
    ms = range(0, window + 1) if causal else range(-window, window + 1)
    ref = loop_mask(L, S, lambda p: {p - m * dilation for m in ms}, align)
    got = sp.dilated_window_mask(L, S, window=window, dilation=dilation, causal=causal,
                                 align=align, like=like_of(backend))
    check_backend(got, backend)
    assert np.array_equal(as_numpy(got), ref)


@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("causal", [True, False])
def test_dilation_one_is_the_sliding_window(L, S, causal):
    for w in (0, 1, 4):
        assert np.array_equal(sp.dilated_window_mask(L, S, window=w, causal=causal),
                              sliding_window_mask(L, S, window=w, causal=causal))


def strided_sets(l, part, causal):
    # Child et al. 2019, section 4.1: A1 = {t, ..., i} with t = max(0, i - l);
    # A2 = {j : (i - j) mod l = 0}; both limited to j <= i in the autoregressive setting.
    def keys(p):
        if causal:
            a1 = set(range(max(0, p - l), p + 1))
            a2 = {j for j in range(0, p + 1) if (p - j) % l == 0}
        else:
            a1 = set(range(p - l, p + l + 1))
            a2 = {j for j in range(p - 200, p + 201) if (p - j) % l == 0}
        return {"local": a1, "strided": a2, "both": a1 | a2}[part]
    return keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("stride", [1, 5])
@pytest.mark.parametrize("part", ["both", "local", "strided"])
@pytest.mark.parametrize("causal", [True, False])
def test_strided(backend, L, S, stride, part, causal):
    ref = loop_mask(L, S, strided_sets(stride, part, causal))
    got = sp.strided_mask(L, S, stride=stride, part=part, causal=causal, like=like_of(backend))
    check_backend(got, backend)
    assert np.array_equal(as_numpy(got), ref)


def test_strided_top_left():
    ref = loop_mask(5, 12, strided_sets(3, "both", True), align="top-left")
    assert np.array_equal(sp.strided_mask(5, 12, stride=3, align="top-left"), ref)


def fixed_sets(l, c, part, causal, S):
    # Child et al. 2019: A1 = {j : floor(j / l) = floor(i / l)},
    # A2 = {j : j mod l in {t, ..., l}} with t = l - c; j <= i when autoregressive.
    def keys(p):
        a1 = {j for j in range(S) if j // l == p // l}
        a2 = {j for j in range(S) if j % l in range(l - c, l + 1)}
        chosen = {"local": a1, "strided": a2, "both": a1 | a2}[part]
        return {j for j in chosen if j <= p} if causal else chosen
    return keys


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S,align", [(1, 1, "bottom-right"), (2, 3, "top-left"),
                                       (17, 17, "bottom-right"), (31, 17, "bottom-right"),
                                       (31, 17, "top-left"), (17, 31, "bottom-right"),
                                       (17, 31, "top-left")])
@pytest.mark.parametrize("stride,c", [(1, 1), (5, 2), (8, 8)])
@pytest.mark.parametrize("part", ["both", "local", "strided"])
@pytest.mark.parametrize("causal", [True, False])
def test_fixed(backend, L, S, align, stride, c, part, causal):
    ref = loop_mask(L, S, fixed_sets(stride, c, part, causal, S), align)
    got = sp.fixed_mask(L, S, stride=stride, c=c, part=part, causal=causal, align=align,
                        like=like_of(backend))
    check_backend(got, backend)
    assert np.array_equal(as_numpy(got), ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", SIZES)
@pytest.mark.parametrize("align", ALIGNS)
def test_global(backend, L, S, align):
    tokens = [0, S - 1, S // 2]
    offset = S - L if align == "bottom-right" else 0
    ref = np.zeros((L, S), dtype=bool)
    for i in range(L):
        for j in range(S):
            ref[i, j] = j in tokens or (i + offset) in tokens
    got = sp.global_mask(L, S, tokens=tokens, align=align, like=like_of(backend))
    check_backend(got, backend)
    assert np.array_equal(as_numpy(got), ref)
    assert not sp.global_mask(L, S, tokens=[]).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S,b,r", [(17, 31, 4, 2), (31, 17, 5, 1), (8, 8, 8, 3),
                                     (33, 40, 3, 0)])
def test_random_blocks(backend, L, S, b, r):
    got = as_numpy(sp.random_block_mask(L, S, block_size=b, n_random=r, seed=3,
                                        like=like_of(backend)))
    n_qb, n_kb = -(-L // b), -(-S // b)
    for qb in range(n_qb):
        rows = got[qb * b:(qb + 1) * b]
        chosen = [kb for kb in range(n_kb) if rows[:, kb * b:(kb + 1) * b].any()]
        assert len(chosen) == min(r, n_kb)
        for kb in chosen:  # a chosen tile is allowed entirely
            assert rows[:, kb * b:(kb + 1) * b].all()
    again = sp.random_block_mask(L, S, block_size=b, n_random=r, seed=3)
    assert np.array_equal(again, got)


def test_random_blocks_depend_on_seed():
    masks = {sp.random_block_mask(64, block_size=4, n_random=2, seed=s).tobytes()
             for s in range(5)}
    assert len(masks) > 1


# ---------------------------------------------------------------------------------------
# Block layouts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S", SIZES + [(40, 64)])
@pytest.mark.parametrize("b", [1, 3, 8, 64])
def test_block_layout_against_tiles(backend, L, S, b, rng):
    m = rng.random((L, S)) < 0.15
    m[: L // 2, : S // 3] = True  # some full tiles
    layout = sp.block_layout(to_backend(m, backend), b)
    n_qb, n_kb = -(-L // b), -(-S // b)
    assert layout.shape == (n_qb, n_kb)
    computed = 0
    for qb in range(n_qb):
        for kb in range(n_kb):
            tile = m[qb * b:(qb + 1) * b, kb * b:(kb + 1) * b]
            assert layout.active[qb, kb] == tile.any()
            assert layout.full[qb, kb] == tile.all()
            computed += tile.size * tile.any()
    assert layout.fraction_computed == pytest.approx(computed / (L * S), abs=1e-15)
    dense = as_numpy(layout.to_dense())
    assert dense.shape == (L, S) and np.all(dense[m])  # covers every allowed entry
    assert dense.sum() == computed
    assert layout.tile_fraction == pytest.approx(layout.active.mean())


def test_block_layout_from_blocks():
    blocks = np.array([[1, 0, 1], [0, 1, 0]], dtype=bool)
    layout = sp.BlockLayout(blocks, 4, 7, 10)  # last tiles: 3 rows, 2 columns
    assert np.array_equal(layout.full, blocks)
    assert layout.fraction_computed == pytest.approx((16 + 8 + 12) / 70)
    assert np.array_equal(layout.to_dense(), np.kron(blocks, np.ones((4, 4), bool))[:7, :10])


def flex_or_skip():
    return pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.mark.parametrize("name,n,b", [("window", 128, 32), ("strided", 128, 32),
                                      ("fixed", 128, 32), ("dilated", 128, 32),
                                      ("window", 100, 16), ("fixed", 100, 16)])
def test_block_layout_matches_flex_block_mask(name, n, b):
    flex = flex_or_skip()
    mods = {
        "window": lambda bb, h, q, k: (q >= k) & (q - k <= 20),
        "strided": lambda bb, h, q, k: (q >= k) & (((q - k) % 11 == 0) | (q - k <= 11)),
        "fixed": lambda bb, h, q, k: (q >= k) & ((q // 16 == k // 16) | (k % 16 >= 14)),
        "dilated": lambda bb, h, q, k: (q >= k) & (q - k <= 12) & ((q - k) % 3 == 0),
    }
    ours = {
        "window": sliding_window_mask(n, window=20),
        "strided": sp.strided_mask(n, stride=11),
        "fixed": sp.fixed_mask(n, stride=16, c=2),
        "dilated": sp.dilated_window_mask(n, window=4, dilation=3),
    }[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = flex.create_block_mask(mods[name], None, None, n, n, device="cpu", BLOCK_SIZE=b)
    dense = flex.create_mask(mods[name], 1, 1, n, n, device="cpu")[0, 0].numpy()
    assert np.array_equal(dense, ours)  # the same pattern
    layout = sp.block_layout(ours, b)
    assert np.array_equal(bm.to_dense()[0, 0].numpy().astype(bool), layout.active)
    if n % b == 0:  # FlexAttention pads the last tiles, so it never calls them full
        assert int(bm.full_kv_num_blocks.sum()) == int(layout.full.sum())


# ---------------------------------------------------------------------------------------
# Block-sparse attention equals dense masked attention
# ---------------------------------------------------------------------------------------


def patterns(L, S):
    return {
        "window": sliding_window_mask(L, S, window=3),
        "two-sided window": sliding_window_mask(L, S, window=4, causal=False),
        "dilated": sp.dilated_window_mask(L, S, window=2, dilation=3, causal=False),
        "strided": sp.strided_mask(L, S, stride=5),
        "fixed": sp.fixed_mask(L, S, stride=6, c=2),
        "window + global": mask_or(sliding_window_mask(L, S, window=1, causal=False),
                                   sp.global_mask(L, S, tokens=[0])),
        "random": sp.random_block_mask(L, S, block_size=4, n_random=2),
        "empty rows": np.tile(np.arange(S) % 7 == 0, (L, 1)) & (np.arange(L) % 3 == 0)[:, None],
    }


_REFERENCES = {}


def case(L, S, causal):
    """Inputs, patterns and float64 loop references for (L, S), computed once."""
    if (L, S, causal) not in _REFERENCES:
        gen = np.random.default_rng(L * 100 + S)
        q = gen.standard_normal((2, L, 5))
        k = gen.standard_normal((2, S, 5))
        v = gen.standard_normal((2, S, 3))  # d_v != d_k
        refs = {name: reference_attention(q, k, v, m & causal_mask(L, S) if causal else m)
                for name, m in patterns(L, S).items()}
        _REFERENCES[L, S, causal] = (q, k, v, patterns(L, S), refs)
    return _REFERENCES[L, S, causal]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S,b", [(L, S, b) for L, S in SIZES for b in (5, 64)]
                         + [(2, 3, 1), (3, 2, 1), (17, 31, 1), (31, 17, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_equals_dense(backend, L, S, b, causal):
    q, k, v, masks, refs = case(L, S, causal)
    for name, m in masks.items():
        args = [to_backend(a, backend) for a in (q, k, v, m)]
        got = sp.block_sparse_attention(*args, b, causal=causal)
        dense = attnlib.scaled_dot_product_attention(*args, causal=causal)
        assert type(got) is type(args[0]) and got.shape == (2, L, 3)
        assert np.abs(to_numpy(got) - refs[name]).max() < 1e-10, name
        assert np.abs(to_numpy(got) - to_numpy(dense)).max() < 1e-10, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L,S,b", [(17, 31, 4), (31, 17, 8), (3, 2, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_block_sparse_with_a_layout_or_nothing(backend, L, S, b, causal, rng):
    q, k, v = (rng.standard_normal((1, 2, n, d)) for n, d in ((L, 4), (S, 4), (S, 6)))
    blocks = rng.random((-(-L // b), -(-S // b))) < 0.5
    blocks[0] = False  # a whole block of queries with no key
    layout = sp.BlockLayout(blocks, b, L, S)
    allowed = as_numpy(layout.to_dense()) & (causal_mask(L, S) if causal else True)
    tq, tk, tv = (to_backend(a, backend) for a in (q, k, v))
    got = sp.block_sparse_attention(tq, tk, tv, layout, causal=causal)
    assert np.abs(to_numpy(got) - reference_attention(q, k, v, allowed)).max() < 1e-10
    assert np.all(to_numpy(got)[..., :b, :] == 0)
    got = sp.block_sparse_attention(tq, tk, tv, None, b, causal=causal)
    ref = reference_attention(q, k, v, causal_mask(L, S) if causal else None)
    assert np.abs(to_numpy(got) - ref).max() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_broadcasts_batch_and_heads(backend, rng):
    L, S = 19, 23
    q = rng.standard_normal((2, 3, L, 4))
    k = rng.standard_normal((1, 3, S, 4))
    v = rng.standard_normal((2, 1, S, 5))
    m = sp.strided_mask(L, S, stride=4)
    args = [to_backend(a, backend) for a in (q, k, v, m)]
    got = sp.block_sparse_attention(*args, 8, scale=0.3)
    ref = reference_attention(q, k, v, m, scale=0.3)
    assert got.shape == (2, 3, L, 5)
    assert np.abs(to_numpy(got) - ref).max() < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("float16", 5e-3)])
def test_block_sparse_low_precision(backend, dtype, tol, rng):
    if backend == "numpy" and dtype == "float16":
        tol = 1e-2
    L = S = 33
    q, k, v = (rng.standard_normal((L, 8)) for _ in range(3))
    m = sp.fixed_mask(L, stride=8, c=2)
    args = [to_backend(a, backend, dtype) for a in (q, k, v)] + [to_backend(m, backend)]
    got = sp.block_sparse_attention(*args, 8)
    assert str(got.dtype).endswith(dtype)
    assert np.abs(to_numpy(got) - reference_attention(q, k, v, m)).max() < tol


def test_block_sparse_gradients_match_dense(rng):
    L, S = 21, 26
    m = torch.from_numpy(mask_or(sp.strided_mask(L, S, stride=4), sp.global_mask(L, S, tokens=[2])))
    grads = []
    for fn in (lambda q, k, v: sp.block_sparse_attention(q, k, v, m, 8, causal=True),
               lambda q, k, v: attnlib.scaled_dot_product_attention(q, k, v, m, causal=True)):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, n, 4, generator=gen, dtype=torch.float64, requires_grad=True)
                   for n in (L, S, S))
        (fn(q, k, v) ** 2).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        assert (a - b).abs().max() < 1e-10


def test_block_sparse_computes_only_active_tiles(monkeypatch, rng):
    # Count the scores that reach the softmax: they must add up to the layout's
    # fraction_computed, not to L * S.
    seen = []
    inner = sp.softmax

    def counting(x, axis=-1):
        seen.append(x.shape[-2] * x.shape[-1])
        return inner(x, axis=axis)

    monkeypatch.setattr(sp, "softmax", counting)
    L = S = 100
    q, k, v = (rng.standard_normal((L, 4)) for _ in range(3))
    m = sliding_window_mask(L, window=9)
    out = sp.block_sparse_attention(q, k, v, m, 16)
    layout = sp.block_layout(m, 16)
    assert sum(seen) == round(layout.fraction_computed * L * S)
    assert sum(seen) < 0.4 * L * S
    assert np.abs(out - reference_attention(q, k, v, m)).max() < 1e-10


def test_block_sparse_with_a_precomputed_layout(rng):
    L, S = 40, 50
    q, k, v = (rng.standard_normal((n, 4)) for n in (L, S, S))
    m = sp.fixed_mask(L, S, stride=8, c=2)
    layout = sp.block_layout(m & causal_mask(L, S), 8)
    got = sp.block_sparse_attention(q, k, v, m, causal=True, layout=layout)
    assert np.abs(got - reference_attention(q, k, v, m & causal_mask(L, S))).max() < 1e-10
    with pytest.raises(ValueError, match="layout is for block_size 8"):
        sp.block_sparse_attention(q, k, v, m, 4, layout=layout)
    with pytest.raises(ValueError, match="not both"):
        sp.block_sparse_attention(q, k, v, layout, layout=layout)


@pytest.mark.parametrize("name,n", [("strided", 128), ("fixed", 100), ("dilated", 128),
                                    ("global", 100)])
def test_block_sparse_against_flex_attention(name, n):
    flex = flex_or_skip()
    mods = {
        "strided": (lambda b, h, q, k: (q >= k) & (((q - k) % 10 == 0) | (q - k <= 10)),
                    sp.strided_mask(n, stride=10)),
        "fixed": (lambda b, h, q, k: (q >= k) & ((q // 16 == k // 16) | (k % 16 >= 13)),
                  sp.fixed_mask(n, stride=16, c=3)),
        "dilated": (lambda b, h, q, k: ((q - k).abs() <= 15) & ((q - k) % 5 == 0),
                    sp.dilated_window_mask(n, window=3, dilation=5, causal=False)),
        "global": (lambda b, h, q, k: ((q - k).abs() <= 2) | (q == 0) | (k == 0),
                   mask_or(sliding_window_mask(n, window=2, causal=False),
                           sp.global_mask(n, tokens=[0]))),
    }
    mod, mask = mods[name]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bm = flex.create_block_mask(mod, None, None, n, n, device="cpu", BLOCK_SIZE=32)
        ref = flex.flex_attention(q, k, v, block_mask=bm)
    got = sp.block_sparse_attention(q, k, v, torch.from_numpy(mask), 32)
    assert (got - ref).abs().max() < 1e-10


# ---------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------


def test_bad_pattern_arguments():
    with pytest.raises(ValueError, match="window"):
        sp.dilated_window_mask(8, window=-1)
    with pytest.raises(ValueError, match="dilation"):
        sp.dilated_window_mask(8, window=2, dilation=0)
    with pytest.raises(ValueError, match="stride"):
        sp.strided_mask(8, stride=0)
    with pytest.raises(ValueError, match="c must be at most stride"):
        sp.fixed_mask(8, stride=4, c=5)
    with pytest.raises(ValueError, match="c must"):
        sp.fixed_mask(8, stride=4, c=0)
    with pytest.raises(ValueError, match="part"):
        sp.strided_mask(8, stride=2, part="column")
    with pytest.raises(ValueError, match="align"):
        sp.fixed_mask(8, stride=4, c=1, align="centre")
    with pytest.raises(ValueError, match="tokens"):
        sp.global_mask(8, tokens=[8])
    with pytest.raises(ValueError, match="tokens"):
        sp.global_mask(8, tokens=[-1])
    with pytest.raises(ValueError, match="block_size"):
        sp.random_block_mask(8, block_size=0, n_random=1)
    with pytest.raises(ValueError, match="L"):
        sp.strided_mask(-1, stride=2)


def test_bad_block_sparse_arguments(rng):
    q, k, v = (rng.standard_normal((10, 4)) for _ in range(3))
    m = causal_mask(10)
    with pytest.raises(ValueError, match="block_size"):
        sp.block_sparse_attention(q, k, v, m, 0)
    with pytest.raises(ValueError, match="block_size"):
        sp.block_layout(m, 0)
    with pytest.raises(ValueError, match="block_size is required"):
        sp.block_sparse_attention(q, k, v, m)
    with pytest.raises(ValueError, match=r"mask must have shape \(L, S\) = \(10, 10\)"):
        sp.block_sparse_attention(q, k, v, causal_mask(10, 9), 4)
    with pytest.raises(TypeError, match="mask must be boolean"):
        sp.block_sparse_attention(q, k, v, m.astype(float), 4)
    with pytest.raises(TypeError, match="cannot mix"):
        sp.block_sparse_attention(q, k, v, torch.from_numpy(m), 4)
    layout = sp.block_layout(m, 4)
    with pytest.raises(ValueError, match="disagrees"):
        sp.block_sparse_attention(q, k, v, layout, 5)
    with pytest.raises(ValueError, match=r"\(L, S\) = \(10, 10\)"):
        sp.block_sparse_attention(q[:9], k, v, layout)
    with pytest.raises(ValueError, match="d_k"):
        sp.block_sparse_attention(q[:, :3], k, v, m, 4)
    with pytest.raises(ValueError, match="active must have shape"):
        sp.BlockLayout(np.ones((2, 2), bool), 4, 10, 10)
    with pytest.raises(ValueError, match="mask must have shape"):
        sp.block_layout(np.ones((1, 10, 10), bool), 4)
