"""Single-head self- and cross-attention as a torch module (chapter 6).

The module holds the three projections as ``torch.nn.Linear`` layers and calls
:func:`attnlib.scaled_dot_product_attention` on their outputs.  Its NumPy twin, with
the matrices passed explicitly, is :func:`attnlib.projections.attention_layer`;
:meth:`Attention.matrices` hands the module's weights over in that function's form.
Multi-head attention (chapter 7) is :mod:`attnlib.nn.multihead`.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from ..sdpa import attention_weights, scaled_dot_product_attention

__all__ = ["Attention"]


def _positive_int(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be a positive integer; got {n!r}")
    return int(n)


class Attention(nn.Module):
    """One head of attention with learned projections W_Q, W_K and W_V.

    ``forward(x)`` is self-attention; ``forward(x, context)`` is cross-attention, with
    queries from ``x`` and keys and values from ``context``::

        q = x @ W_Q          (..., L, d_model) -> (..., L, d_k)
        k = context @ W_K    (..., S, d_kv_in) -> (..., S, d_k)
        v = context @ W_V    (..., S, d_kv_in) -> (..., S, d_v)
        out = softmax(q k^T / sqrt(d_k) + mask) v      -> (..., L, d_v)

    There is no output projection: one head returns d_v features per query.

    Args:
        d_model: width of the query-side tokens ``x``.
        d_k: width of queries and keys.
        d_v: width of values and of the output (default d_k).
        d_kv_in: width of the context tokens (default d_model).  When it differs from
            d_model the module can only do cross-attention.
        bias: add a learned bias to each projection.
        tied_qk: use one matrix for queries and keys (``W_K = W_Q``), which makes the
            scores of self-attention symmetric (chapter 6 shows what that costs).
            Needs d_kv_in = d_model.
        device, dtype: passed to the ``nn.Linear`` layers.

    Attributes:
        q_proj, k_proj, v_proj: the ``nn.Linear`` layers (``k_proj`` is None when tied).
        Their ``weight`` is stored (out, in), so ``W_Q = q_proj.weight.T``.
    """

    def __init__(self, d_model: int, d_k: int, d_v: int | None = None,
                 d_kv_in: int | None = None, bias: bool = False, tied_qk: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.d_model = _positive_int("d_model", d_model)
        self.d_k = _positive_int("d_k", d_k)
        self.d_v = self.d_k if d_v is None else _positive_int("d_v", d_v)
        self.d_kv_in = self.d_model if d_kv_in is None else _positive_int("d_kv_in", d_kv_in)
        self.tied_qk = bool(tied_qk)
        if self.tied_qk and self.d_kv_in != self.d_model:
            raise ValueError(
                f"tied_qk=True needs d_kv_in == d_model (one matrix reads both sides); "
                f"got d_model={self.d_model}, d_kv_in={self.d_kv_in}")
        kw = {"bias": bias, "device": device, "dtype": dtype}
        self.q_proj = nn.Linear(self.d_model, self.d_k, **kw)
        self.k_proj = None if self.tied_qk else nn.Linear(self.d_kv_in, self.d_k, **kw)
        self.v_proj = nn.Linear(self.d_kv_in, self.d_v, **kw)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_k={self.d_k}, d_v={self.d_v}, "
                f"d_kv_in={self.d_kv_in}, tied_qk={self.tied_qk}")

    @property
    def key_proj(self) -> nn.Linear:
        """The layer that makes keys: ``k_proj``, or ``q_proj`` when tied."""
        return self.q_proj if self.k_proj is None else self.k_proj

    def _check(self, value, name: str, width: int, letter: str, what: str) -> None:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch tensor; got {type(value).__name__}")
        if value.ndim < 2 or value.shape[-1] != width:
            raise ValueError(
                f"{name} must have shape (..., {letter}, {what} = {width}); "
                f"got shape {tuple(value.shape)}")
        dtype = self.q_proj.weight.dtype
        if value.dtype != dtype:
            raise TypeError(f"{name} has dtype {value.dtype} but the module's weights are "
                            f"{dtype}; convert one of them (e.g. {name}.to({dtype}))")

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, causal: bool = False,
                return_weights: bool = False):
        """Attend from ``x`` to ``context`` (or to ``x`` itself).

        Args:
            x: (..., L, d_model) queries' tokens.
            context: optional (..., S, d_kv_in) keys' and values' tokens; None means
                self-attention (S = L).
            mask: optional, broadcastable to (..., L, S).  Boolean: True = may attend;
                floating: added to the scores.
            causal: forbid later keys, bottom-right aligned when L != S.
            return_weights: also return the (..., L, S) attention weights.

        Returns:
            (..., L, d_v), or (output, weights) with ``return_weights``.
        """
        self._check(x, "x", self.d_model, "L", "d_model")
        if context is None:
            if self.d_kv_in != self.d_model:
                raise ValueError(
                    f"this module was built for cross-attention (d_kv_in={self.d_kv_in} "
                    f"!= d_model={self.d_model}): pass context of shape (..., S, "
                    f"{self.d_kv_in})")
            context = x
        else:
            self._check(context, "context", self.d_kv_in, "S", "d_kv_in")
        q = self.q_proj(x)              # (..., L, d_k)
        k = self.key_proj(context)      # (..., S, d_k)
        v = self.v_proj(context)        # (..., S, d_v)
        if not return_weights:
            return scaled_dot_product_attention(q, k, v, mask, causal=causal)
        weights = attention_weights(q, k, mask, causal=causal)  # (..., L, S)
        return weights @ v, weights                              # (..., L, d_v)

    def matrices(self) -> dict[str, torch.Tensor]:
        """The weights in the book's (in, out) form, named as the arguments of
        :func:`attnlib.projections.attention_layer`: ``w_q``, ``w_k``, ``w_v`` and,
        with ``bias=True``, ``b_q``, ``b_k``, ``b_v``.  (Views: detach before editing.)
        """
        out = {"w_q": self.q_proj.weight.T, "w_k": self.key_proj.weight.T,
               "w_v": self.v_proj.weight.T}
        for name, layer in (("b_q", self.q_proj), ("b_k", self.key_proj),
                            ("b_v", self.v_proj)):
            if layer.bias is not None:
                out[name] = layer.bias
        return out
