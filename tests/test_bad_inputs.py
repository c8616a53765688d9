"""A catalogue of bad inputs across attnlib, and its NaN/Inf policy (issue 9).

Each entry of :data:`CATALOGUE` is one malformed call: its id (``module/what-is-wrong``,
so the test ids *are* the catalogue), a callable that makes the call, the exception
type it must raise, and the substrings its message must contain: the argument's name
and the shapes or values it saw.  An entry whose call does not raise a clear error
today (it broadcasts silently, gives NaN, or raises a cryptic error from inside torch
or NumPy) is marked ``xfail(strict=True)`` with the reason; when the library is fixed
the entry passes, strict xfail turns that into a failure, and the mark must go.

The second half pins down the policy for NaN and Inf in the *data* (documented in
``chapters/front/errors.md``): attnlib never scans arrays for NaN or Inf; ``-inf`` in a
float mask means "forbidden"; a query with no allowed key gets zeros; NaN propagates.
Scalar hyper-parameters (scale, temperature, bandwidth, ...) that are NaN or Inf are
refused with ``ValueError``.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import attnlib
from attnlib import (
    backward,
    cost,
    flash,
    kv_cache,
    linear_attention,
    lookup,
    masks,
    multihead,
    paged,
    positions,
    pretrained,
    projections,
    scoring,
    smoothing,
    sparse,
)
from attnlib.nn import attention as nn_attention
from attnlib.nn import gqa as nn_gqa
from attnlib.nn import mla as nn_mla
from attnlib.nn import multihead as nn_multihead
from attnlib.nn import transformer as nn_transformer
from conftest import BACKENDS, to_backend, to_numpy

sdpa = attnlib.scaled_dot_product_attention


# ------------------------------------------------------------------------------ helpers
def a(*shape, dtype=np.float64):
    """A NumPy array of ones with the given shape (its values never matter here)."""
    return np.ones(shape, dtype=dtype)


def t(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


def b(*shape):
    return np.ones(shape, dtype=bool)


def _after_free(action: Callable[[paged.PagedKVCache], Any]):
    """A call that frees sequence 'a' of a small paged cache, then does ``action``."""
    def run():
        cache = _paged(a=3)
        cache.free("a")
        action(cache)
    return run


def _allocator_double_free():
    alloc = paged.BlockAllocator(2)
    alloc.free(alloc.allocate())
    alloc.free(0)


def _allocator_out_of_blocks():
    alloc = paged.BlockAllocator(2)
    for _ in range(3):
        alloc.allocate()


def _mla_cache_of_another_batch_size():
    layer, cache = _mla(), nn_mla.MLACache()
    layer(t(2, 3, 16), cache=cache)
    layer(t(1, 1, 16), cache=cache)


def _cache_with(*appends, capacity=None):
    cache = kv_cache.KVCache(capacity)
    for k, v in appends:
        cache.append(k, v)
    return cache


def _paged(num_blocks=4, block_size=2, **seqs):
    """A PagedKVCache holding sequences of the given lengths (H_kv = 2, d_k = d_v = 4)."""
    cache = paged.PagedKVCache(num_blocks, block_size)
    for name, n in seqs.items():
        cache.add_sequence(name)
        if n:
            cache.append(name, a(2, n, 4), a(2, n, 4))
    return cache


def _tampered_file():
    """Write a small file and return (path, the SHA-256 of different bytes)."""
    fd, path = tempfile.mkstemp(suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(b"tampered bytes")
    return path, hashlib.sha256(b"original bytes").hexdigest()


def _read_tampered():
    path, digest = _tampered_file()
    try:
        pretrained.read_verified(path, digest)
    finally:
        os.remove(path)


def _mla(**overrides):
    kw = {"kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 2,
          "v_head_dim": 4, **overrides}
    return nn_mla.MultiHeadLatentAttention(16, 2, **kw)


def _mha_w(d_model=8, width=8, d_out=8):
    """Weights for multihead.multi_head_attention: w_q, w_k, w_v, w_o."""
    return {"w_q": a(d_model, width), "w_k": a(d_model, width), "w_v": a(d_model, width),
            "w_o": a(width, d_out)}


def bad(id: str, call: Callable[[], Any], exc: type[BaseException], *needles: str,
        xfail: str | None = None):
    """One catalogue entry.  ``xfail``: why the call does not raise a clear error today."""
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(call, exc, needles, id=id, marks=marks)


# ---------------------------------------------------------------------------- catalogue
CATALOGUE = [
    # -- sdpa (chapter 3) ----------------------------------------------------------------
    bad("sdpa/q-is-1d", lambda: sdpa(a(4), a(5, 4), a(5, 2)),
        ValueError, "q must have at least 2 dimensions", "(4,)"),
    bad("sdpa/d_k-of-q-and-k-differ", lambda: sdpa(a(3, 4), a(5, 6), a(5, 2)),
        ValueError, "q and k", "(3, 4)", "(5, 6)"),
    bad("sdpa/k-and-v-lengths-differ", lambda: sdpa(a(3, 4), a(5, 4), a(6, 2)),
        ValueError, "k and v", "(5, 4)", "(6, 2)"),
    bad("sdpa/integer-q", lambda: sdpa(a(3, 4, dtype=np.int64), a(5, 4), a(5, 2)),
        TypeError, "q must have a floating dtype", "int64", "(3, 4)"),
    bad("sdpa/float32-q-with-float64-k", lambda: sdpa(a(3, 4, dtype=np.float32), a(5, 4),
                                                      a(5, 2)),
        TypeError, "q is float32", "k is float64"),
    bad("sdpa/numpy-q-with-torch-k", lambda: sdpa(a(3, 4), t(5, 4), t(5, 2)),
        TypeError, "q is a NumPy array", "k is a torch tensor"),
    bad("sdpa/torch-mask-on-numpy-arrays", lambda: sdpa(a(3, 4), a(5, 4), a(5, 2),
                                                        torch.ones(3, 5, dtype=torch.bool)),
        TypeError, "mask is a torch tensor"),
    bad("sdpa/list-instead-of-array", lambda: sdpa([[1.0] * 4] * 3, a(5, 4), a(5, 2)),
        TypeError, "q must be a NumPy array or a torch tensor", "list"),
    bad("sdpa/mask-wrong-shape", lambda: sdpa(a(3, 4), a(5, 4), a(5, 2), b(3, 4)),
        ValueError, "mask of shape (3, 4)", "(3, 5)"),
    bad("sdpa/mask-enlarges-the-output", lambda: sdpa(a(3, 4), a(5, 4), a(5, 2), b(2, 3, 5)),
        ValueError, "mask of shape (2, 3, 5)", "(3, 5)"),
    bad("sdpa/integer-mask", lambda: sdpa(a(3, 4), a(5, 4), a(5, 2),
                                          a(3, 5, dtype=np.int64)),
        TypeError, "mask must be boolean", "int64", "(3, 5)"),
    bad("sdpa/batch-dims-do-not-broadcast", lambda: sdpa(a(2, 3, 4), a(3, 5, 4), a(3, 5, 2)),
        ValueError, "q (2,)", "k (3,)"),
    bad("sdpa/scale-is-nan", lambda: sdpa(a(3, 4), a(5, 4), a(5, 2), scale=math.nan),
        ValueError, "scale", "nan"),
    bad("sdpa/scale-is-a-string", lambda: sdpa(a(3, 4), a(5, 4), a(5, 2), scale="0.5"),
        ValueError, "scale", "'0.5'"),
    bad("sdpa/causal-is-a-string", lambda: sdpa(a(3, 4), a(5, 4), a(5, 2), causal="no"),
        TypeError, "causal", "'no'"),
    bad("sdpa/empty-d_k", lambda: sdpa(a(3, 0), a(5, 0), a(5, 2)),
        ValueError, "d_k", "(3, 0)"),
    bad("sdpa/mask_scores-integer-scores",
        lambda: attnlib.mask_scores(a(3, 5, dtype=np.int64), b(3, 5)),
        TypeError, "scores must have a floating dtype", "int64"),
    # -- softmax (chapters 1, 3) -------------------------------------------------------
    bad("softmax/integer-x", lambda: attnlib.softmax(np.arange(3)),
        TypeError, "x must have a floating dtype", "int64"),
    bad("softmax/0-d-x", lambda: attnlib.softmax(np.array(1.0)),
        ValueError, "x must have at least 1 dimensions", "()"),
    bad("softmax/axis-out-of-range-numpy", lambda: attnlib.softmax(a(3, 4), axis=2),
        ValueError, "axis 2", "(3, 4)"),
    bad("softmax/axis-out-of-range-torch", lambda: attnlib.softmax(t(3, 4), axis=2),
        ValueError, "axis", "2", "(3, 4)"),
    bad("softmax/axis-is-a-float", lambda: attnlib.softmax(a(3, 4), axis=1.0),
        TypeError, "axis", "1.0"),
    bad("softmax/logsumexp-of-a-list", lambda: attnlib.logsumexp([1.0, 2.0]),
        TypeError, "x must be a NumPy array or a torch tensor", "list"),
    # -- masks (chapters 3, 8) ---------------------------------------------------------
    bad("masks/causal_mask-negative-L", lambda: masks.causal_mask(-1),
        ValueError, "L must be a non-negative integer", "-1"),
    bad("masks/causal_mask-fractional-S", lambda: masks.causal_mask(3, 2.5),
        ValueError, "S must be a non-negative integer", "2.5"),
    bad("masks/causal_mask-unknown-align", lambda: masks.causal_mask(3, align="center"),
        ValueError, "align", "'center'"),
    bad("masks/sliding_window-negative-window",
        lambda: masks.sliding_window_mask(5, window=-1),
        ValueError, "window must be a non-negative integer", "-1"),
    bad("masks/sliding_window-fractional-window",
        lambda: masks.sliding_window_mask(5, window=2.0),
        ValueError, "window", "2.0"),
    bad("masks/padding_mask-negative-length", lambda: masks.padding_mask([3, -1]),
        ValueError, "lengths must be non-negative", "[3, -1]"),
    bad("masks/padding_mask-length-above-S", lambda: masks.padding_mask([3, 7], 5),
        ValueError, "S = 5", "[3, 7]"),
    bad("masks/padding_mask-float-lengths", lambda: masks.padding_mask(np.array([1.0, 2.0])),
        TypeError, "lengths must hold integers", "float64"),
    bad("masks/key_padding_mask-2d-lengths",
        lambda: masks.key_padding_mask(a(2, 2, dtype=np.int64)),
        ValueError, "lengths must have shape (B,)", "(2, 2)"),
    bad("masks/mask_and-float-mask", lambda: masks.mask_and(b(3, 5), a(3, 5)),
        TypeError, "masks[1] must be boolean", "float64", "(3, 5)"),
    bad("masks/mask_or-shapes-do-not-broadcast", lambda: masks.mask_or(b(3, 5), b(4, 5)),
        ValueError, "masks[0] (3, 5)", "masks[1] (4, 5)"),
    bad("masks/mask_to_bias-positive-masked_value",
        lambda: masks.mask_to_bias(b(3, 5), masked_value=1.0),
        ValueError, "masked_value must be a negative number", "1.0"),
    bad("masks/mask_to_bias-nan-masked_value",
        lambda: masks.mask_to_bias(b(3, 5), masked_value=math.nan),
        ValueError, "masked_value", "nan"),
    bad("masks/mask_to_bias-integer-dtype",
        lambda: masks.mask_to_bias(b(3, 5), dtype=np.int32),
        TypeError, "dtype must be a floating dtype", "int32"),
    bad("masks/bias_to_mask-boolean-bias", lambda: masks.bias_to_mask(b(3, 5)),
        TypeError, "bias must have a floating dtype", "bool"),
    bad("masks/mask_from_function-three-arguments",
        lambda: masks.mask_from_function(lambda x, y, z: x >= y, 4),
        ValueError, "mask_mod must take 2 arguments", "3"),
    bad("masks/mask_from_function-returns-integers",
        lambda: masks.mask_from_function(lambda q, k: q - k, 4),
        TypeError, "mask_mod must return booleans", "int64"),
    # -- lookup (chapter 1) --------------------------------------------------------------
    bad("lookup/soft_lookup-zero-temperature",
        lambda: lookup.soft_lookup(a(3, 4), a(5, 4), a(5, 2), temperature=0),
        ValueError, "temperature must be a positive finite number", "0"),
    bad("lookup/soft_lookup-inf-temperature",
        lambda: lookup.soft_lookup(a(3, 4), a(5, 4), a(5, 2), temperature=math.inf),
        ValueError, "temperature", "inf"),
    bad("lookup/hard_lookup-d_k-of-q-and-k-differ",
        lambda: lookup.hard_lookup(a(3, 4), a(5, 6), a(5, 2)),
        ValueError, "q and k", "(3, 4)", "(5, 6)"),
    # -- smoothing (chapter 2) -----------------------------------------------------------
    bad("smoothing/zero-bandwidth",
        lambda: smoothing.nadaraya_watson(a(3), a(5), a(5), bandwidth=0),
        ValueError, "bandwidth must be a positive finite number", "0"),
    bad("smoothing/unknown-kernel",
        lambda: smoothing.nadaraya_watson(a(3), a(5), a(5), kernel="cosine"),
        ValueError, "kernel", "'cosine'"),
    bad("smoothing/x_train-and-y_train-lengths-differ",
        lambda: smoothing.nadaraya_watson(a(3), a(5), a(6)),
        ValueError, "x_train and y_train", "(5,)", "(6,)"),
    bad("smoothing/integer-x_query",
        lambda: smoothing.nadaraya_watson(a(3, dtype=np.int64), a(5), a(5)),
        TypeError, "x_query must have a floating dtype", "int64"),
    bad("smoothing/input-widths-differ",
        lambda: smoothing.kernel_scores(a(3, 2), a(5, 3)),
        ValueError, "x_query and x_train", "(3, 2)", "(5, 3)"),
    # -- scoring (chapter 5) -------------------------------------------------------------
    bad("scoring/bilinear-w-wrong-shape",
        lambda: scoring.bilinear_scores(a(3, 4), a(5, 6), a(6, 4)),
        ValueError, "w must have shape", "(4, 6)", "(6, 4)"),
    bad("scoring/additive-v_a-wrong-shape",
        lambda: scoring.additive_scores(a(3, 4), a(5, 6), a(4, 7), a(6, 7), a(8)),
        ValueError, "v_a must have shape", "(7,)", "(8,)"),
    bad("scoring/cosine-zero-temperature",
        lambda: scoring.cosine_scores(a(3, 4), a(5, 4), temperature=0.0),
        ValueError, "temperature must be a positive finite number", "0.0"),
    bad("scoring/cosine-temperature-is-a-vector",
        lambda: scoring.cosine_scores(a(3, 4), a(5, 4), temperature=a(2)),
        ValueError, "temperature must be a number or a 0-d array", "(2,)"),
    bad("scoring/attend-v-has-wrong-S", lambda: scoring.attend(a(3, 5), a(4, 2)),
        ValueError, "v must have S", "(3, 5)", "(4, 2)"),
    # -- backward (chapter 4) ------------------------------------------------------------
    bad("backward/softmax_backward-shapes-differ",
        lambda: backward.softmax_backward(a(3, 5), a(3, 4)),
        ValueError, "weights and grad_weights", "(3, 5)", "(3, 4)"),
    bad("backward/sdpa_backward-grad_out-wrong-shape",
        lambda: backward.sdpa_backward(a(3, 4), a(5, 4), a(5, 2), a(3, 3)),
        ValueError, "grad_out must have the shape", "(3, 2)", "(3, 3)"),
    bad("backward/sdpa_backward-weights-wrong-shape",
        lambda: backward.sdpa_backward(a(3, 4), a(5, 4), a(5, 2), a(3, 2), weights=a(3, 4)),
        ValueError, "weights must have shape", "(3, 5)", "(3, 4)"),
    bad("backward/sdpa_backward-integer-grad_out",
        lambda: backward.sdpa_backward(a(3, 4), a(5, 4), a(5, 2), a(3, 2, dtype=np.int64)),
        TypeError, "grad_out must have a floating dtype", "int64"),
    # -- projections (chapter 6) ---------------------------------------------------------
    bad("projections/project-widths-differ",
        lambda: projections.project(a(3, 4), a(5, 2)),
        ValueError, "x has last dimension 4", "(3, 4)", "(5, 2)"),
    bad("projections/project-w-is-3d", lambda: projections.project(a(3, 4), a(4, 2, 1)),
        ValueError, "w must be a matrix", "(4, 2, 1)"),
    bad("projections/attention_layer-w_q-rows-differ-from-d_model",
        lambda: projections.attention_layer(a(3, 4), a(5, 2), a(4, 2), a(4, 2)),
        ValueError, "w_q must have d_model", "(5, 2)", "(3, 4)"),
    bad("projections/attention_layer-w_q-and-w_k-widths-differ",
        lambda: projections.attention_layer(a(3, 4), a(4, 2), a(4, 3), a(4, 2)),
        ValueError, "w_q and w_k", "(4, 2)", "(4, 3)"),
    bad("projections/attention_layer-b_v-wrong-shape",
        lambda: projections.attention_layer(a(3, 4), a(4, 2), a(4, 2), a(4, 2), b_v=a(3)),
        ValueError, "b_v must have shape (2,)", "(3,)"),
    bad("projections/qk_score_flops-zero-L",
        lambda: projections.qk_score_flops(0, 5, 8, 4),
        ValueError, "L must be a positive integer", "0"),
    # -- multihead (chapter 7) -----------------------------------------------------------
    bad("multihead/split_heads-n_heads-does-not-divide-width",
        lambda: multihead.split_heads(a(3, 10), 3),
        ValueError, "n_heads = 3", "(3, 10)"),
    bad("multihead/split_heads-zero-heads", lambda: multihead.split_heads(a(3, 10), 0),
        ValueError, "n_heads must be a positive integer", "0"),
    bad("multihead/merge_heads-2d", lambda: multihead.merge_heads(a(3, 4)),
        ValueError, "x must have at least 3 dimensions", "(3, 4)"),
    bad("multihead/w_q-width-not-divisible-by-n_heads",
        lambda: multihead.multi_head_attention(
            a(3, 8), a(5, 8), a(5, 8), a(8, 9), a(8, 9), a(8, 8), a(8, 8), n_heads=2),
        ValueError, "n_heads = 2", "w_q", "(8, 9)"),
    bad("multihead/mask-without-head-axis",
        lambda: multihead.multi_head_attention(
            a(3, 4, 8), a(3, 4, 8), a(3, 4, 8), **_mha_w(), n_heads=2, mask=b(3, 4, 4)),
        ValueError, "mask of shape (3, 4, 4)", "(3, 2, 4, 4)", "mask[:, None]"),
    bad("multihead/key-and-value-lengths-differ",
        lambda: multihead.multi_head_attention(a(3, 8), a(5, 8), a(6, 8), **_mha_w(),
                                               n_heads=2),
        ValueError, "key and value", "(5, 8)", "(6, 8)"),
    bad("nn.multihead/n_heads-does-not-divide-d_model",
        lambda: nn_multihead.MultiHeadAttention(10, 3),
        ValueError, "n_heads = 3", "d_model = 10"),
    bad("nn.multihead/query-has-wrong-width",
        lambda: nn_multihead.MultiHeadAttention(8, 2)(t(2, 3, 7)),
        ValueError, "query", "(2, 3, 7)", "8",
        xfail="the message names the weight w_q ('w_q must have shape (7, width)'), not "
              "the argument query, nor the module's d_model = 8"),
    bad("nn.multihead/float64-query-in-float32-module",
        lambda: nn_multihead.MultiHeadAttention(8, 2)(t(2, 3, 8, dtype=torch.float64)),
        TypeError, "query is torch.float64", "torch.float32"),
    bad("nn.multihead/numpy-query", lambda: nn_multihead.MultiHeadAttention(8, 2)(
        a(2, 3, 8, dtype=np.float32)),
        TypeError, "query is a NumPy array"),
    bad("nn.multihead/key_lengths-wrong-length",
        lambda: nn_multihead.MultiHeadAttention(8, 2)(t(2, 3, 8),
                                                      key_lengths=torch.tensor([1, 2, 3])),
        ValueError, "key_lengths", "(3,)",
        xfail="the message is about the mask built from it ('mask of shape (3, 1, 1, 3) "
              "does not broadcast ...'), not about key_lengths"),
    bad("nn.multihead/key_lengths-beyond-S",
        lambda: nn_multihead.MultiHeadAttention(8, 2)(t(2, 3, 8),
                                                      key_lengths=torch.tensor([1, 5])),
        ValueError, "lengths", "S = 3", "[1, 5]"),
    bad("nn.multihead/negative-kdim", lambda: nn_multihead.MultiHeadAttention(8, 2, kdim=-1),
        ValueError, "kdim", "-1",
        xfail="kdim/vdim are not checked: torch raises 'Trying to create tensor with "
              "negative dimension' from nn.Linear, without the argument's name"),
    # -- nn.attention (chapter 6) --------------------------------------------------------
    bad("nn.attention/zero-d_k", lambda: nn_attention.Attention(8, 0),
        ValueError, "d_k must be a positive integer", "0"),
    bad("nn.attention/x-has-wrong-width", lambda: nn_attention.Attention(8, 4)(t(2, 3, 7)),
        ValueError, "x must have shape", "d_model = 8", "(2, 3, 7)"),
    bad("nn.attention/tied_qk-with-other-context-width",
        lambda: nn_attention.Attention(8, 4, d_kv_in=6, tied_qk=True),
        ValueError, "tied_qk=True", "d_model=8", "d_kv_in=6"),
    # -- nn.gqa (chapter 12) -------------------------------------------------------------
    bad("nn.gqa/n_kv_heads-does-not-divide-n_heads",
        lambda: nn_gqa.GroupedQueryAttention(16, 4, 3),
        ValueError, "n_kv_heads = 3", "n_heads = 4"),
    bad("nn.gqa/n_heads-does-not-divide-d_model",
        lambda: nn_gqa.GroupedQueryAttention(10, 4),
        ValueError, "n_heads = 4", "d_model = 10"),
    bad("nn.gqa/rope-with-odd-head_dim",
        lambda: nn_gqa.GroupedQueryAttention(12, 4, rope=True),
        ValueError, "head_dim must be even", "3"),
    bad("nn.gqa/rope_base-below-one",
        lambda: nn_gqa.GroupedQueryAttention(8, 2, rope=True, rope_base=0.5),
        ValueError, "rope_base", "0.5"),
    bad("nn.gqa/float64-x-in-float32-module",
        lambda: nn_gqa.GroupedQueryAttention(8, 2)(t(1, 3, 8, dtype=torch.float64)),
        TypeError, "x", "torch.float64", "torch.float32"),
    bad("nn.gqa/numpy-x",
        lambda: nn_gqa.GroupedQueryAttention(8, 2)(a(1, 3, 8, dtype=np.float32)),
        TypeError, "x must be a", "ndarray"),
    bad("nn.gqa/function-H_kv-does-not-divide-H",
        lambda: nn_gqa.grouped_query_attention(a(4, 3, 2), a(3, 5, 2), a(3, 5, 2)),
        ValueError, "H_kv = 3", "H = 4", "(4, 3, 2)", "(3, 5, 2)"),
    bad("nn.gqa/repeat_kv-zero-repeats", lambda: nn_gqa.repeat_kv(a(2, 3, 5, 4), 0),
        ValueError, "n_rep must be a positive integer", "0"),
    bad("nn.gqa/mha_to_gqa-n_kv_heads-does-not-divide-n_heads",
        lambda: nn_gqa.mha_to_gqa(nn_multihead.MultiHeadAttention(8, 4), 3),
        ValueError, "n_kv_heads = 3", "n_heads = 4"),
    bad("nn.gqa/forward-2d-x", lambda: nn_gqa.GroupedQueryAttention(8, 2)(t(3, 8)),
        ValueError, "x must be a tensor of shape (B, L, d_model = 8)", "(3, 8)"),
    # -- nn.mla (chapter 13) -------------------------------------------------------------
    bad("nn.mla/odd-qk_rope_head_dim", lambda: _mla(qk_rope_head_dim=3),
        ValueError, "qk_rope_head_dim must be even", "3"),
    bad("nn.mla/zero-kv_lora_rank", lambda: _mla(kv_lora_rank=0),
        ValueError, "kv_lora_rank must be a positive integer", "0"),
    bad("nn.mla/negative-q_lora_rank", lambda: _mla(q_lora_rank=-1),
        ValueError, "q_lora_rank must be a positive integer", "-1"),
    bad("nn.mla/rope_base-one", lambda: _mla(rope_base=1.0),
        ValueError, "rope_base must be a finite number > 1", "1.0"),
    bad("nn.mla/unknown-path", lambda: _mla()(t(1, 3, 16), path="fast"),
        ValueError, "path", "'fast'"),
    bad("nn.mla/x-has-wrong-width", lambda: _mla()(t(1, 3, 15)),
        ValueError, "x must be a tensor (B, L, d_model = 16)", "(1, 3, 15)"),
    bad("nn.mla/float64-x-in-float32-module", lambda: _mla()(t(1, 3, 16, dtype=torch.float64)),
        TypeError, "x", "torch.float64", "torch.float32"),
    bad("nn.mla/numpy-x", lambda: _mla()(a(1, 3, 16, dtype=np.float32)),
        TypeError, "x must be a", "ndarray"),
    bad("nn.mla/cache-holds-another-batch-size", _mla_cache_of_another_batch_size,
        ValueError, "batch size 2", "(1, 1, 16)"),
    bad("nn.mla/cache-is-a-KVCache", lambda: _mla()(t(1, 3, 16), cache=kv_cache.KVCache()),
        TypeError, "cache must be an MLACache", "KVCache"),
    # -- positions (chapter 9) -----------------------------------------------------------
    bad("positions/apply_rope-odd-d", lambda: positions.apply_rope(a(3, 5)),
        ValueError, "the last dimension d of x must be even", "5"),
    bad("positions/apply_rope-unknown-pairing",
        lambda: positions.apply_rope(a(3, 4), pairing="half"),
        ValueError, "pairing", "'half'"),
    bad("positions/apply_rope-positions-wrong-length",
        lambda: positions.apply_rope(a(3, 4), np.arange(4)),
        ValueError, "positions must have L = 3", "(4,)"),
    bad("positions/sinusoidal-odd-d_model", lambda: positions.sinusoidal_positions(4, 7),
        ValueError, "d_model must be even", "7"),
    bad("positions/sinusoidal-2d-positions",
        lambda: positions.sinusoidal_positions(a(2, 2), 4),
        ValueError, "positions must be an int n or a 1-D array", "(2, 2)"),
    bad("positions/alibi-zero-heads", lambda: positions.alibi_slopes(0),
        ValueError, "n_heads must be an integer >= 1", "0"),
    bad("positions/rope_frequencies-base-one", lambda: positions.rope_frequencies(4, base=1),
        ValueError, "base must be a finite number > 1", "1"),
    # -- kv_cache (chapter 11) -----------------------------------------------------------
    bad("kv_cache/append-to-a-full-cache",
        lambda: _cache_with((a(1, 3, 2), a(1, 3, 2)), capacity=4).append(a(1, 2, 2),
                                                                         a(1, 2, 2)),
        ValueError, "KVCache is full", "capacity = 4", "holds 3", "L = 2"),
    bad("kv_cache/zero-capacity", lambda: kv_cache.KVCache(0),
        ValueError, "capacity must be an integer >= 1", "0"),
    bad("kv_cache/append-another-head-count",
        lambda: _cache_with((a(2, 3, 4), a(2, 3, 4))).append(a(3, 1, 4), a(3, 1, 4)),
        ValueError, "(2, 'L', 4)", "(3, 1, 4)"),
    bad("kv_cache/append-another-dtype",
        lambda: _cache_with((a(2, 3, 4), a(2, 3, 4))).append(
            a(2, 1, 4, dtype=np.float32), a(2, 1, 4, dtype=np.float32)),
        TypeError, "this cache holds float64", "float32"),
    bad("kv_cache/k-and-v-lengths-differ",
        lambda: kv_cache.KVCache().append(a(2, 3, 4), a(2, 2, 4)),
        ValueError, "k and v", "(2, 3, 4)", "(2, 2, 4)"),
    bad("kv_cache/crop-beyond-length",
        lambda: _cache_with((a(2, 3, 4), a(2, 3, 4))).crop(5),
        ValueError, "length = 5", "only 3"),
    bad("kv_cache/bytes_per_token-both-kinds",
        lambda: kv_cache.kv_cache_bytes_per_token(n_layers=2, n_kv_heads=2, head_dim=4,
                                                  kv_lora_rank=8, rope_head_dim=2),
        ValueError, "n_kv_heads=2", "kv_lora_rank=8"),
    bad("kv_cache/MLACache-2d-latent", lambda: nn_mla.MLACache().update(t(3, 4), t(3, 2)),
        ValueError, "latent must have shape (B, L, d_c)", "(3, 4)"),
    # -- sparse (chapter 14) -------------------------------------------------------------
    bad("sparse/dilated_window-negative-window",
        lambda: sparse.dilated_window_mask(6, window=-1),
        ValueError, "window must be a non-negative integer", "-1"),
    bad("sparse/dilated_window-zero-dilation",
        lambda: sparse.dilated_window_mask(6, window=2, dilation=0),
        ValueError, "dilation", "0"),
    bad("sparse/strided-zero-stride", lambda: sparse.strided_mask(6, stride=0),
        ValueError, "stride", "0"),
    bad("sparse/fixed-c-above-stride", lambda: sparse.fixed_mask(6, stride=2, c=3),
        ValueError, "c must be at most stride = 2", "c = 3"),
    bad("sparse/global-token-beyond-S", lambda: sparse.global_mask(4, tokens=[0, 4]),
        ValueError, "tokens must be key positions below S = 4", "[0, 4]"),
    bad("sparse/random_block-zero-block_size",
        lambda: sparse.random_block_mask(6, block_size=0, n_random=1),
        ValueError, "block_size", "0"),
    bad("sparse/block_layout-zero-block_size", lambda: sparse.block_layout(b(4, 4), 0),
        ValueError, "block_size", "0"),
    bad("sparse/block_layout-float-mask", lambda: sparse.block_layout(a(4, 4), 2),
        TypeError, "mask must be boolean", "float64"),
    bad("sparse/block_layout-3d-mask", lambda: sparse.block_layout(b(2, 4, 4), 2),
        ValueError, "mask must have shape (L, S)", "(2, 4, 4)"),
    bad("sparse/block_sparse-zero-block_size",
        lambda: sparse.block_sparse_attention(a(3, 4), a(5, 4), a(5, 2), b(3, 5), 0),
        ValueError, "block_size", "0"),
    bad("sparse/block_sparse-missing-block_size",
        lambda: sparse.block_sparse_attention(a(3, 4), a(5, 4), a(5, 2), b(3, 5)),
        ValueError, "block_size is required"),
    bad("sparse/block_sparse-mask-wrong-shape",
        lambda: sparse.block_sparse_attention(a(3, 4), a(5, 4), a(5, 2), b(3, 4), 2),
        ValueError, "mask must have shape (L, S) = (3, 5)", "(3, 4)"),
    # -- linear_attention (chapter 14) ---------------------------------------------------
    bad("linear/random_features-zero-features",
        lambda: linear_attention.positive_random_features(4, 0),
        ValueError, "n_features must be a positive integer", "0"),
    bad("linear/random_features-input-wrong-d_k",
        lambda: linear_attention.positive_random_features(4, 8)(a(3, 5)),
        ValueError, "d_k = 4", "(3, 5)"),
    bad("linear/feature_map-not-callable",
        lambda: linear_attention.linear_attention(a(3, 4), a(5, 4), a(5, 2),
                                                  feature_map="elu"),
        TypeError, "feature_map must be a function", "str"),
    bad("linear/recurrent-L-differs-from-S",
        lambda: linear_attention.linear_attention_recurrent(a(3, 4), a(5, 4), a(5, 2)),
        ValueError, "L = S", "(3, 4)", "(5, 4)"),
    bad("linear/recurrent-state-wrong-shape",
        lambda: linear_attention.linear_attention_recurrent(
            a(3, 4), a(3, 4), a(3, 2), state=linear_attention.LinearAttentionState(
                a(4, 3), a(4))),
        ValueError, "state must hold kv", "(4, 3)"),
    bad("linear/kernel_weights-float-mask",
        lambda: linear_attention.kernel_attention_weights(a(3, 4), a(5, 4), a(3, 5)),
        TypeError, "mask must be boolean", "float64"),
    bad("linear/d_k-of-q-and-k-differ",
        lambda: linear_attention.linear_attention(a(3, 4), a(5, 6), a(5, 2)),
        ValueError, "q and k", "(3, 4)", "(5, 6)"),
    # -- flash (chapter 15) --------------------------------------------------------------
    bad("flash/zero-block_q",
        lambda: flash.flash_attention_forward(a(3, 4), a(5, 4), a(5, 2), block_q=0),
        ValueError, "block_q must be a positive integer", "0"),
    bad("flash/zero-block_k",
        lambda: flash.flash_attention_forward(a(3, 4), a(5, 4), a(5, 2), block_k=0),
        ValueError, "block_k must be a positive integer", "0"),
    bad("flash/online_softmax-zero-block", lambda: flash.online_softmax(a(3, 4), 0),
        ValueError, "block must be a positive integer", "0"),
    bad("flash/tile_schedule-zero-block_k",
        lambda: flash.tile_schedule(4, block_q=2, block_k=0),
        ValueError, "block_k must be a positive integer", "0"),
    bad("flash/tile_schedule-negative-key_lengths",
        lambda: flash.tile_schedule(4, block_q=2, block_k=2, key_lengths=[-3]),
        ValueError, "key_lengths", "-3"),
    bad("flash/empty-d_k", lambda: flash.flash_attention_forward(a(3, 0), a(5, 0), a(5, 2)),
        ValueError, "d_k", "(3, 0)"),
    bad("flash/traffic-fast-memory-too-small",
        lambda: flash.flash_attention_traffic(16, 8, 10),
        ValueError, "M (fast memory, in elements) must be at least 4 d = 32", "M = 10"),
    bad("flash/key_lengths-wrong-shape",
        lambda: flash.flash_attention_forward(a(2, 3, 4), a(2, 5, 4), a(2, 5, 2),
                                              key_lengths=[1, 2, 3]),
        ValueError, "key_lengths must have shape (B,) = (2,)", "(3,)"),
    bad("flash/key_lengths-beyond-S",
        lambda: flash.flash_attention_forward(a(2, 3, 4), a(2, 5, 4), a(2, 5, 2),
                                              key_lengths=[1, 6]),
        ValueError, "key_lengths must lie in 0..S = 0..5", "[1, 6]"),
    bad("flash/key_lengths-float",
        lambda: flash.flash_attention_forward(a(2, 3, 4), a(2, 5, 4), a(2, 5, 2),
                                              key_lengths=np.array([1.0, 2.0])),
        TypeError, "key_lengths must hold integers", "float64"),
    bad("flash/causal-is-a-string",
        lambda: flash.flash_attention_forward(a(3, 4), a(5, 4), a(5, 2), causal="yes"),
        TypeError, "causal must be True or False", "'yes'"),
    bad("flash/backward-lse-wrong-shape",
        lambda: flash.flash_attention_backward(a(3, 4), a(5, 4), a(5, 2), a(3, 2), a(4),
                                               a(3, 2)),
        ValueError, "lse must have shape (3,)", "(4,)"),
    bad("flash/online_softmax_weighted_sum-S-differs",
        lambda: flash.online_softmax_weighted_sum(a(3, 5), a(4, 2), 2),
        ValueError, "must agree on S", "(3, 5)", "(4, 2)"),
    # -- paged (chapter 17) --------------------------------------------------------------
    bad("paged/allocator-zero-blocks", lambda: paged.BlockAllocator(0),
        ValueError, "num_blocks must be an integer >= 1", "0"),
    bad("paged/allocator-double-free", _allocator_double_free,
        ValueError, "block 0 is already free", "double free"),
    bad("paged/allocator-out-of-blocks", _allocator_out_of_blocks,
        paged.OutOfBlocksError, "all 2 blocks"),
    bad("paged/allocator-incref-a-free-block", lambda: paged.BlockAllocator(2).incref(1),
        ValueError, "cannot incref block 1", "free"),
    bad("paged/allocator-block-out-of-range", lambda: paged.BlockAllocator(2).free(5),
        ValueError, "block must be an integer in [0, 2)", "5"),
    bad("paged/zero-block_size", lambda: paged.PagedKVCache(4, 0),
        ValueError, "block_size must be an integer >= 1", "0"),
    bad("paged/append-to-a-freed-sequence",
        _after_free(lambda c: c.append("a", a(2, 1, 4), a(2, 1, 4))),
        KeyError, "sequence 'a' was freed"),
    bad("paged/append-to-an-unknown-sequence",
        lambda: _paged(a=3).append("zz", a(2, 1, 4), a(2, 1, 4)),
        KeyError, "unknown sequence 'zz'", "['a']"),
    bad("paged/free-a-sequence-twice", _after_free(lambda c: c.free("a")),
        KeyError, "sequence 'a' was freed"),
    bad("paged/fork-a-freed-sequence", _after_free(lambda c: c.fork("a", "b")),
        KeyError, "sequence 'a' was freed"),
    bad("paged/out-of-blocks-on-append",
        lambda: _paged(num_blocks=2, block_size=4, a=0).append("a", a(2, 9, 4), a(2, 9, 4)),
        paged.OutOfBlocksError, "L = 9", "needs 3 new blocks", "only 2"),
    bad("paged/add-an-existing-sequence", lambda: _paged(a=1).add_sequence("a"),
        ValueError, "sequence 'a' already exists"),
    bad("paged/fork-into-an-existing-sequence", lambda: _paged(a=1, b=1).fork("a", "b"),
        ValueError, "cannot fork into sequence 'b'"),
    bad("paged/unhashable-seq_id", lambda: _paged().add_sequence(["a"]),
        TypeError, "seq_id", "list"),
    bad("paged/append-2d-k", lambda: _paged(a=0).append("a", a(3, 4), a(3, 4)),
        ValueError, "k must have at least 3 dimensions", "(H_kv, L, d_k)", "(3, 4)"),
    bad("paged/append-another-head-count",
        lambda: _paged(a=1).append("a", a(3, 1, 4), a(3, 1, 4)),
        ValueError, "this cache holds keys (2, L, 4)", "(3, 1, 4)"),
    bad("paged/append-another-dtype",
        lambda: _paged(a=1).append("a", a(2, 1, 4, dtype=np.float32),
                                   a(2, 1, 4, dtype=np.float32)),
        TypeError, "this cache holds float64", "float32"),
    bad("paged/decode-with-a-dict-as-cache",
        lambda: paged.paged_decode_attention(a(1, 2, 4), {}, ["a"]),
        TypeError, "cache must be a PagedKVCache", "dict"),
    bad("paged/decode-q-batch-differs-from-seq_ids",
        lambda: paged.paged_decode_attention(a(2, 2, 4), _paged(a=3), ["a"]),
        ValueError, "len(seq_ids) = 1", "(2, 2, 4)"),
    bad("paged/decode-on-an-empty-cache",
        lambda: paged.paged_decode_attention(a(1, 2, 4), _paged(a=0), ["a"]),
        ValueError, "the cache is empty"),
    # -- pretrained (chapter 18) ---------------------------------------------------------
    bad("pretrained/read_verified-tampered-file", _read_tampered,
        ValueError, "SHA-256 mismatch", hashlib.sha256(b"original bytes").hexdigest(),
        hashlib.sha256(b"tampered bytes").hexdigest()),
    bad("pretrained/read_verified-short-digest",
        lambda: pretrained.read_verified("unused", "abc"),
        ValueError, "expected_sha256 must be a 64-character hex digest", "'abc'"),
    bad("pretrained/mean_pool-2d-hidden", lambda: pretrained.mean_pool(a(3, 4)),
        ValueError, "hidden must have at least 3 dimensions", "(3, 4)"),
    bad("pretrained/attention_rollout-layers-differ",
        lambda: pretrained.attention_rollout([a(2, 3, 3), a(2, 4, 4)]),
        ValueError, "attentions[1]", "(2, 3, 3)", "(2, 4, 4)"),
    bad("pretrained/rank_correlation-constant-input",
        lambda: pretrained.rank_correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]),
        ValueError, "constant"),
    # -- cost (chapter 3) ----------------------------------------------------------------
    bad("cost/bytes_per_element-None", lambda: cost.bytes_per_element(None),
        TypeError, "dtype must name a NumPy or torch dtype", "None"),
    bad("cost/attention_flops-zero-L", lambda: cost.attention_flops(0, 5, 4, 4),
        ValueError, "L must be a positive integer", "0"),
    # -- nn.transformer (chapters 9, 10) -------------------------------------------------
    bad("nn.transformer/unknown-positions",
        lambda: nn_transformer.TinyTransformer(10, 8, 2, 1, positions="rope"),
        ValueError, "positions must be one of", "'rope'"),
    bad("nn.transformer/n_heads-does-not-divide-d_model",
        lambda: nn_transformer.TinyTransformer(10, 10, 3, 1),
        ValueError, "n_heads = 3", "d_model = 10"),
    bad("nn.transformer/float-tokens",
        lambda: nn_transformer.TinyTransformer(10, 8, 2, 1)(t(2, 3)),
        TypeError, "tokens must be an integer torch tensor", "torch.float32"),
    bad("nn.transformer/token-id-beyond-vocab_size",
        lambda: nn_transformer.TinyTransformer(10, 8, 2, 1)(torch.tensor([[3, 10]])),
        ValueError, "tokens", "vocab_size = 10"),
    bad("nn.transformer/negative-n_layers",
        lambda: nn_transformer.TinyTransformer(10, 8, 2, -1),
        ValueError, "n_layers", "-1"),
    bad("nn.transformer/sequence-longer-than-max_len",
        lambda: nn_transformer.TinyTransformer(10, 8, 2, 1, max_len=4)(
            torch.zeros(1, 5, dtype=torch.long)),
        ValueError, "n = 5", "max_len = 4"),
    bad("nn.transformer/learned-positions-beyond-max_len",
        lambda: nn_transformer.LearnedPositionEmbedding(4, 8)(2, offset=3),
        ValueError, "positions 3 .. 4", "max_len = 4"),
    bad("nn.transformer/ablate-head-out-of-range",
        lambda: nn_transformer.ablate_heads(nn_transformer.TinyTransformer(10, 8, 2, 1),
                                            [(0, 2)]).__enter__(),
        ValueError, "head must be in 0 .. 1", "2"),
    bad("nn.transformer/ablate-layer-out-of-range",
        lambda: nn_transformer.ablate_heads(nn_transformer.TinyTransformer(10, 8, 2, 1),
                                            [(3, 0)]).__enter__(),
        ValueError, "layer", "3"),
]


@pytest.mark.parametrize("call, exc, needles", CATALOGUE)
def test_bad_input_raises_a_clear_error(call, exc, needles):
    with pytest.raises(exc) as info:
        call()
    # KeyError's str() is the repr of its argument; read the message itself
    message = info.value.args[0] if info.value.args else ""
    message = message if isinstance(message, str) else str(info.value)
    missing = [n for n in needles if n not in message]
    assert not missing, f"the message lacks {missing}: {message!r}"


def test_the_catalogue_is_large_and_spans_the_api():
    ids = [p.id for p in CATALOGUE]
    assert len(ids) >= 30, f"the issue asks for at least 30 bad inputs; got {len(ids)}"
    assert len(set(ids)) == len(ids), "catalogue ids must be unique"
    modules = {i.split("/")[0] for i in ids}
    wanted = {"sdpa", "softmax", "masks", "lookup", "smoothing", "scoring", "backward",
              "projections", "multihead", "nn.multihead", "nn.attention", "nn.gqa",
              "nn.mla", "positions", "kv_cache", "sparse", "linear", "flash", "paged",
              "pretrained", "nn.transformer"}
    assert wanted <= modules, f"no bad input for {sorted(wanted - modules)}"
    topics = " ".join(ids)
    for topic in ("n_heads-does-not-divide-d_model", "n_kv_heads-does-not-divide-n_heads",
                  "negative-window", "zero-block", "full-cache", "freed-sequence",
                  "double-free", "out-of-blocks"):
        assert topic in topics, f"the issue names {topic!r}; the catalogue lacks it"


def test_flash_accepts_a_1d_mask_like_sdpa():
    """Not a bad input: a (S,) mask broadcasts to (L, S) and sdpa accepts it."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), \
        rng.standard_normal((5, 2))
    keep = np.arange(5) != 2  # (S,)
    want = sdpa(q, k, v, keep)
    got, _ = flash.flash_attention_forward(q, k, v, keep, block_q=2, block_k=2)
    np.testing.assert_allclose(got, want, atol=1e-12)


