"""Tests of the Triton paged decode kernel (chapter 17).

Without a GPU the kernel runs in Triton's interpreter, which must be switched on before
Triton is imported; without Triton (macOS, Windows) every test here is skipped.  Shapes
stay tiny: the interpreter runs each program's block operations in NumPy.
"""

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="Triton is not installed (it ships for Linux only)")

from attnlib.kernels import paged_triton as pt  # noqa: E402  (after TRITON_INTERPRET)
from attnlib.paged import PagedKVCache, paged_decode_attention  # noqa: E402
from conftest import reference_attention  # noqa: E402

OK, REASON = pt.available()
pytestmark = pytest.mark.skipif(not OK, reason=REASON)
DEVICE = "cpu" if pt.INTERPRETED else "cuda"


def _cache(block_size, lengths, H_kv, d_k, d_v, dtype, rng):
    """A paged cache with one sequence per length, filled in uneven chunks, plus a
    forked sequence that diverged after a copy-on-write.  Returns cache and shadows."""
    cache = PagedKVCache(48, block_size)
    shadows = {}
    for s, n in enumerate(lengths):
        k = rng.standard_normal((H_kv, n, d_k))
        v = rng.standard_normal((H_kv, n, d_v))
        cache.add_sequence(s)
        for idx in np.array_split(np.arange(n), 2):
            if len(idx):
                cache.append(s, torch.tensor(k[:, idx], dtype=dtype, device=DEVICE),
                             torch.tensor(v[:, idx], dtype=dtype, device=DEVICE))
        shadows[s] = (k, v)
    k1, v1 = rng.standard_normal((H_kv, 1, d_k)), rng.standard_normal((H_kv, 1, d_v))
    cache.fork(len(lengths) - 1, "fork")
    cache.append("fork", torch.tensor(k1, dtype=dtype, device=DEVICE),
                 torch.tensor(v1, dtype=dtype, device=DEVICE))
    k, v = shadows[len(lengths) - 1]
    shadows["fork"] = (np.concatenate([k, k1], 1), np.concatenate([v, v1], 1))
    return cache, shadows


def _reference(q, shadows, order, H_kv):
    """Float64 contiguous attention of each sequence, from the shadows: (B, H, d_v)."""
    H = q.shape[1]
    kv_heads = [h // (H // H_kv) for h in range(H)]
    rows = []
    for i, s in enumerate(order):
        k, v = shadows[s]
        rows.append(reference_attention(q[i][:, None, :], k[kv_heads], v[kv_heads])[:, 0])
    return np.stack(rows)


def _round(x, dtype):
    """The values the kernel actually sees after casting to ``dtype``, in float64."""
    return torch.tensor(x, dtype=dtype).double().numpy()


@pytest.mark.parametrize("block_size,lengths", [(1, [1, 5]), (3, [2, 7]), (4, [4, 9]),
                                                (5, [3, 11])])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_kernel_equals_contiguous_attention(block_size, lengths, dtype, atol):
    rng = np.random.default_rng(block_size)
    H_kv, H, d_k, d_v = 1, 2, 5, 3
    cache, shadows = _cache(block_size, lengths, H_kv, d_k, d_v, dtype, rng)
    order = ["fork", *range(len(lengths))]
    q = rng.standard_normal((len(order), H, d_k))
    out = pt.paged_decode_attention_triton(torch.tensor(q, dtype=dtype, device=DEVICE),
                                           cache, order)
    assert out.dtype == dtype and tuple(out.shape) == (len(order), H, d_v)
    rounded = {s: (_round(k, dtype), _round(v, dtype)) for s, (k, v) in shadows.items()}
    ref = _reference(_round(q, dtype), rounded, order, H_kv)
    np.testing.assert_allclose(out.double().cpu().numpy(), ref, atol=atol)


def test_kernel_gqa_scale_empty_sequence_and_agreement_with_the_gather_version():
    rng = np.random.default_rng(0)
    H_kv, H, d = 2, 4, 16
    cache, _ = _cache(3, [6], H_kv, d, d, torch.float32, rng)
    cache.add_sequence("empty")
    order = [0, "empty", "fork"]
    q = torch.tensor(rng.standard_normal((3, H, d)), dtype=torch.float32, device=DEVICE)
    out = pt.paged_decode_attention_triton(q, cache, order, scale=0.2)
    gathered = paged_decode_attention(q, cache, order, scale=0.2)
    torch.testing.assert_close(out, gathered, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[1].cpu(), torch.zeros(H, d))
    assert (out[0] - out[2]).abs().max() > 1e-3  # the fork's extra token matters


def test_kernel_refuses_bad_input():
    rng = np.random.default_rng(1)
    cache, _ = _cache(2, [3], 1, 4, 4, torch.float32, rng)
    q = torch.zeros(1, 2, 4, device=DEVICE)
    with pytest.raises(ValueError, match="B = len"):
        pt.paged_decode_attention_triton(q, cache, [0, "fork"])
    with pytest.raises(TypeError, match="dtype"):
        pt.paged_decode_attention_triton(q.double(), cache, [0])
    with pytest.raises(TypeError, match="PagedKVCache"):
        pt.paged_decode_attention_triton(q, None, [0])
    with pytest.raises(ValueError, match="empty"):
        pt.paged_decode_attention_triton(q, PagedKVCache(4, 2), [0])
    numpy_cache = PagedKVCache(4, 2)
    numpy_cache.add_sequence(0)
    numpy_cache.append(0, np.zeros((1, 1, 4), np.float32), np.zeros((1, 1, 4), np.float32))
    with pytest.raises(TypeError, match="torch tensors"):
        pt.paged_decode_attention_triton(q, numpy_cache, [0])
