"""Paged decode attention as a Triton kernel (chapter 17).

One decoding step: each of B sequences has one new query per head, and its keys and
values live in the blocks of a :class:`~attnlib.paged.PagedKVCache`, scattered over the
pool in the order given by the sequence's block table.  The kernel runs **one program
per (sequence, query head)**.  A program loads its query vector, then walks the
sequence's block table: for logical block ``j`` it reads the physical block number,
loads that block's keys and values for its key/value head, and folds them into a
running softmax (the online softmax of chapter 15: a running maximum ``m``, a running
normaliser ``l`` and an accumulator of weighted values)::

    for j in range(cdiv(S, block_size)):             # logical blocks of this sequence
        block = block_table[b, j]                    # physical block in the pool
        k, v = K_pool[block, :, kv_head], V_pool[block, :, kv_head]   # (block_size, d)
        s = (k @ q) * scale, -inf past position S    # only the last block is partial
        m_new = max(m, max(s)); alpha = exp(m - m_new); p = exp(s - m_new)
        l = l * alpha + sum(p); acc = acc * alpha + p @ v; m = m_new
    out = acc / l

Nothing of size S is ever copied: unlike :func:`attnlib.paged.paged_decode_attention`,
which gathers the blocks into a padded contiguous array first, the kernel reads each
block in place.  The block size need not be a power of two: the kernel loads
``BLOCK_N = next_power_of_2(block_size)`` rows and masks the extra ones; head widths are
padded to powers of two the same way.  Query head ``h`` reads key/value head
``h // (H // H_kv)`` (grouped-query attention).

Where it runs: as :mod:`attnlib.kernels.flash_triton` (chapter 16) -- compiled on a GPU,
or on CPU tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is set
**before this module is imported**.  Without Triton (macOS, Windows) the module imports,
``HAS_TRITON`` is False and :func:`paged_decode_attention_triton` raises a
``RuntimeError`` saying why.
"""

from __future__ import annotations  # kernel annotations stay strings: no Triton needed to import

import math
from collections.abc import Hashable, Sequence
from typing import Any

from ._triton import HAS_TRITON, INTERPRETED, tl, triton
from ._triton import available as _available
from ._triton import jit as _jit

__all__ = ["HAS_TRITON", "INTERPRETED", "available", "paged_decode_attention_triton"]


def available() -> tuple[bool, str]:
    """Can the paged kernel run here?  Returns ``(ok, reason)``, the reason in words."""
    return _available("attnlib.kernels.paged_triton")