# ---------------------------------------------------------------------- NaN/Inf policy
def _qkv(backend, L=3, S=5, d_k=4, d_v=2, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(to_backend(rng.standard_normal(s), backend)
                 for s in ((L, d_k), (S, d_k), (S, d_v)))


def _attn_fns():
    """The attention functions that take (q, k, v, mask) and return (L, d_v)."""
    return {
        "sdpa": lambda q, k, v, m: sdpa(q, k, v, m),
        "flash": lambda q, k, v, m: flash.flash_attention_forward(q, k, v, m, block_q=2,
                                                                   block_k=2)[0],
        "backward.sdpa_forward": lambda q, k, v, m: backward.sdpa_forward(q, k, v, m)[0],
    }


ATTN = sorted(_attn_fns())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ATTN)
def test_minus_inf_in_a_float_mask_forbids_the_key(fn, backend):
    q, k, v = _qkv(backend)
    allowed = np.random.default_rng(1).random((3, 5)) < 0.6
    allowed[:, 0] = True
    bias = np.where(allowed, 0.0, -np.inf)
    got = _attn_fns()[fn](q, k, v, to_backend(bias, backend))
    want = _attn_fns()[fn](q, k, v, to_backend(allowed, backend))
    np.testing.assert_allclose(to_numpy(got), to_numpy(want), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ATTN)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_a_query_with_no_allowed_key_gets_zeros(fn, kind, backend):
    q, k, v = _qkv(backend)
    allowed = np.ones((3, 5), bool)
    allowed[1] = False
    mask = allowed if kind == "bool" else np.where(allowed, 0.0, -np.inf)
    out = to_numpy(_attn_fns()[fn](q, k, v, to_backend(mask, backend)))
    assert np.all(out[1] == 0.0), out
    assert np.all(np.isfinite(out))


