"""Grouped-query attention (GQA) and multi-query attention (MQA), chapter 12.

GQA (Ainslie et al. 2023) keeps H query heads but only H_kv key/value heads,
1 <= H_kv <= H, with H_kv dividing H.  The query heads fall into H_kv groups of
G = H // H_kv consecutive heads, and each group shares one key/value head::

    query head i  ->  key/value head  i // G          (as torch's enable_gqa=True)

    H = 8, H_kv = 2 (G = 4):   q0 q1 q2 q3 | q4 q5 q6 q7
                                   kv0     |     kv1

H_kv = H is multi-head attention; H_kv = 1 is multi-query attention (Shazeer 2019),
every query head sharing one key and one value.  The KV cache shrinks by H / H_kv.

Two ways to compute it, equal to each other:

- :func:`repeat_kv`: copy each key/value head G times and run ordinary multi-head
  attention (what Hugging Face's eager Llama does; it gives back the memory saving
  during the computation).
- :func:`grouped_query_attention`: fold each group's G query heads into the query
  length, (..., H, L, d) -> (..., H_kv, G*L, d), and attend to the H_kv key/value heads
  directly, so keys and values are read once per group and never copied.

:class:`GroupedQueryAttention` is the torch module (optional RoPE and KV cache), and
:func:`mha_to_gqa` turns a multi-head layer into a GQA layer by mean-pooling its
key and value heads, as the GQA paper does before "uptraining".
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import einops
import numpy as np
import torch
from torch import nn

from .._backend import check_array, check_float, device_of, namespace
from ..kv_cache import KVCache
from ..masks import causal_mask
from ..multihead import merge_heads, split_heads
from ..positions import apply_rope
from ..sdpa import attention_weights
from .multihead import MultiHeadAttention

__all__ = [
    "GroupedQueryAttention",
    "grouped_query_attention",
    "mha_to_gqa",
    "pool_kv_heads",
    "repeat_kv",
]


def _positive_int(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be a positive integer; got {n!r}")
    return int(n)


def _check_groups(n_heads: int, n_kv_heads: int) -> int:
    """G = n_heads // n_kv_heads, after checking that n_kv_heads divides n_heads."""
    _positive_int("n_heads", n_heads)
    _positive_int("n_kv_heads", n_kv_heads)
    if n_heads % n_kv_heads:
        raise ValueError(
            f"n_kv_heads = {n_kv_heads} must divide n_heads = {n_heads}: each key/value "
            f"head serves a group of n_heads // n_kv_heads query heads")
    return n_heads // n_kv_heads


# ------------------------------------------------------------------ plain functions
def repeat_kv(x: Any, n_rep: int) -> Any:
    """Repeat each key/value head ``n_rep`` times: (..., H_kv, S, d) -> (..., H_kv*n_rep, S, d).

    Head h of the input becomes heads h*n_rep .. h*n_rep + n_rep - 1 of the output, so
    query head i meets key/value head i // n_rep.  NumPy arrays or torch tensors.
    """
    check_array(x, "x", min_ndim=3, shape_hint="(..., H_kv, S, d)")
    n_rep = _positive_int("n_rep", n_rep)
    if n_rep == 1:
        return x
    return einops.repeat(x, "... h s d -> ... (h g) s d", g=n_rep)


