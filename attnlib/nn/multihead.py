"""``MultiHeadAttention``: a torch module for self- and cross-attention (chapter 7).

A thin module around :func:`attnlib.multihead.multi_head_attention`: it owns four
``nn.Linear`` projections and calls the function, so the module and the NumPy version
of chapter 7 are one implementation.  Masks follow attnlib's convention, True = may
attend (the opposite of ``nn.MultiheadAttention``'s masks); chapter 8 explains them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from ..masks import key_padding_mask
from ..multihead import multi_head_attention

__all__ = ["MultiHeadAttention"]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with ``n_heads`` heads of width ``d_model // n_heads``.

    Args:
        d_model: width of the queries and of the output.
        n_heads: number of heads H; it must divide ``d_model``.
        bias: whether the four projections have biases.
        kdim, vdim: widths of the key and value inputs for cross-attention from a
            sequence of another width (default ``d_model``).
        device, dtype: of the parameters.

    Attributes:
        q_proj, k_proj, v_proj: ``nn.Linear`` to H*d_k = d_model features.
        out_proj: ``nn.Linear(d_model, d_model)``, mixing the heads' outputs.

    The parameter count, ``4 * d_model**2`` weights plus ``4 * d_model`` biases, does
    not depend on ``n_heads`` (chapter 7).  To copy the weights of a
    ``torch.nn.MultiheadAttention``, use :meth:`from_torch` or :meth:`load_from_torch`.

    Example::

        attn = MultiHeadAttention(64, 4)
        y = attn(x, causal=True)                          # self-attention, (B, L, 64)
        y, w = attn(x, memory, return_weights=True,       # cross-attention to (B, S, 64)
                    average_weights=False)                # w: (B, 4, L, S)
    """

    def __init__(self, d_model: int, n_heads: int, *, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        for name, n in (("d_model", d_model), ("n_heads", n_heads)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive integer; got {n!r}")
        if d_model % n_heads:
            raise ValueError(f"n_heads = {n_heads} must divide d_model = {d_model} "
                             f"(each head gets d_model // n_heads features)")
        self.d_model, self.n_heads = d_model, n_heads
        self.d_head = d_model // n_heads
        self.kdim = d_model if kdim is None else kdim
        self.vdim = d_model if vdim is None else vdim
        factory = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.k_proj = nn.Linear(self.kdim, d_model, bias=bias, **factory)
        self.v_proj = nn.Linear(self.vdim, d_model, bias=bias, **factory)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform weights and zero biases (``nn.MultiheadAttention`` also zeroes
        its biases and draws its input projections Xavier-uniform, as one (3E, E) matrix)."""
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                causal: bool = False, key_lengths: torch.Tensor | None = None,
                return_weights: bool = False, average_weights: bool = True):
        """Attend from ``query`` to ``key``/``value``.

        Args:
            query: (B, L, d_model) (or any (..., L, d_model)).
            key: (B, S, kdim); default ``query`` (self-attention).
            value: (B, S, vdim); default ``key``.
            mask: optional, broadcastable to (B, H, L, S).  Boolean: True = may attend;
                floating: added to the scores.  (L, S), (B, 1, 1, S) and (B, 1, L, S)
                all work; a (B, L, S) mask needs ``mask[:, None]``.
            causal: bottom-right aligned causal mask (equals the usual lower triangle
                when L = S).
            key_lengths: optional (B,) integers: keys ``j >= key_lengths[b]`` are
                padding and are ignored.  To reuse ``nn.MultiheadAttention``'s
                ``key_padding_mask`` (True = ignore), pass
                ``mask=~key_padding_mask[:, None, None, :]`` instead.
            return_weights: also return the attention weights (``nn.MultiheadAttention``
                calls this ``need_weights``).
            average_weights: with ``return_weights``, average them over heads, (B, L, S);
                otherwise return them per head, (B, H, L, S).

        Returns:
            The output (B, L, d_model); with ``return_weights``, ``(output, weights)``.
            A query whose keys are all masked gets zero weights and the output bias,
            where ``nn.MultiheadAttention`` gives NaN.
        """
        key = query if key is None else key
        value = key if value is None else value
        if key_lengths is not None:
            mask = self._with_key_lengths(mask, key_lengths, key)
        out, weights = multi_head_attention(  # (B, L, d_model), (B, H, L, S)
            query, key, value, **self.matrices(), n_heads=self.n_heads, mask=mask,
            causal=causal, return_weights=True)
        if not return_weights:
            return out
        return out, (weights.mean(dim=-3) if average_weights else weights)

    def matrices(self) -> dict[str, torch.Tensor]:
        """The weights in the book's (in, out) form, named as the arguments of
        :func:`attnlib.multihead.multi_head_attention`: ``w_q``, ``w_k``, ``w_v``,
        ``w_o`` and, with ``bias=True``, ``b_q``, ``b_k``, ``b_v``, ``b_o``.  (Views:
        detach before editing.)
        """
        layers = {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj, "o": self.out_proj}
        out = {f"w_{n}": lin.weight.T for n, lin in layers.items()}
        out.update({f"b_{n}": lin.bias for n, lin in layers.items() if lin.bias is not None})
        return out

    @staticmethod
    def _with_key_lengths(mask, key_lengths, key):
        """Combine ``mask`` with the (B, 1, 1, S) key-padding mask from the lengths."""
        keep = key_padding_mask(key_lengths, key.shape[-2], like=key)  # (B, 1, 1, S)
        if mask is None:
            return keep
        if mask.dtype == torch.bool:
            return mask & keep
        return mask.masked_fill(~keep, float("-inf"))

    @torch.no_grad()
    def load_from_torch(self, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """Copy the weights of a ``torch.nn.MultiheadAttention`` into this module.

        ``in_proj_weight`` (3E, E) stacks W_Q, W_K and W_V in that order (or they are
        ``q_proj_weight`` ... when kdim/vdim differ from E); ``out_proj`` maps back to
        E.  Dropout is not copied: compare the two in ``eval()`` mode.  Returns self.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention; got "
                            f"{type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv and add_zero_attn are not supported")
        shape = (mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim)
        if shape != (self.d_model, self.n_heads, self.kdim, self.vdim):
            raise ValueError(f"mha has (embed_dim, num_heads, kdim, vdim) = {shape}; this "
                             f"module has {(self.d_model, self.n_heads, self.kdim, self.vdim)}")
        if (mha.in_proj_bias is not None) != (self.q_proj.bias is not None):
            raise ValueError("mha and this module must agree on bias=True/False")
        E = mha.embed_dim
        if mha.in_proj_weight is not None:  # (3E, E): q, k, v stacked
            w_q, w_k, w_v = mha.in_proj_weight.split(E, dim=0)
        else:
            w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
        for lin, w in ((self.q_proj, w_q), (self.k_proj, w_k), (self.v_proj, w_v),
                       (self.out_proj, mha.out_proj.weight)):
            lin.weight.copy_(w)
        if mha.in_proj_bias is not None:
            for lin, b in zip((self.q_proj, self.k_proj, self.v_proj),
                              mha.in_proj_bias.split(E)):
                lin.bias.copy_(b)
            self.out_proj.bias.copy_(mha.out_proj.bias)
        return self

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """A new module with the weights, dtype and device of ``mha``."""
        w = mha.out_proj.weight
        module = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None,
                     kdim=mha.kdim, vdim=mha.vdim, device=w.device, dtype=w.dtype)
        return module.load_from_torch(mha)

    def extra_repr(self) -> str:
        extra = "" if self.kdim == self.vdim == self.d_model else \
            f", kdim={self.kdim}, vdim={self.vdim}"
        return f"d_model={self.d_model}, n_heads={self.n_heads}, d_head={self.d_head}{extra}"