@pytest.mark.parametrize("fn", ["sdpa", "sparse"])
def test_a_query_with_no_allowed_key_has_zero_output_and_finite_gradients(fn):
    q, k, v = (x.requires_grad_() for x in _qkv("torch"))
    allowed = torch.ones(3, 5, dtype=torch.bool)
    allowed[1] = False
    if fn == "sparse":
        out = sparse.block_sparse_attention(q, k, v, allowed, 2)
    else:
        out = sdpa(q, k, v, allowed)
    out.sum().backward()
    assert torch.all(out[1] == 0)
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert torch.all(torch.isfinite(x.grad)), name
    assert torch.all(q.grad[1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_of_minus_inf_give_zero_weights_and_lse_minus_inf(backend):
    x = to_backend(np.array([[-np.inf] * 4, [0.0, -np.inf, 1.0, 2.0]]), backend)
    w = to_numpy(attnlib.softmax(x))
    assert np.all(w[0] == 0.0) and abs(w[1].sum() - 1.0) < 1e-12
    lse = to_numpy(attnlib.logsumexp(x))
    assert lse[0] == -np.inf and np.isfinite(lse[1])
    assert np.all(to_numpy(flash.online_softmax(x, 3))[0] == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ATTN + ["sparse", "linear"])
def test_nan_in_q_propagates_to_its_row_only(fn, backend):
    """attnlib never scans the data for NaN: it propagates, and nothing is raised."""
    q, k, v = _qkv(backend)
    q_np = to_numpy(q).copy()
    q_np[1, 2] = np.nan
    q = to_backend(q_np, backend)
    if fn == "sparse":
        out = sparse.block_sparse_attention(q, k, v, None, 2)
    elif fn == "linear":
        out = linear_attention.linear_attention(q, k, v)
    else:
        out = _attn_fns()[fn](q, k, v, None)
    out = to_numpy(out)
    assert np.all(np.isnan(out[1]))
    assert np.all(np.isfinite(np.delete(out, 1, axis=0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_value_reaches_every_row_even_through_a_mask(backend):
    """A mask does not protect from NaN in v: its weight is 0, and 0 * NaN = NaN."""
    q, k, v = _qkv(backend)
    v_np = to_numpy(v).copy()
    v_np[2, 0] = np.nan
    keep = np.ones((3, 5), bool)
    keep[:, 2] = False  # key 2 is masked for every query
    out = to_numpy(sdpa(q, k, to_backend(v_np, backend), to_backend(keep, backend)))
    assert np.all(np.isnan(out[:, 0])) and np.all(np.isfinite(out[:, 1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_a_masked_key_is_harmless(backend):
    """Masked scores are replaced by -inf, so NaN in a masked key never reaches the output."""
    q, k, v = _qkv(backend)
    k_np = to_numpy(k).copy()
    k_np[2, 0] = np.nan
    keep = np.ones((3, 5), bool)
    keep[:, 2] = False
    out = to_numpy(sdpa(q, to_backend(k_np, backend), v, to_backend(keep, backend)))
    want = to_numpy(sdpa(q, k, v, to_backend(keep, backend)))
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plus_inf_in_a_float_mask_makes_that_row_nan(backend):
    q, k, v = _qkv(backend)
    bias = np.zeros((3, 5))
    bias[1, 3] = np.inf
    with np.errstate(invalid="ignore"):
        out = to_numpy(sdpa(q, k, v, to_backend(bias, backend)))
    assert np.all(np.isnan(out[1]))
    assert np.all(np.isfinite(np.delete(out, 1, axis=0)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_of_a_row_with_nan_is_all_nan(backend):
    x = to_backend(np.array([[1.0, np.nan, 2.0], [0.0, 1.0, 2.0]]), backend)
    w = to_numpy(attnlib.softmax(x))
    assert np.all(np.isnan(w[0])) and abs(w[1].sum() - 1.0) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_logsumexp_of_a_row_with_nan_is_nan(backend):
    x = to_backend(np.array([[1.0, np.nan, 2.0]]), backend)
    assert np.isnan(to_numpy(attnlib.logsumexp(x))[0])


def test_online_softmax_of_a_row_with_nan_is_all_nan():
    w = flash.online_softmax(np.array([[1.0, np.nan, 2.0]]), 2)
    assert np.all(np.isnan(w))
