"""attnlib.masks, the builders of chapter 8: padding, sliding windows, combinations,
boolean <-> additive conversion and masks from position functions.

References: masks written entry by entry in Python loops, torch's own mask helpers
(FlexAttention's ``create_mask``, ``nn.MultiheadAttention``'s key_padding_mask) and
torch's fused SDPA.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

import attnlib
from attnlib.masks import (
    bias_to_mask,
    causal_mask,
    key_padding_mask,
    mask_and,
    mask_from_function,
    mask_or,
    mask_to_bias,
    query_padding_mask,
    sliding_window_mask,
)
from conftest import BACKENDS, reference_attention, to_backend, to_numpy

LIKE = {"numpy": None, "torch": torch.zeros(1)}


def _is(backend, m):
    return isinstance(m, np.ndarray if backend == "numpy" else torch.Tensor)


# ---- padding -----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths, n", [([3], None), ([2, 0, 5], 5), ([1, 17, 31], 31),
                                        ([0], 2)])
def test_key_and_query_padding_masks(backend, lengths, n):
    lens = to_backend(np.array(lengths), backend)
    km, qm = key_padding_mask(lens, n), query_padding_mask(lens, n)
    n = max(lengths) if n is None else n
    assert _is(backend, km) and _is(backend, qm)
    assert tuple(km.shape) == (len(lengths), 1, 1, n)
    assert tuple(qm.shape) == (len(lengths), 1, n, 1)
    expected = np.array([[j < ln for j in range(n)] for ln in lengths])
    np.testing.assert_array_equal(to_numpy(km)[:, 0, 0, :], expected)
    np.testing.assert_array_equal(to_numpy(qm)[:, 0, :, 0], expected)


def test_key_padding_mask_is_inverse_of_torch_mha_convention(rng):
    """Same result as nn.MultiheadAttention with key_padding_mask = ~ours (True = ignore)."""
    lengths = torch.tensor([4, 2])
    ours = key_padding_mask(lengths, 4)
    torch_kpm = ~ours[:, 0, 0, :]
    mha = torch.nn.MultiheadAttention(4, 1, batch_first=True, bias=False)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.eye(4).repeat(3, 1))
        mha.out_proj.weight.copy_(torch.eye(4))
    x = torch.from_numpy(rng.standard_normal((2, 4, 4))).float()
    ref = mha(x, x, x, key_padding_mask=torch_kpm, need_weights=False)[0]
    out = attnlib.scaled_dot_product_attention(x, x, x, ours[:, 0])  # (B, 1, S) vs (B, L, S)
    assert (out - ref).abs().max() < 1e-5


def test_query_padding_only_changes_padded_rows(rng):
    q, k, v = rng.standard_normal((2, 5, 3)), rng.standard_normal((2, 5, 3)), \
        rng.standard_normal((2, 5, 4))
    lengths = [5, 3]
    keys = key_padding_mask(lengths)[:, 0]  # (B, 1, S)
    both = mask_and(key_padding_mask(lengths), query_padding_mask(lengths))[:, 0]  # (B, L, S)
    a = attnlib.scaled_dot_product_attention(q, k, v, keys)
    b = attnlib.scaled_dot_product_attention(q, k, v, both)
    real = query_padding_mask(lengths)[:, 0, :, 0]  # (B, L)
    np.testing.assert_allclose(a[real], b[real], atol=1e-12)
    np.testing.assert_array_equal(b[~real], 0.0)
    assert np.abs(a[~real]).max() > 1e-3


def test_padding_masks_follow_like_and_check_lengths():
    m = key_padding_mask([1, 2], 3, like=torch.zeros(1, dtype=torch.float64))
    assert isinstance(m, torch.Tensor) and m.dtype == torch.bool
    with pytest.raises(ValueError, match="at most L = 2"):
        query_padding_mask([1, 3], 2)
    with pytest.raises(ValueError, match="at most S = 2"):
        key_padding_mask([1, 3], 2)
    with pytest.raises(TypeError, match="lengths must hold integers"):
        key_padding_mask(np.array([1.0]))
    with pytest.raises(ValueError, match="non-negative"):
        key_padding_mask([-1])


# ---- sliding windows ---------------------------------------------------------------


def _window_loop(L, S, window, causal, align):
    offset = S - L if align == "bottom-right" else 0
    m = np.zeros((L, S), bool)
    for i in range(L):
        p = i + offset
        for j in range(S):
            m[i, j] = (p - window <= j <= p) if causal else abs(j - p) <= window
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L, S", [(1, 1), (5, 5), (2, 7), (7, 2), (17, 31)])
@pytest.mark.parametrize("window", [0, 1, 3, 40])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("align", ["bottom-right", "top-left"])
def test_sliding_window_matches_loop(backend, L, S, window, causal, align):
    m = sliding_window_mask(L, S, window=window, causal=causal, align=align,
                            like=LIKE[backend])
    assert _is(backend, m) and tuple(m.shape) == (L, S)
    np.testing.assert_array_equal(to_numpy(m).astype(bool),
                                  _window_loop(L, S, window, causal, align))


@pytest.mark.parametrize("L, S", [(4, 4), (3, 9), (9, 3)])
def test_wide_window_is_causal_mask_or_nothing(L, S):
    np.testing.assert_array_equal(sliding_window_mask(L, S, window=S - 1), causal_mask(L, S))
    for align in ("bottom-right", "top-left"):
        np.testing.assert_array_equal(sliding_window_mask(L, S, window=max(L, S), align=align),
                                      causal_mask(L, S, align=align))
    assert sliding_window_mask(L, S, window=L + S, causal=False).all()


def test_sliding_window_matches_flex_create_mask():
    L, S, w = 6, 10, 2
    ref = create_mask(lambda b, h, q, kv: (kv <= q + S - L) & (kv >= q + S - L - w),
                      1, 1, L, S, device="cpu")[0, 0]
    np.testing.assert_array_equal(sliding_window_mask(L, S, window=w), ref.numpy())


@pytest.mark.parametrize("window", [-1, 1.5, True, None])
def test_sliding_window_bad_window(window):
    with pytest.raises(ValueError, match="window must be a non-negative integer"):
        sliding_window_mask(4, window=window)


# ---- combining ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_and_or_broadcast(rng, backend):
    a = rng.random((2, 1, 1, 5)) < 0.5
    b = rng.random((4, 5)) < 0.5
    c = rng.random((2, 3, 1, 1)) < 0.5
    A, Bm, C = (to_backend(x, backend) for x in (a, b, c))
    both, either = mask_and(A, Bm, C), mask_or(A, Bm, C)
    assert _is(backend, both) and tuple(both.shape) == (2, 3, 4, 5)
    np.testing.assert_array_equal(to_numpy(both).astype(bool), a & b & c)
    np.testing.assert_array_equal(to_numpy(either).astype(bool), a | b | c)
    np.testing.assert_array_equal(to_numpy(mask_and(A)).astype(bool), a)


def test_mask_and_of_padding_and_causal_matches_mha():
    lengths = torch.tensor([5, 2])
    m = mask_and(key_padding_mask(lengths, 5), causal_mask(5, like=lengths))  # (B, 1, L, S)
    assert m.shape == (2, 1, 5, 5)
    expected = torch.tril(torch.ones(5, 5, dtype=torch.bool)) & \
        (torch.arange(5)[None, :] < lengths[:, None])[:, None, :]
    assert torch.equal(m[:, 0], expected)


def test_combine_bad_input():
    with pytest.raises(ValueError, match=r"masks\[0\] \(2, 3\), masks\[1\] \(4,\)"):
        mask_and(np.ones((2, 3), bool), np.ones(4, bool))
    with pytest.raises(TypeError, match=r"masks\[1\] must be boolean"):
        mask_or(np.ones(3, bool), np.zeros(3))
    with pytest.raises(TypeError, match="cannot mix"):
        mask_and(np.ones(3, bool), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one mask"):
        mask_and()


# ---- boolean <-> additive -----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("masked_value", [-math.inf, -1e9, -1e4])
def test_mask_to_bias_values(rng, backend, dtype, masked_value):
    m = to_backend(rng.random((3, 4)) < 0.5, backend)
    bias = mask_to_bias(m, dtype=dtype, masked_value=masked_value)
    assert _is(backend, bias) and str(bias.dtype).endswith(dtype)
    expected = np.where(to_numpy(m) > 0, 0.0, masked_value)
    if dtype == "float16":  # -1e9 overflows to -inf; -1e4 fits
        expected = np.where(to_numpy(m) > 0, 0.0, -np.inf if masked_value < -65504 else
                            masked_value)
    np.testing.assert_array_equal(to_numpy(bias), expected.astype(dtype).astype(np.float64))


def test_mask_to_bias_default_dtype():
    assert mask_to_bias(np.ones(2, bool)).dtype == np.float64
    assert mask_to_bias(torch.ones(2, dtype=torch.bool)).dtype == torch.get_default_dtype()
    assert mask_to_bias(torch.ones(2, dtype=torch.bool), dtype=torch.float16).dtype == \
        torch.float16


@pytest.mark.parametrize("L, S", [(3, 3), (4, 7), (17, 31)])
def test_bias_and_boolean_mask_give_same_attention(rng, L, S):
    q, k, v = (torch.from_numpy(rng.standard_normal((2, n, 5))) for n in (L, S, S))
    allowed = torch.from_numpy(rng.random((2, L, S)) < 0.6)
    allowed[..., 0] = True  # no empty rows: torch's fused kernel and the bias agree
    bias = mask_to_bias(allowed, dtype=torch.float64)
    ref = reference_attention(q.numpy(), k.numpy(), v.numpy(), allowed.numpy())
    for mask in (allowed, bias):
        out = attnlib.scaled_dot_product_attention(q, k, v, mask)
        np.testing.assert_allclose(out.numpy(), ref, atol=1e-12)
        np.testing.assert_allclose(F.scaled_dot_product_attention(q, k, v, mask).numpy(),
                                   ref, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_to_mask_round_trip(rng, backend):
    m = to_backend(rng.random((2, 1, 3, 4)) < 0.5, backend)
    back = bias_to_mask(mask_to_bias(m))
    assert _is(backend, back)
    np.testing.assert_array_equal(to_numpy(back), to_numpy(m))
    big = mask_to_bias(m, masked_value=-1e9)
    assert bool(bias_to_mask(big).all())  # -1e9 is finite: not a mask by default
    np.testing.assert_array_equal(to_numpy(bias_to_mask(big, threshold=-1e4)), to_numpy(m))


def test_bias_conversion_bad_input():
    with pytest.raises(TypeError, match="mask must be boolean"):
        mask_to_bias(np.zeros(3))
    with pytest.raises(ValueError, match="masked_value must be a negative number"):
        mask_to_bias(np.ones(3, bool), masked_value=0.0)
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        mask_to_bias(np.ones(3, bool), dtype=np.int32)
    with pytest.raises(TypeError, match="bias must have a floating dtype"):
        bias_to_mask(np.ones(3, bool))


# ---- masks from position functions -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("L, S", [(1, 1), (5, 5), (3, 8), (17, 31)])
def test_mask_from_function_two_args(backend, L, S):
    m = mask_from_function(lambda q, kv: kv <= q + (S - L), L, S, like=LIKE[backend])
    assert _is(backend, m) and tuple(m.shape) == (L, S)
    np.testing.assert_array_equal(to_numpy(m).astype(bool), causal_mask(L, S))
    w = mask_from_function(lambda q, kv: abs(q - kv) <= 1, L, S, like=LIKE[backend])
    np.testing.assert_array_equal(to_numpy(w).astype(bool),
                                  sliding_window_mask(L, S, window=1, causal=False,
                                                      align="top-left"))


def test_mask_from_function_four_args_matches_flex():
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])

    def mod(b, h, q, kv):  # causal within documents; head 1 also sees key 0
        return ((q >= kv) & (doc[q] == doc[kv])) | ((h == 1) & (kv == 0))

    ours = mask_from_function(mod, 8, B=2, H=3, like=doc)
    ref = create_mask(mod, 2, 3, 8, 8, device="cpu")
    assert ours.shape == (2, 3, 8, 8) and torch.equal(ours, ref)


def test_mask_from_function_broadcasts_and_materialises():
    m = mask_from_function(lambda q, kv: q < 2, 4, 3)  # ignores kv: shape (L, 1)
    assert m.shape == (4, 3) and m.flags.writeable
    np.testing.assert_array_equal(m, np.array([[1, 1, 1]] * 2 + [[0, 0, 0]] * 2, bool))
    assert mask_from_function(lambda q, kv: True, 2, 3).all()


def test_mask_from_function_bad_input():
    with pytest.raises(ValueError, match="2 arguments .* or 4"):
        mask_from_function(lambda q, kv, x: q, 3)
    with pytest.raises(TypeError, match="mask_mod must return booleans"):
        mask_from_function(lambda q, kv: q - kv, 3)
    with pytest.raises(ValueError, match="does not broadcast to \\(3, 3\\)"):
        mask_from_function(lambda q, kv: np.ones((2, 3), bool), 3)
    with pytest.raises(ValueError, match="B and H are only for"):
        mask_from_function(lambda q, kv: q >= kv, 3, B=2)
