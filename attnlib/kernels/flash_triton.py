"""FlashAttention forward and backward as Triton kernels (chapter 16).

The tiled algorithm of chapter 15, written as GPU programs with Triton (Tillet et al.,
2019), in the work partition of FlashAttention-2 (Dao, 2024):

* **forward** — one program per (query block, batch * head).  It keeps its block of
  queries, a running maximum ``m``, a running normaliser ``l`` and an output accumulator
  in registers, and loops over the key/value blocks with the online softmax.  It writes
  the output and the log-sum-exp ``lse = m + log(l)`` of every query row, and nothing of
  size L x S.
* **backward** — three kernels.  ``_bwd_preprocess`` computes ``D = rowsum(dO * O)``;
  ``_bwd_dkdv`` gives one program per key block, which loops over the query blocks,
  recomputes ``P = exp(S - lse)`` and accumulates dK and dV; ``_bwd_dq`` gives one
  program per query block, which loops over the key blocks and accumulates dQ.  A
  separate dQ kernel recomputes P once more, but needs no atomic additions.

Where the kernels run
---------------------
* On an NVIDIA (or AMD) GPU with Triton installed: compiled, on CUDA tensors.
* On a CPU, through Triton's interpreter, on CPU tensors — only when the environment
  variable ``TRITON_INTERPRET=1`` is set **before this module is imported**: ``@triton.jit``
  decides at definition time whether a kernel is compiled or interpreted.  The
  interpreter executes each program with NumPy, about 300 times slower than fused
  attention: use it with small shapes, to learn and to test.
* Triton ships for Linux only.  On macOS and Windows this module still imports
  (``HAS_TRITON`` is False) and :func:`flash_attention` raises a ``RuntimeError`` that
  says why.  :func:`available` tells in advance whether the kernels can run.

Masks
-----
``causal=True`` is **bottom-right aligned**, as everywhere in attnlib: query i sits at
key position S - L + i.  With L > S the first L - S queries see no key; their output is
zero (not NaN) and so are their gradients.  No other mask is supported.
"""

# Annotations stay strings (``tl.constexpr`` is not evaluated), so the kernels below can
# be defined, though never run, where Triton is missing.
from __future__ import annotations

import math
from typing import Any

import torch

from ._triton import HAS_TRITON, INTERPRETED, tl, triton
from ._triton import available as _available
from ._triton import jit as _jit

__all__ = [
    "HAS_TRITON",
    "INTERPRETED",
    "SUPPORTED_HEAD_DIMS",
    "FlashAttentionFunction",
    "available",
    "flash_attention",
    "flash_attention_forward",
]

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)


def available() -> tuple[bool, str]:
    """Can the Triton kernels run here?  Returns ``(ok, reason)``, the reason in words.

    ``ok`` is True with a CUDA/ROCm GPU, or on a CPU when ``TRITON_INTERPRET=1`` was set
    before :mod:`attnlib.kernels` was imported.  Tensors must then live on the GPU, or on
    the CPU for the interpreter.
    """
    return _available("attnlib.kernels")


# --------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------

