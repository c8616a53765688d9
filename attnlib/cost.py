"""What attention costs: FLOPs and bytes, counted by formula (chapter 3).

Conventions:

* A multiply-add counts as **2 FLOPs**, so a matrix product (m, k) @ (k, n) costs
  ``2 m k n`` FLOPs (the convention of ``torch.utils.flop_counter`` and of most
  papers).  Softmax, scaling and masking are O(L S) element-wise work and are left out:
  next to the two O(L S d) products they are small in FLOPs (though not always in time).
* Shape letters as in the book: L queries, S keys, ``d_model`` the model width,
  ``d_k`` the query/key width and ``d_v`` the value width *per head*, H heads.
* Bytes are counted for one stored copy of a tensor; what a framework keeps for the
  backward pass (scores, weights, dropout masks) is a multiple of these.

Chapter 3 checks these formulas against ``torch.utils.flop_counter`` and measures the
times they predict; chapters 11 to 15 reuse them.  :func:`memory_traffic` *measures*
instead of counting by formula: which large arrays a piece of torch code reads and writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

__all__ = [
    "bytes_per_element",
    "projection_flops",
    "attention_flops",
    "attention_matrix_bytes",
    "crossover_length",
    "Traffic",
    "memory_traffic",
]

# dtypes NumPy does not know by name
_EXTRA_ITEMSIZE = {"bfloat16": 2, "torch.bfloat16": 2}


def _positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < (0 if allow_zero else 1):
        least = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {least} integer; got {value!r}")
    return int(value)


def bytes_per_element(dtype: Any) -> int:
    """Size in bytes of one element of ``dtype``.

    Accepts a name (``"float32"``, ``"float16"``, ``"bfloat16"``), a NumPy dtype or
    scalar type, or a torch dtype (``torch.float16``).
    """
    if dtype is None:  # np.dtype(None) would silently mean float64
        raise TypeError("dtype must name a NumPy or torch dtype; got None")
    if isinstance(dtype, str) and dtype in _EXTRA_ITEMSIZE:
        return _EXTRA_ITEMSIZE[dtype]
    try:
        return int(np.dtype(dtype).itemsize)
    except TypeError:
        pass
    itemsize = getattr(dtype, "itemsize", None)  # torch.dtype
    if isinstance(itemsize, int) and not isinstance(dtype, (str, type)):
        return itemsize
    raise TypeError(f"dtype must name a NumPy or torch dtype; got {dtype!r}")


def projection_flops(L: int, S: int, d_model: int, d_k: int, d_v: int, heads: int = 1,
                     *, output: bool = True, batch: int = 1) -> int:
    """FLOPs of the linear projections of one attention layer.

    Queries ``(L, d_model) @ (d_model, H d_k)``, keys ``(S, d_model) @ (d_model, H d_k)``,
    values ``(S, d_model) @ (d_model, H d_v)`` and, when ``output`` is true, the output
    projection ``(L, H d_v) @ (H d_v, d_model)``; biases left out.  Linear in L and S::

        2 d_model (L H d_k + S H d_k + S H d_v + [L H d_v])   per sequence, times batch
    """
    L, S, d_model, d_k, d_v, heads, batch = (
        _positive_int(v, n) for v, n in ((L, "L"), (S, "S"), (d_model, "d_model"),
                                         (d_k, "d_k"), (d_v, "d_v"), (heads, "heads"),
                                         (batch, "batch")))
    per_row = L * heads * d_k + S * heads * d_k + S * heads * d_v
    if output:
        per_row += L * heads * d_v
    return 2 * d_model * per_row * batch


def attention_flops(L: int, S: int, d_k: int, d_v: int, heads: int = 1, *,
                    batch: int = 1) -> int:
    """FLOPs of the attention core: scores ``Q K^T`` and output ``A V``, every head.

    ``(L, d_k) @ (d_k, S)`` costs ``2 L S d_k``; ``(L, S) @ (S, d_v)`` costs
    ``2 L S d_v``.  Quadratic in the sequence length when L = S = n::

        2 L S (d_k + d_v) H   per sequence, times batch

    A causal mask does not reduce this count unless the kernel skips masked blocks.
    """
    L, S, d_k, d_v, heads, batch = (
        _positive_int(v, n) for v, n in ((L, "L"), (S, "S"), (d_k, "d_k"), (d_v, "d_v"),
                                         (heads, "heads"), (batch, "batch")))
    return 2 * L * S * (d_k + d_v) * heads * batch


def attention_matrix_bytes(layers: int, heads: int, L: int, S: int | None = None,
                           batch: int = 1, dtype: Any = "float32") -> int:
    """Bytes of the attention weights ``(B, H, L, S)`` of every layer, stored once.

    ``layers * batch * heads * L * S * bytes_per_element(dtype)``.  For example a
    12-layer, 12-head model at L = S = 512 in float32 holds 12 * 12 * 512 * 512 * 4 =
    150,994,944 bytes per sequence.  Training keeps at least this much for the backward
    pass (often also the pre-softmax scores and a dropout mask); FlashAttention
    (chapter 15) keeps none of it.
    """
    S = L if S is None else S
    layers, heads, L, S, batch = (
        _positive_int(v, n, allow_zero=n in ("L", "S")) for v, n in (
            (layers, "layers"), (heads, "heads"), (L, "L"), (S, "S"), (batch, "batch")))
    return layers * batch * heads * L * S * bytes_per_element(dtype)


def crossover_length(d_model: int, d_k: int, d_v: int | None = None, heads: int = 1, *,
                     output: bool = True) -> float:
    """The length n = L = S at which the attention core costs as many FLOPs as the
    projections.

    Setting ``attention_flops(n, n, ...) = projection_flops(n, n, ...)`` and dividing by
    ``2 n H`` gives::

        n* = d_model (2 d_k + d_v + [d_v]) / (d_k + d_v)

    which does not depend on H.  With d_v = d_k it is 2 d_model (1.5 d_model without the
    output projection).  Below n* the projections dominate; above it the n^2 term does.
    """
    d_v = d_k if d_v is None else d_v
    d_model, d_k, d_v, _ = (_positive_int(v, n) for v, n in (
        (d_model, "d_model"), (d_k, "d_k"), (d_v, "d_v"), (heads, "heads")))
    linear = 2 * d_k + d_v + (d_v if output else 0)
    return d_model * linear / (d_k + d_v)


@dataclass(frozen=True)
class Traffic:
    """Arrays read and written by a piece of torch code (see :func:`memory_traffic`)."""

    reads: int
    writes: int
    bytes_read: int
    bytes_written: int

    @property
    def total(self) -> int:
        """Reads plus writes: how many times a large array travelled through memory."""
        return self.reads + self.writes


def memory_traffic(fn: Callable[..., Any], *args: Any, min_numel: int = 1,
                   **kwargs: Any) -> Traffic:
    """Run ``fn(*args, **kwargs)`` and count the large torch arrays each operation moves.

    Every operation torch dispatches (below autograd, so ``torch.softmax`` is one operation
    and ``x / 2`` another) is taken to read each of its input tensors once and write each
    of its new output tensors once, as a separate kernel does.  Only tensors with at least
    ``min_numel`` elements are counted.  Views (``view``, ``transpose``, ``expand``) share
    their input's memory and move nothing; an in-place operation reads and writes its
    tensor.  What a kernel does inside its caches (the passes a fused softmax makes over one
    row) is not seen, and NumPy code is invisible.  Chapter 3 uses it to show why a softmax
    written as separate steps is slower than a fused one.

    Returns:
        a :class:`Traffic` with the counts and the bytes read and written.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    min_numel = _positive_int(min_numel, "min_numel")
    totals = dict(reads=0, writes=0, bytes_read=0, bytes_written=0)

    def large(tree) -> dict[int, int]:
        # distinct memory of the large tensors in `tree`: {storage address: bytes}
        return {t.untyped_storage().data_ptr(): t.numel() * t.element_size()
                for t in tree_leaves(tree)
                if isinstance(t, torch.Tensor) and t.numel() >= min_numel}

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            read, written = large((args, kwargs)), large(out)
            in_place = func._schema.is_mutable
            if not in_place:
                if written and written.keys() <= read.keys():  # a view: nothing moves
                    return out
                written = {k: b for k, b in written.items() if k not in read}
            totals["reads"] += len(read)
            totals["writes"] += len(written)
            totals["bytes_read"] += sum(read.values())
            totals["bytes_written"] += sum(written.values())
            return out

    with _Counter():
        fn(*args, **kwargs)
    return Traffic(**totals)