@contextlib.contextmanager
def silence_heads(layers: Sequence[MultiHeadAttention],
                  heads: Iterable[tuple[int, int]]) -> Iterator[None]:
    """Silence heads of a stack of attention layers inside a ``with`` block.

    ``heads`` holds (layer, head) pairs indexing ``layers``.  Head h reaches the rest of
    the network only through columns ``h*d_head .. (h+1)*d_head - 1`` of
    ``out_proj.weight`` (heads are merged head-major), so zeroing them removes exactly
    that head's output; the output bias stays.  The weights are restored on exit, even
    after an exception.  Chapters 10 and 18 use it to ablate heads.
    """
    saved = []
    try:
        with torch.no_grad():
            for layer, head in heads:
                if not 0 <= layer < len(layers):
                    raise ValueError(f"layer must be in 0 .. {len(layers) - 1}; got {layer}")
                attn = layers[layer]
                if not 0 <= head < attn.n_heads:
                    raise ValueError(f"head must be in 0 .. {attn.n_heads - 1}; got {head}")
                cols = slice(head * attn.d_head, (head + 1) * attn.d_head)
                saved.append((attn.out_proj.weight, cols, attn.out_proj.weight[:, cols].clone()))
                attn.out_proj.weight[:, cols] = 0.0
        yield
    finally:
        with torch.no_grad():
            for weight, cols, old in reversed(saved):
                weight[:, cols] = old