@_jit
def _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, offs_m, offs_n, offs_d, start, end,
               stride_kn, stride_vn, S, shift, qk_scale,
               MASK_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online softmax over the key blocks [start, end) for one block of queries.

    acc (BLOCK_M, HEAD_DIM) fp32, l_i and m_i (BLOCK_M,) fp32: the running state, in
    base-2 units (scores multiplied by log2 e).  ``shift`` = S - L places query i at key
    position i + shift (bottom-right causal alignment).
    """
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n                                          # (BLOCK_N,)
        in_range = cols[None, :] < S                                     # (1, BLOCK_N)
        kT = tl.load(K_bh + cols[None, :] * stride_kn + offs_d[:, None], mask=in_range, other=0.0)
        s = tl.dot(q, kT, input_precision="ieee") * qk_scale            # (BLOCK_M, BLOCK_N)
        keep = in_range
        if MASK_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))                           # (BLOCK_M,)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)            # rows with no key yet
        p = tl.math.exp2(s - m_safe[:, None])                            # (BLOCK_M, BLOCK_N)
        alpha = tl.math.exp2(m_i - m_safe)                               # rescales the old state
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V_bh + cols[:, None] * stride_vn + offs_d[None, :], mask=cols[:, None] < S, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    return acc, l_i, m_i


@_jit
def _fwd_kernel(Q, K, V, O, LSE,
                stride_qb, stride_qh, stride_qn,
                stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn,
                stride_ob, stride_oh, stride_on,
                H, L, S, qk_scale,
                CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head).  Grid (cdiv(L, BLOCK_M), B * H)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)                                  # 64-bit: B*H*N*d may exceed 2**31
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)                             # query rows
    offs_n = tl.arange(0, BLOCK_N)                                       # key columns, block-relative
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    q = tl.load(q_ptrs, mask=offs_m[:, None] < L, other=0.0)            # (BLOCK_M, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    shift = S - L
    if CAUSAL:
        # [0, full_end): keys that every query of the block may see, in whole blocks: no mask
        full_end = tl.minimum(tl.maximum(start_m + shift + 1, 0) // BLOCK_N * BLOCK_N, S)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), S)   # beyond: all masked
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, offs_m, offs_n, offs_d,
                                   0, full_end, stride_kn, stride_vn, S, shift, qk_scale,
                                   False, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, offs_m, offs_n, offs_d,
                                   full_end, hi, stride_kn, stride_vn, S, shift, qk_scale,
                                   True, BLOCK_N)
    else:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_bh, V_bh, offs_m, offs_n, offs_d,
                                   0, S, stride_kn, stride_vn, S, shift, qk_scale,
                                   False, BLOCK_N)

    no_key = l_i == 0.0                                                  # bottom-right causal, L > S
    l_safe = tl.where(no_key, 1.0, l_i)
    out = acc / l_safe[:, None]                                          # (BLOCK_M, HEAD_DIM); 0 if no key
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) / 1.4426950408889634)  # natural log
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < L)
    tl.store(LSE + bh * L + offs_m, lse, mask=offs_m < L)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------

@_jit
def _bwd_preprocess(O, DO, Delta,
                    stride_ob, stride_oh, stride_on,
                    stride_dob, stride_doh, stride_don,
                    H, L, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """D_i = sum_d dO_id * O_id for BLOCK_M rows.  Grid (cdiv(L, BLOCK_M), B * H)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(1).to(tl.int64)                                  # 64-bit: B*H*N*d may exceed 2**31
    b, h = bh // H, bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < L
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :],
                mask=rows, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=rows, other=0.0).to(tl.float32)
    tl.store(Delta + bh * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@_jit
def _bwd_dkdv_inner(dk, dv, k, v, Q_bh, DO_bh, LSE_bh, Delta_bh, offs_m, offs_n, offs_d,
                    start, end, stride_qn, stride_don, L, shift, qk_scale,
                    MASK_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks [start, end).

    Everything is computed transposed, (BLOCK_N, BLOCK_M), so that no block needs
    ``tl.trans``: sT = K Q^T, pT = exp(sT - lse), dV += pT dO, dpT = V dO^T,
    dsT = pT * (dpT - D), dK += dsT Q.
    """
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m                                          # (BLOCK_M,)
        row_ok = rows < L
        qT = tl.load(Q_bh + rows[None, :] * stride_qn + offs_d[:, None],
                     mask=row_ok[None, :], other=0.0)                    # (HEAD_DIM, BLOCK_M)
        do = tl.load(DO_bh + rows[:, None] * stride_don + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)                    # (BLOCK_M, HEAD_DIM)
        lse = tl.load(LSE_bh + rows, mask=row_ok, other=0.0) * 1.4426950408889634       # base 2
        lse = tl.where(lse == float("-inf"), float("inf"), lse)          # a row with no key: P = 0
        delta = tl.load(Delta_bh + rows, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision="ieee") * qk_scale          # (BLOCK_N, BLOCK_M)
        keep = row_ok[None, :]
        if MASK_CAUSAL:
            keep = keep & (offs_n[:, None] <= rows[None, :] + shift)
        pT = tl.math.exp2(tl.where(keep, sT, float("-inf")) - lse[None, :])  # masked: exactly 0
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision="ieee")
        dpT = tl.dot(v, tl.trans(do), input_precision="ieee")           # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision="ieee")
    return dk, dv


@_jit
def _bwd_dkdv(Q, K, V, DO, DK, DV, LSE, Delta,
              stride_qb, stride_qh, stride_qn,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_dob, stride_doh, stride_don,
              stride_dkb, stride_dkh, stride_dkn,
              stride_dvb, stride_dvh, stride_dvn,
              H, L, S, qk_scale, scale,
              CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dK, dV for BLOCK_N keys of one (batch, head).  Grid (cdiv(S, BLOCK_N), B * H)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)                                  # 64-bit: B*H*N*d may exceed 2**31
    b, h = bh // H, bh % H
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < S
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=col_ok, other=0.0)                                  # (BLOCK_N, HEAD_DIM)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                mask=col_ok, other=0.0)
    Q_bh = Q + b * stride_qb + h * stride_qh
    DO_bh = DO + b * stride_dob + h * stride_doh
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    shift = S - L
    if CAUSAL:
        # query i sees key j when j <= i + shift: earlier query blocks see none of these keys
        lo = tl.maximum(start_n - shift, 0) // BLOCK_M * BLOCK_M
        # from `full` on, every query of a block sees every key of this block: no mask
        full = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M,
                          tl.cdiv(L, BLOCK_M) * BLOCK_M)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_bh, DO_bh, LSE + bh * L, Delta + bh * L,
                                 offs_m, offs_n, offs_d, lo, full, stride_qn, stride_don, L, shift,
                                 qk_scale, True, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_bh, DO_bh, LSE + bh * L, Delta + bh * L,
                                 offs_m, offs_n, offs_d, full, L, stride_qn, stride_don, L, shift,
                                 qk_scale, False, BLOCK_M)
    else:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_bh, DO_bh, LSE + bh * L, Delta + bh * L,
                                 offs_m, offs_n, offs_d, 0, L, stride_qn, stride_don, L, shift,
                                 qk_scale, False, BLOCK_M)
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=col_ok)


@_jit
def _bwd_dq_inner(dq, q, do, lse, delta, K_bh, V_bh, offs_m, offs_n, offs_d, start, end,
                  stride_kn, stride_vn, S, shift, qk_scale,
                  MASK_CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks [start, end):
    s = Q K^T, p = exp(s - lse), dp = dO V^T, ds = p * (dp - D), dQ += ds K."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols[None, :] < S                                     # (1, BLOCK_N)
        kT = tl.load(K_bh + cols[None, :] * stride_kn + offs_d[:, None],
                     mask=in_range, other=0.0)                           # (HEAD_DIM, BLOCK_N)
        vT = tl.load(V_bh + cols[None, :] * stride_vn + offs_d[:, None], mask=in_range, other=0.0)
        s = tl.dot(q, kT, input_precision="ieee") * qk_scale            # (BLOCK_M, BLOCK_N)
        keep = in_range
        if MASK_CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + shift)
        p = tl.math.exp2(tl.where(keep, s, float("-inf")) - lse[:, None])  # masked: exactly 0
        dp = tl.dot(do, vT, input_precision="ieee")                      # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision="ieee")
    return dq


@_jit
def _bwd_dq(Q, K, V, DO, DQ, LSE, Delta,
            stride_qb, stride_qh, stride_qn,
            stride_kb, stride_kh, stride_kn,
            stride_vb, stride_vh, stride_vn,
            stride_dob, stride_doh, stride_don,
            stride_dqb, stride_dqh, stride_dqn,
            H, L, S, qk_scale, scale,
            CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: dQ for BLOCK_M queries of one (batch, head).  Grid (cdiv(L, BLOCK_M), B * H)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)                                  # 64-bit: B*H*N*d may exceed 2**31
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < L
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)                         # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :],
                 mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + bh * L + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)              # a row with no key: P = 0
    delta = tl.load(Delta + bh * L + offs_m, mask=row_ok, other=0.0)
    K_bh = K + b * stride_kb + h * stride_kh
    V_bh = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    shift = S - L
    if CAUSAL:
        full_end = tl.minimum(tl.maximum(start_m + shift + 1, 0) // BLOCK_N * BLOCK_N, S)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), S)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K_bh, V_bh, offs_m, offs_n, offs_d, 0, full_end,
                           stride_kn, stride_vn, S, shift, qk_scale, False, BLOCK_N)
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K_bh, V_bh, offs_m, offs_n, offs_d, full_end, hi,
                           stride_kn, stride_vn, S, shift, qk_scale, True, BLOCK_N)
    else:
        dq = _bwd_dq_inner(dq, q, do, lse, delta, K_bh, V_bh, offs_m, offs_n, offs_d, 0, S,
                           stride_kn, stride_vn, S, shift, qk_scale, False, BLOCK_N)
    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

# Block sizes: (BLOCK_M, BLOCK_N) = (queries, keys) per block, for each kernel.  The
# interpreter's cost grows with the number of block operations, not their size; small
# blocks there exercise the ragged edges in tests.
_INTERPRETER_BLOCKS = {"fwd": (32, 32), "dkdv": (32, 32), "dq": (32, 32)}


# Launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner on
# a GPU, per kernel and head dim.  Each program owns a large block on its own dimension
# (queries for fwd and dq, keys for dkdv) and loops over the other, as in FlashAttention-2.
# They were chosen so that ptxas reports no register spills for sm_90 (checked without a
# GPU, by compiling to PTX and assembling it); the autotuner times them and keeps the best.
_GPU_CONFIGS = {
    "fwd": {64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 8, 3), (64, 32, 4, 4)]},
    "dkdv": {64: [(64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3), (16, 64, 4, 4)],
             128: [(32, 64, 8, 3), (16, 64, 8, 3), (32, 64, 8, 2)]},
    "dq": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
           128: [(64, 32, 8, 3), (64, 64, 8, 3), (64, 16, 4, 4)]},
}


def _gpu_configs(kind: str):
    """All configs of one kernel; ``_prune`` keeps those of the call's head dim."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for dims in sorted(_GPU_CONFIGS[kind]) for bm, bn, w, st in _GPU_CONFIGS[kind][dims]]


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        d = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
        wanted = set(_GPU_CONFIGS[kind][64 if d <= 64 else 128])
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                       c.num_stages) in wanted]
    return prune