def _fold_mask(xp, mask: Any, H: int, G: int, L: int, S: int):
    """A mask broadcastable to (..., H, L, S) -> one broadcastable to (..., H_kv, G*L, S)."""
    if mask.ndim < 3:  # (L, S) or (S,): the same for every head
        mask = xp.reshape(mask, (1,) * (3 - mask.ndim) + tuple(mask.shape))
    heads = mask.shape[-3]
    lead = tuple(mask.shape[:-3])
    mask = xp.broadcast_to(mask, (*lead, heads, L, S))
    if heads == 1:  # (..., 1, L, S) -> (..., 1, G*L, S): the same rows for every group
        mask = xp.broadcast_to(mask[..., None, :, :], (*lead, 1, G, L, S))
        return xp.reshape(mask, (*lead, 1, G * L, S))
    return xp.reshape(mask, (*lead, H // G, G * L, S))  # (..., H_kv, G*L, S)


def _combined_mask(xp, mask: Any, causal: bool, L: int, S: int, like: Any):
    """``mask`` and (if causal) the bottom-right causal mask (L, S), as one mask."""
    if not causal:
        return mask
    cm = causal_mask(L, S, like=like)  # (L, S)
    if mask is None:
        return cm
    if xp.isdtype(mask.dtype, "bool"):
        return xp.logical_and(mask, cm)
    neg_inf = xp.asarray(-math.inf, dtype=mask.dtype, device=device_of(mask))
    return xp.where(cm, mask, neg_inf)


def _check_gqa_inputs(q, k, v, mask):
    xp = namespace(q=q, k=k, v=v, mask=mask)
    for name, x, hint in (("q", q, "(..., H, L, d_k)"), ("k", k, "(..., H_kv, S, d_k)"),
                          ("v", v, "(..., H_kv, S, d_v)")):
        check_array(x, name, min_ndim=3, shape_hint=hint)
        check_float(xp, name, x)
    H, H_kv = q.shape[-3], k.shape[-3]
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must agree on (..., H_kv, S); got k {tuple(k.shape)} "
                         f"and v {tuple(v.shape)}")
    if H % H_kv:
        raise ValueError(
            f"the number of key/value heads H_kv = {H_kv} must divide the number of query "
            f"heads H = {H}; got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same width d_k; got q {tuple(q.shape)} "
                         f"and k {tuple(k.shape)}")
    lead = np.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    target = (*lead, H, q.shape[-2], k.shape[-2])
    if mask is not None:
        try:
            ok = tuple(np.broadcast_shapes(tuple(mask.shape), target)) == target
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the "
                             f"scores' shape {target} = (..., H, L, S)")
    return xp, H // H_kv


def grouped_query_attention(q: Any, k: Any, v: Any, mask: Any = None, *,
                            causal: bool = False, scale: float | None = None,
                            return_weights: bool = False) -> Any:
    """Scaled dot-product attention with H query heads sharing H_kv key/value heads.

    Query head i attends with key/value head ``i // (H // H_kv)``, the mapping of
    ``F.scaled_dot_product_attention(..., enable_gqa=True)``.  The G = H // H_kv query
    heads of a group are folded into the query axis, (..., H_kv, G*L, d_k), so each key
    and value head is read once per group and never copied.

    Args:
        q: queries (..., H, L, d_k).
        k: keys (..., H_kv, S, d_k); H_kv must divide H.
        v: values (..., H_kv, S, d_v).
        mask: optional, broadcastable to (..., H, L, S); boolean True = may attend,
            floating = added to the scores (chapter 8).
        causal: bottom-right aligned causal mask (query i sits at key position
            S - L + i), what decoding with a KV cache needs (chapter 11).
        scale: multiplies the scores; default 1/sqrt(d_k).
        return_weights: also return the weights (..., H, L, S).

    Returns:
        (..., H, L, d_v), and with ``return_weights`` the weights.  NumPy or torch.
    """
    xp, G = _check_gqa_inputs(q, k, v, mask)
    H, L, S = q.shape[-3], q.shape[-2], k.shape[-2]
    mask = _combined_mask(xp, mask, causal, L, S, like=q)
    q_g = einops.rearrange(q, "... (h g) l d -> ... h (g l) d", g=G)  # (..., H_kv, G*L, d_k)
    m_g = None if mask is None else _fold_mask(xp, mask, H, G, L, S)  # (..., H_kv|1, G*L, S)
    weights = attention_weights(q_g, k, m_g, scale=scale)  # (..., H_kv, G*L, S)
    out = weights @ v  # (..., H_kv, G*L, d_v)
    out = einops.rearrange(out, "... h (g l) d -> ... (h g) l d", g=G)  # (..., H, L, d_v)
    if not return_weights:
        return out
    return out, einops.rearrange(weights, "... h (g l) s -> ... (h g) l s", g=G)