@_jit
def _paged_decode_kernel(Q, K_pool, V_pool, O, Tables, Lengths,
                         stride_qb, stride_qh, stride_kb, stride_kn, stride_kh,
                         stride_vb, stride_vn, stride_vh, stride_ob, stride_oh, stride_tb,
                         scale, group, block_size, d_k, d_v,
                         BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
                         BLOCK_DV: tl.constexpr):
    """One program: sequence b = program_id(0), query head h = program_id(1)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv_h = h // group                                   # GQA: the head's key/value head
    S = tl.load(Lengths + b)                            # positions of this sequence
    offs_n = tl.arange(0, BLOCK_N)                      # rows of a block
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_dk,
                mask=offs_dk < d_k, other=0.0).to(tl.float32)          # (BLOCK_DK,)
    m_i = tl.zeros([], dtype=tl.float32) - float("inf")  # running maximum
    l_i = tl.zeros([], dtype=tl.float32)                 # running normaliser
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)         # running sum of p * v
    for j in range(tl.cdiv(S, block_size)):
        block = tl.load(Tables + b * stride_tb + j).to(tl.int64)   # physical block
        valid = (offs_n < block_size) & (j * block_size + offs_n < S)  # (BLOCK_N,)
        k = tl.load(K_pool + block * stride_kb + kv_h * stride_kh
                    + offs_n[:, None] * stride_kn + offs_dk[None, :],
                    mask=valid[:, None] & (offs_dk[None, :] < d_k), other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale  # (BLOCK_N,)
        s = tl.where(valid, s, float("-inf"))            # the partial last block
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)                      # rescales the old state
        p = tl.exp(s - m_new)                            # (BLOCK_N,), 0 where masked
        v = tl.load(V_pool + block * stride_vb + kv_h * stride_vh
                    + offs_n[:, None] * stride_vn + offs_dv[None, :],
                    mask=valid[:, None] & (offs_dv[None, :] < d_v), other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)  # (BLOCK_DV,)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)             # an empty sequence gives zeros
    tl.store(O + b * stride_ob + h * stride_oh + offs_dv,
             out.to(O.dtype.element_ty), mask=offs_dv < d_v)


def _check(q: Any, cache: Any, seq_ids: list) -> None:
    import torch

    from ..paged import PagedKVCache

    if not isinstance(cache, PagedKVCache):
        raise TypeError(f"cache must be a PagedKVCache; got {type(cache).__name__}")
    if cache.key_pool is None:
        raise ValueError("the cache is empty: append keys and values before attending")
    if not isinstance(cache.key_pool, torch.Tensor):
        raise TypeError("the cache must hold torch tensors (append torch tensors to it); "
                        f"its pool is {type(cache.key_pool).__name__}")
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch tensor (B, H, d_k); got {type(q).__name__}")
    H_kv, d_k = cache.key_pool.shape[2], cache.key_pool.shape[3]
    if q.ndim != 3 or q.shape[0] != len(seq_ids) or q.shape[2] != d_k or q.shape[1] % H_kv:
        raise ValueError(
            f"q must be (B, H, d_k) with B = len(seq_ids) = {len(seq_ids)}, d_k = {d_k} "
            f"and H a multiple of the cache's H_kv = {H_kv}; got q {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) \
            or q.dtype != cache.key_pool.dtype:
        raise TypeError(f"q and the cache must share one dtype among float16, bfloat16 and "
                        f"float32; got q {q.dtype} and the cache {cache.key_pool.dtype}")
    if q.device != cache.key_pool.device:
        raise TypeError(f"q is on {q.device} but the cache is on {cache.key_pool.device}")
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the Triton kernel cannot run here: {reason}")
    if not INTERPRETED and q.device.type == "cpu":
        raise RuntimeError("compiled Triton kernels need GPU tensors; build the cache from "
                           "CUDA tensors, or set TRITON_INTERPRET=1 before importing "
                           "attnlib.kernels")
    if INTERPRETED and q.dtype == torch.bfloat16:
        raise TypeError("bfloat16 is not supported by the Triton interpreter (its fp32 -> "
                        "bf16 casts truncate); use float16 or float32 on the CPU")


def paged_decode_attention_triton(q: Any, cache: Any, seq_ids: Sequence[Hashable], *,
                                  scale: float | None = None) -> Any:
    """One decoding step of attention over a paged KV cache, as a Triton kernel.

    Args:
        q: the new query of each sequence, a torch tensor (B, H, d_k), float16 or
            float32 (bfloat16 on a GPU only); H a multiple of the cache's H_kv.
        cache: a :class:`~attnlib.paged.PagedKVCache` holding torch tensors on q's
            device, every sequence's new position already appended.
        seq_ids: the B sequence ids, in the order of q's rows.
        scale: multiplies the scores; default 1/sqrt(d_k).

    Returns:
        (B, H, d_v), q's dtype and device; equal to
        :func:`attnlib.paged.paged_decode_attention` (the softmax runs in float32).
    """
    import torch

    seq_ids = list(seq_ids)
    _check(q, cache, seq_ids)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    tables, lengths = cache.block_tables(seq_ids)            # (B, n_max), (B,) NumPy
    tables = torch.as_tensor(tables, dtype=torch.int32, device=q.device)
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=q.device)
    kp, vp = cache.key_pool, cache.value_pool                # (blocks, bs, H_kv, d)
    q = q if q.stride(-1) == 1 else q.contiguous()
    B, H, d_k = q.shape
    d_v = vp.shape[-1]
    out = torch.empty((B, H, d_v), dtype=q.dtype, device=q.device)  # (B, H, d_v)
    pow2 = triton.next_power_of_2
    _paged_decode_kernel[(B, H)](
        q, kp, vp, out, tables, lengths,
        q.stride(0), q.stride(1), kp.stride(0), kp.stride(1), kp.stride(2),
        vp.stride(0), vp.stride(1), vp.stride(2), out.stride(0), out.stride(1),
        tables.stride(0), float(scale), H // kp.shape[2], cache.block_size, d_k, d_v,
        BLOCK_N=pow2(cache.block_size), BLOCK_DK=pow2(d_k), BLOCK_DV=pow2(d_v))
    return out