if HAS_TRITON and not INTERPRETED:
    _KEY = ["L", "S", "HEAD_DIM", "CAUSAL"]
    _TUNED = {kind: triton.autotune(_gpu_configs(kind), key=_KEY,
                                    prune_configs_by={"early_config_prune": _pruner(kind)})(kernel)
              for kind, kernel in (("fwd", _fwd_kernel), ("dkdv", _bwd_dkdv), ("dq", _bwd_dq))}
else:
    _TUNED = {}


def _launch(kind: str, kernel, owned: int, BH: int, block_m, block_n, args, **constexprs):
    """Launch ``kernel`` on the grid (cdiv(owned, own block), B * H).

    Interpreter, or block sizes given: the plain kernel with those blocks.  GPU with no
    block sizes given: the autotuned kernel, which picks the blocks and warps itself.
    """
    own = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if block_m is None and block_n is None and not INTERPRETED:
        grid = lambda meta: (triton.cdiv(owned, meta[own]), BH)
        _TUNED[kind][grid](*args, **constexprs)
        return
    default = _INTERPRETER_BLOCKS[kind] if INTERPRETED else (64, 64)
    bm = default[0] if block_m is None else block_m
    bn = default[1] if block_n is None else block_n
    for name, value in (("block_m", bm), ("block_n", bn)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {value!r}")
    blocks = {"BLOCK_M": bm, "BLOCK_N": bn}
    kernel[(triton.cdiv(owned, blocks[own]), BH)](*args, **constexprs, **blocks)


def _strides(t) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _check_inputs(q, k, v, scale):
    ok, reason = available()
    if not ok:
        raise RuntimeError(f"the Triton kernels cannot run here: {reason}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor (B, H, N, d); got {type(t).__name__}")
        if t.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, N, d); got shape {tuple(t.shape)}")
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if q.dtype not in allowed or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype among float16, bfloat16 and float32; "
                        f"got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if len({q.device, k.device, v.device}) > 1:
        raise TypeError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    B, H, L, d = q.shape
    if k.shape[:2] != (B, H) or v.shape[:2] != (B, H):
        raise ValueError(f"q, k and v must share (B, H) (no broadcasting, no GQA); got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[-1] != d or v.shape[-1] != d or k.shape[2] != v.shape[2]:
        raise ValueError(f"k must be (B, H, S, d) and v (B, H, S, d) with q's d = {d}; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dimension d must be one of {SUPPORTED_HEAD_DIMS}; got d = {d} "
                         f"(q {tuple(q.shape)})")
    if L == 0 or k.shape[2] == 0:
        raise ValueError(f"empty sequences are not supported; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    if not INTERPRETED and q.device.type == "cpu":
        raise RuntimeError("compiled Triton kernels need GPU tensors; move q, k, v with .cuda(), "
                           "or set TRITON_INTERPRET=1 before importing attnlib.kernels")
    if INTERPRETED and q.dtype == torch.bfloat16:
        raise TypeError("bfloat16 is not supported by the Triton interpreter (its bf16 tl.dot "
                        "is wrong); use float16 or float32 on the CPU, bfloat16 on a GPU")


def _unit_last(t):
    """Pointer arithmetic assumes the last dimension is contiguous."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q, k, v, causal, scale, block_m=None, block_n=None):
    """Run the forward kernel: returns o (B, H, L, d) and lse (B, H, L) float32."""
    B, H, L, d = q.shape
    S = k.shape[2]
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    o = torch.empty_like(q)                                                # (B, H, L, d)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)    # (B, H, L)
    args = (q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, L, S, scale * LOG2E)
    _launch("fwd", _fwd_kernel, L, B * H, block_m, block_n, args, CAUSAL=causal, HEAD_DIM=d)
    return o, lse


def _backward(q, k, v, o, lse, do, causal, scale, block_m=None, block_n=None):
    """Run the three backward kernels: returns dq, dk, dv (shapes of q, k, v)."""
    B, H, L, d = q.shape
    S = k.shape[2]
    do = _unit_last(do)
    delta = torch.empty_like(lse)                                          # (B, H, L) fp32
    pre_block = 32 if INTERPRETED else 64
    _bwd_preprocess[(triton.cdiv(L, pre_block), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, L, HEAD_DIM=d, BLOCK_M=pre_block)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    common = (H, L, S, scale * LOG2E, scale)
    args = (q, k, v, do, dk, dv, lse, delta, *_strides(q), *_strides(k), *_strides(v),
            *_strides(do), *_strides(dk), *_strides(dv), *common)
    _launch("dkdv", _bwd_dkdv, S, B * H, block_m, block_n, args, CAUSAL=causal, HEAD_DIM=d)
    args = (q, k, v, do, dq, lse, delta, *_strides(q), *_strides(k), *_strides(v),
            *_strides(do), *_strides(dq), *common)
    _launch("dq", _bwd_dq, L, B * H, block_m, block_n, args, CAUSAL=causal, HEAD_DIM=d)
    return dq, dk, dv


if HAS_TRITON:
    class FlashAttentionFunction(torch.autograd.Function):
        """``torch.autograd.Function`` around the kernels: forward saves (q, k, v, o, lse)."""

        @staticmethod
        def forward(ctx, q, k, v, causal, scale, block_m, block_n):
            o, lse = _forward(q, k, v, causal, scale, block_m, block_n)
            ctx.save_for_backward(q, k, v, o, lse)
            ctx.causal, ctx.scale, ctx.blocks = causal, scale, (block_m, block_n)
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, o, lse = ctx.saved_tensors
            dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.causal, ctx.scale, *ctx.blocks)
            return dq, dk, dv, None, None, None, None
else:
    FlashAttentionFunction = None


def flash_attention(q: Any, k: Any, v: Any, *, causal: bool = False, scale: float | None = None,
                    block_m: int | None = None, block_n: int | None = None) -> Any:
    """Exact attention ``softmax(q @ k^T * scale) @ v`` by the Triton FlashAttention kernels.

    Args:
        q: queries, torch tensor (B, H, L, d).
        k: keys, (B, H, S, d).
        v: values, (B, H, S, d).  One dtype for all three: float16 or float32 (and
            bfloat16 on a GPU); d in 16, 32, 64, 128; no broadcasting.  Any strides
            (e.g. a transposed (B, L, H, d) view) as long as d is contiguous.
        causal: forbid future keys, **bottom-right aligned** as in attnlib: query i sits at
            key position S - L + i.  A query that sees no key (L > S) gets output 0.
        scale: multiplies the scores; default 1/sqrt(d).
        block_m, block_n: block sizes (powers of two >= 16) of the queries and of the
            keys, in every kernel (the forward and dQ kernels own a block of queries and
            loop over the keys; the dK/dV kernel owns a block of keys and loops over the
            queries).  They change the result only through the order of the sums, at the
            level of rounding.

    Returns:
        (B, H, L, d), same dtype and device as q; differentiable with respect to q, k, v
        (the backward recomputes the weights from the saved log-sum-exp).

    Alignment when L != S (L = 2, S = 4; 1 = may attend)::

            k0 k1 k2 k3
        q0 [ 1  1  1  0 ]
        q1 [ 1  1  1  1 ]

    Runs compiled on a GPU, or on CPU tensors through the Triton interpreter when
    ``TRITON_INTERPRET=1`` was set before import (see :func:`available`).  Chapter 16.
    """
    _check_inputs(q, k, v, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return FlashAttentionFunction.apply(q, k, v, bool(causal), scale, block_m, block_n)


def flash_attention_forward(q: Any, k: Any, v: Any, *, causal: bool = False,
                            scale: float | None = None, block_m: int | None = None,
                            block_n: int | None = None) -> tuple[Any, Any]:
    """The forward kernel alone: ``(out, lse)``, no autograd.

    ``out`` is (B, H, L, d) as :func:`flash_attention`; ``lse`` is (B, H, L) float32, the
    natural log-sum-exp of each query's scaled, masked scores (``-inf`` for a query that
    sees no key) — the one number per row that the backward pass needs.
    """
    _check_inputs(q, k, v, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    with torch.no_grad():
        return _forward(q, k, v, bool(causal), scale, block_m, block_n)