def pool_kv_heads(w: Any, n_heads: int, n_kv_heads: int) -> Any:
    """Mean-pool groups of heads along the last axis: (..., H*d) -> (..., H_kv*d).

    The last axis holds H heads of width d side by side (the columns of W_K or W_V in
    the book's ``x @ W`` form, or a bias).  Heads ``j*G .. j*G + G - 1`` are averaged into
    head j, G = H // H_kv: the conversion of Ainslie et al. (2023).  For an
    ``nn.Linear`` weight (out, in), pool ``weight.T`` and transpose back.
    """
    check_array(w, "w", min_ndim=1, shape_hint="(..., H*d)")
    G = _check_groups(n_heads, n_kv_heads)
    if w.shape[-1] % n_heads:
        raise ValueError(f"n_heads = {n_heads} must divide the last dimension of w; got w "
                         f"of shape {tuple(w.shape)}")
    return einops.reduce(w, "... (h g d) -> ... (h d)", "mean", h=n_kv_heads, g=G)


# ----------------------------------------------------------------------- the module
def _check_module_input(x, d_model: int, weight: torch.Tensor) -> None:
    """x must be a (B, L, d_model) torch tensor with the module's dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch tensor (B, L, d_model = {d_model}); got "
                        f"{type(x).__name__}")
    if x.ndim != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must be a tensor of shape (B, L, d_model = {d_model}); "
                         f"got {tuple(x.shape)}")
    if x.dtype != weight.dtype or x.device != weight.device:
        raise TypeError(f"x is {x.dtype} on {x.device} but the module's weights are "
                        f"{weight.dtype} on {weight.device}; convert one with .to(...)")


class GroupedQueryAttention(nn.Module):
    """Self-attention with ``n_heads`` query heads and ``n_kv_heads`` key/value heads.

    Args:
        d_model: width of the input and output.
        n_heads: H, the number of query heads.
        n_kv_heads: H_kv (default H).  H_kv = H is multi-head attention, H_kv = 1
            multi-query attention; it must divide H.
        head_dim: d_h, the width of every head (default d_model // H, in which case H
            must divide d_model).
        bias: whether the four projections have biases (Llama: no).
        rope: rotate queries and keys with RoPE (rotate-half pairing, as Hugging Face's
            Llama port; Meta's own code pairs interleaved dimensions) before the scores and
            before the keys enter the cache.
        rope_base: RoPE's base (10000 in Llama 2; Llama 3 uses 500000).
        device, dtype: of the parameters.

    Attributes:
        q_proj: ``nn.Linear(d_model, H*d_h)``; k_proj, v_proj:
        ``nn.Linear(d_model, H_kv*d_h)``; out_proj: ``nn.Linear(H*d_h, d_model)``.
        Heads split the projected features as ``view(B, L, H, d_h)``, the layout of
        ``nn.MultiheadAttention`` and of Hugging Face's ``LlamaAttention``, whose four
        weights can be copied in unchanged.  See chapter 12.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, *,
                 head_dim: int | None = None, bias: bool = False, rope: bool = False,
                 rope_base: float = 10000.0, device=None, dtype=None) -> None:
        super().__init__()
        d_model = _positive_int("d_model", d_model)
        n_heads = _positive_int("n_heads", n_heads)
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.n_groups = _check_groups(n_heads, n_kv_heads)
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(
                    f"n_heads = {n_heads} must divide d_model = {d_model} when head_dim is "
                    f"not given (each head gets d_model // n_heads features)")
            head_dim = d_model // n_heads
        head_dim = _positive_int("head_dim", head_dim)
        if rope and head_dim % 2:
            raise ValueError(f"RoPE rotates pairs of dimensions: head_dim must be even; "
                             f"got {head_dim}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        if isinstance(rope_base, bool) or not isinstance(rope_base, numbers.Real) \
                or not math.isfinite(rope_base) or rope_base <= 1:
            raise ValueError(f"rope_base must be a finite number > 1; got {rope_base!r}")
        self.head_dim, self.rope, self.rope_base = head_dim, bool(rope), float(rope_base)
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias, **factory)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty :class:`attnlib.kv_cache.KVCache` for this layer."""
        return KVCache(capacity)

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                causal: bool = False, cache: KVCache | None = None,
                positions: int | torch.Tensor | None = None,
                return_weights: bool = False):
        """Self-attention over x, optionally continuing from a KV cache.

        Args:
            x: (B, L, d_model): the L new positions.
            mask: optional, broadcastable to (B, H, L, S) (S = cached + new positions);
                boolean True = may attend, floating = added to the scores.
            causal: bottom-right aligned causal mask: new position i sits at key position
                S - L + i.  Use it for training and for the prompt (prefill); with one
                new token (L = 1) it changes nothing.
            cache: a :class:`~attnlib.kv_cache.KVCache`; the new keys and values are
                appended to it and the queries attend to everything it holds.
            positions: where the L new positions sit, for RoPE: default the cache length
                (0 without a cache) onward; an int offset; or a tensor (L,) or (B, L).
            return_weights: also return the weights (B, H, L, S).

        Returns:
            (B, L, d_model), and the weights with ``return_weights``.
        """
        _check_module_input(x, self.d_model, self.q_proj.weight)
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, L, d_h)
        k = split_heads(self.k_proj(x), self.n_kv_heads)  # (B, H_kv, L, d_h)
        v = split_heads(self.v_proj(x), self.n_kv_heads)  # (B, H_kv, L, d_h)
        if self.rope:
            pos = self._positions(positions, cache, x.shape[-2])
            q = apply_rope(q, pos, base=self.rope_base)
            k = apply_rope(k, pos, base=self.rope_base)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, H_kv, S, d_h) each
        out, weights = grouped_query_attention(q, k, v, mask, causal=causal,
                                               return_weights=True)  # (B, H, L, d_h)
        out = self.out_proj(merge_heads(out))  # (B, L, d_model)
        return (out, weights) if return_weights else out

    @staticmethod
    def _positions(positions, cache, L):
        """RoPE positions for apply_rope: an int offset, or a tensor (L,) / (B, 1, L)."""
        if positions is None:
            return 0 if cache is None else cache.length
        if isinstance(positions, torch.Tensor):
            if positions.ndim == 2:  # (B, L) -> (B, 1, L): broadcast over heads
                return positions[:, None, :]
            return positions
        return int(positions)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, rope={self.rope}")


# ------------------------------------------------------------------ MHA -> GQA
def _source_weights(source, n_heads):
    """(weights in nn.Linear (out, in) form, biases or None, n_heads, head_dim, extras)."""
    if isinstance(source, nn.MultiheadAttention):
        source = MultiHeadAttention.from_torch(source)
    if isinstance(source, MultiHeadAttention):
        if source.kdim != source.d_model or source.vdim != source.d_model:
            raise ValueError("mha_to_gqa needs self-attention weights (kdim = vdim = d_model)")
        layers = (source.q_proj, source.k_proj, source.v_proj, source.out_proj)
        kv_heads, extras = source.n_heads, {}
        H, d_h = source.n_heads, source.d_head
    elif isinstance(source, GroupedQueryAttention):
        layers = (source.q_proj, source.k_proj, source.v_proj, source.out_proj)
        kv_heads = source.n_kv_heads
        extras = {"rope": source.rope, "rope_base": source.rope_base}
        H, d_h = source.n_heads, source.head_dim
    elif isinstance(source, dict):
        if n_heads is None:
            raise ValueError("give n_heads when converting a dict of weights")
        missing = {"w_q", "w_k", "w_v", "w_o"} - set(source)
        if missing:
            raise ValueError(f"the weights need keys w_q, w_k, w_v, w_o; missing {missing}")
        w = [torch.as_tensor(source[f"w_{n}"]).T for n in "qkvo"]  # (out, in) form
        b = [None if source.get(f"b_{n}") is None else torch.as_tensor(source[f"b_{n}"])
             for n in "qkvo"]
        H = _positive_int("n_heads", n_heads)
        shapes = {f"w_{n}": tuple(x.T.shape) for n, x in zip("qkvo", w)}
        width = w[0].shape[0]
        if width % H or any(x.shape != w[0].shape for x in w[1:3]) \
                or w[3].shape != w[0].shape[::-1]:
            raise ValueError(f"expected w_q, w_k, w_v of shape (d_model, H*d_h) and w_o of "
                             f"shape (H*d_h, d_model) with H = {H} dividing H*d_h; got "
                             f"{shapes}")
        if len({x is None for x in b}) > 1:
            raise ValueError("give all four biases b_q, b_k, b_v, b_o or none")
        return w, b, H, H, width // H, {}
    else:
        raise TypeError(f"mha must be an attnlib MultiHeadAttention or "
                        f"GroupedQueryAttention, a torch.nn.MultiheadAttention or a dict "
                        f"of weights; got {type(source).__name__}")
    if n_heads is not None and n_heads != H:
        raise ValueError(f"n_heads = {n_heads} disagrees with the layer's {H} heads")
    w = [lin.weight for lin in layers]
    b = [lin.bias for lin in layers]
    return w, b, H, kv_heads, d_h, extras


@torch.no_grad()
def mha_to_gqa(mha, n_kv_heads: int, *, n_heads: int | None = None,
               rope: bool | None = None, rope_base: float | None = None
               ) -> GroupedQueryAttention:
    """Turn a multi-head layer into a GQA layer by mean-pooling key and value heads.

    The conversion of Ainslie et al. (2023): the keys of the G query heads of a group
    are replaced by one key head whose projection is the **mean** of their projections,
    and the same for values; queries and the output projection are copied unchanged.
    The result computes the same function only when the pooled heads were equal; in
    general it is a starting point that needs further training ("uptraining", about 5%
    of the original pre-training compute in the paper).  See chapter 12.

    Args:
        mha: an :class:`attnlib.nn.MultiHeadAttention` (self-attention), a
            ``torch.nn.MultiheadAttention``, a :class:`GroupedQueryAttention` (its key/
            value heads are pooled further), or a dict of weights ``w_q``, ``w_k``,
            ``w_v``, ``w_o`` (book form, ``x @ W``) and optional ``b_q`` ...
        n_kv_heads: H_kv of the result; it must divide the source's number of key/value
            heads.
        n_heads: the number of heads, needed only for a dict of weights.
        rope, rope_base: RoPE settings of the result (default: those of a
            GroupedQueryAttention source; no RoPE otherwise).

    Returns:
        A new :class:`GroupedQueryAttention` with the source's dtype and device.
    """
    w, b, H, src_kv, d_h, extras = _source_weights(mha, n_heads)
    n_kv_heads = _positive_int("n_kv_heads", n_kv_heads)
    _check_groups(H, n_kv_heads)
    if src_kv % n_kv_heads:
        raise ValueError(f"n_kv_heads = {n_kv_heads} must divide the source's number of "
                         f"key/value heads, {src_kv}")
    if rope is not None:
        extras["rope"] = rope
    if rope_base is not None:
        extras["rope_base"] = rope_base
    gqa = GroupedQueryAttention(w[0].shape[1], H, n_kv_heads, head_dim=d_h,
                                bias=b[0] is not None, device=w[0].device,
                                dtype=w[0].dtype, **extras)
    pooled_w = [pool_kv_heads(w[i].T, src_kv, n_kv_heads).T for i in (1, 2)]  # (H_kv*d_h, d)
    gqa.q_proj.weight.copy_(w[0])
    gqa.k_proj.weight.copy_(pooled_w[0])
    gqa.v_proj.weight.copy_(pooled_w[1])
    gqa.out_proj.weight.copy_(w[3])
    if b[0] is not None:
        gqa.q_proj.bias.copy_(b[0])
        gqa.k_proj.bias.copy_(pool_kv_heads(b[1], src_kv, n_kv_heads))
        gqa.v_proj.bias.copy_(pool_kv_heads(b[2], src_kv, n_kv_heads))
        gqa.out_proj.bias.copy_(b[3])
    return gqa
