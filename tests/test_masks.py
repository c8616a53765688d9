"""attnlib.masks: causal masks in both alignments and padding masks."""

import numpy as np
import pytest
import torch
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import attnlib


@pytest.mark.parametrize("L, S", [(1, 1), (3, 3), (2, 5), (5, 2), (4, 7), (17, 31)])
def test_causal_mask_matches_torch_both_alignments(L, S):
    br = attnlib.causal_mask(L, S)
    tl = attnlib.causal_mask(L, S, align="top-left")
    assert br.dtype == bool and br.shape == (L, S)
    expected_br = causal_lower_right(L, S)._materialize().numpy()
    expected_tl = causal_upper_left(L, S)._materialize().numpy()
    np.testing.assert_array_equal(br, expected_br)
    np.testing.assert_array_equal(tl, expected_tl)
    np.testing.assert_array_equal(tl, np.tril(np.ones((L, S), bool)))


def test_causal_mask_follows_like():
    m = attnlib.causal_mask(3, 4, like=torch.zeros(1))
    assert isinstance(m, torch.Tensor) and m.dtype == torch.bool
    np.testing.assert_array_equal(m.numpy(), attnlib.causal_mask(3, 4))


def test_padding_mask():
    m = attnlib.padding_mask([2, 0, 3])
    assert m.shape == (3, 1, 3)
    np.testing.assert_array_equal(m[:, 0], [[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    t = attnlib.padding_mask(torch.tensor([1, 4]), 5)
    assert isinstance(t, torch.Tensor) and t.shape == (2, 1, 5)
    np.testing.assert_array_equal(t[:, 0].numpy(), [[1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])


@pytest.mark.parametrize("call, error, words", [
    (lambda: attnlib.causal_mask(-1), ValueError, "L must be a non-negative integer"),
    (lambda: attnlib.causal_mask(2, 2.5), ValueError, "S must be a non-negative integer"),
    (lambda: attnlib.causal_mask(2, align="left"), ValueError, "align must be one of"),
    (lambda: attnlib.padding_mask([1, 5], 3), ValueError, "at most S = 3"),
    (lambda: attnlib.padding_mask([1, -1]), ValueError, "non-negative"),
    (lambda: attnlib.padding_mask(np.ones((2, 2), int)), ValueError, "shape (B,)"),
    (lambda: attnlib.padding_mask(np.array([1.5])), TypeError, "lengths must hold integers"),
])
def test_mask_bad_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value)
