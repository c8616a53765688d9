"""Small Transformers built from attnlib's modules (chapters 9 and 10).

::

    tokens (B, n) -> token embedding + positions            (B, n, d_model)
                  -> n_layers x Block:
                        x = x + MultiHeadAttention(LayerNorm(x), causal)
                        x = x + MLP(LayerNorm(x))           (pre-norm, as GPT-2)
                  -> LayerNorm -> unembedding               (B, n, vocab_size)

Positions are one of ``"learned"`` (GPT-2's absolute table,
:class:`LearnedPositionEmbedding`), ``"sinusoidal"`` (Vaswani et al.), ``"alibi"``
(a per-head bias on the scores, passed to the attention as a float mask) or ``"none"``.
RoPE needs a hook between the projections and the scores, which
:class:`attnlib.nn.multihead.MultiHeadAttention` does not offer; chapter 9 applies it
with :func:`attnlib.positions.apply_rope` directly.

:class:`TinyEncoderDecoder` is the encoder-decoder of the original Transformer in the
same small form: an encoder of non-causal blocks, and a decoder whose blocks
(:class:`DecoderBlock`) add cross-attention from the target to the encoder's output.

Also here: :func:`ablate_heads`, which silences chosen heads by zeroing their columns of
the output projection, and :func:`train`, a short AdamW loop.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..positions import alibi_bias, sinusoidal_positions
from .multihead import MultiHeadAttention, silence_heads

__all__ = ["LearnedPositionEmbedding", "MLP", "Block", "TinyTransformer", "DecoderBlock",
           "TinyEncoderDecoder", "ablate_heads", "train", "accuracy"]

_POSITIONS = ("learned", "sinusoidal", "alibi", "none")


def _positive_int(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be a positive integer; got {n!r}")
    return int(n)


class LearnedPositionEmbedding(nn.Module):
    """GPT-2's absolute positions: one learned vector per position, ``max_len`` of them.

    ``forward(n, offset=0)`` returns rows ``offset .. offset+n-1`` of the table,
    (n, d_model), to be added to the token embeddings.  There is no vector for a
    position at or beyond ``max_len``: asking for one raises ``ValueError`` (chapter 9).
    """

    def __init__(self, max_len: int, d_model: int, *, std: float = 0.02,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.max_len = _positive_int("max_len", max_len)
        self.d_model = _positive_int("d_model", d_model)
        self.weight = nn.Parameter(torch.empty(max_len, d_model, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=std)  # GPT-2's code: 0.02 for tokens, 0.01 here

    def forward(self, n: int, offset: int = 0) -> torch.Tensor:
        if isinstance(offset, bool) or not isinstance(offset, numbers.Integral) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer; got {offset!r}")
        if offset + n > self.max_len:
            raise ValueError(
                f"positions {offset} .. {offset + n - 1} requested, but the table has only "
                f"max_len = {self.max_len} learned positions (0 .. {self.max_len - 1})")
        return self.weight[offset: offset + n]  # (n, d_model)

    def extra_repr(self) -> str:
        return f"max_len={self.max_len}, d_model={self.d_model}"


class MLP(nn.Module):
    """The position-wise feed-forward layer: Linear(d, 4d) -> GELU -> Linear(4d, d)."""

    def __init__(self, d_model: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = 4 * d_model if hidden is None else hidden
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))  # (..., d_model)


class Block(nn.Module):
    """One pre-norm block: multi-head self-attention, then an MLP.

    ``forward(x, mask=None)`` with x (B, n, d_model) returns ``(x, weights)``: the new
    residual stream (B, n, d_model) and the per-head attention weights (B, H, n, n).
    ``mask`` is an optional float or boolean mask broadcastable to (B, H, n, n), added to
    (or combined with) the causal mask, if any; ALiBi's bias goes here.  ``mlp=False``
    gives an attention-only block; ``causal=False`` an encoder block, where every
    position sees every other.
    """

    def __init__(self, d_model: int, n_heads: int, *, mlp: bool = True,
                 causal: bool = True) -> None:
        super().__init__()
        self.causal = bool(causal)
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.ln_mlp = nn.LayerNorm(d_model) if mlp else None
        self.mlp = MLP(d_model) if mlp else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        h, weights = self.attn(self.ln_attn(x), mask=mask, causal=self.causal,
                               return_weights=True, average_weights=False)
        x = x + h  # (B, n, d_model)
        if self.mlp is not None:
            x = x + self.mlp(self.ln_mlp(x))
        return x, weights  # (B, n, d_model), (B, H, n, n)


class TinyTransformer(nn.Module):
    """A decoder-only Transformer small enough to train on a CPU in seconds.

    Args:
        vocab_size: number of token ids.
        d_model: width of the residual stream.
        n_heads: heads per layer (must divide d_model).
        n_layers: number of blocks.
        max_len: longest sequence (the size of the learned position table).
        positions: ``"learned"``, ``"sinusoidal"``, ``"alibi"`` or ``"none"``.
        mlp: include the MLP in each block (``False``: attention-only, as in the
            circuits analyses of Elhage et al. 2021).
        embed_std: standard deviation of the initial token (and learned position)
            embeddings; GPT-2's code uses 0.02 for its token table (0.01 for its
            position table), ``nn.Embedding``'s default is 1.  On tiny tasks it changes
            how fast a circuit forms (chapter 10 uses 1).

    ``forward(tokens)`` with tokens (B, n) of integer ids returns logits
    (B, n, vocab_size); with ``return_weights=True`` also a list of per-layer attention
    weights, each (B, H, n, n).  Position t's logits depend on tokens 0 .. t only.
    """

    def __init__(self, vocab_size: int, d_model: int = 64, n_heads: int = 2,
                 n_layers: int = 2, max_len: int = 64, *, positions: str = "learned",
                 mlp: bool = True, embed_std: float = 0.02) -> None:
        super().__init__()
        if positions not in _POSITIONS:
            raise ValueError(f"positions must be one of {_POSITIONS}; got {positions!r}")
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.max_len = _positive_int("max_len", max_len)
        self.n_heads, self.positions = n_heads, positions
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=embed_std)
        self.pos = (LearnedPositionEmbedding(max_len, d_model, std=embed_std)
                    if positions == "learned" else None)
        n_layers = _positive_int("n_layers", n_layers)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, mlp=mlp) for _ in range(n_layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)

    def _check_tokens(self, tokens) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int):
            raise TypeError(f"tokens must be an integer torch tensor (B, n); got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, n); got {tuple(tokens.shape)}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length n = {tokens.shape[1]} exceeds "
                             f"max_len = {self.max_len}")
        if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < self.vocab_size):
            raise ValueError(f"tokens must lie in 0 .. vocab_size - 1 (vocab_size = "
                             f"{self.vocab_size}); got ids from {int(tokens.min())} to "
                             f"{int(tokens.max())}")

    def _position_terms(self, n: int, like: torch.Tensor):
        """What the positions add to the input (n, d_model), and the score bias."""
        if self.positions == "learned":
            return self.pos(n), None
        if self.positions == "sinusoidal":
            return sinusoidal_positions(n, like.shape[-1], like=like), None
        if self.positions == "alibi":
            return None, alibi_bias(self.n_heads, n, like=like)  # (H, n, n)
        return None, None

    def forward(self, tokens: torch.Tensor, *, return_weights: bool = False):
        self._check_tokens(tokens)
        x = self.embed(tokens)  # (B, n, d_model)
        added, bias = self._position_terms(tokens.shape[1], x)
        if added is not None:
            x = x + added
        all_weights = []
        for block in self.blocks:
            x, weights = block(x, mask=bias)  # (B, n, d_model), (B, H, n, n)
            all_weights.append(weights)
        logits = self.unembed(self.ln_out(x))  # (B, n, vocab_size)
        return (logits, all_weights) if return_weights else logits


class DecoderBlock(nn.Module):
    """One pre-norm decoder block of an encoder-decoder (Vaswani et al. 2017).

    Three sublayers, each added to the residual stream::

        x = x + MultiHeadAttention(LayerNorm(x), causal)            self-attention
        x = x + MultiHeadAttention(LayerNorm(x), memory, memory)    cross-attention
        x = x + MLP(LayerNorm(x))

    ``forward(x, memory)`` with target-side x (B, L, d_model) and the encoder's output
    ``memory`` (B, S, d_model) returns ``(x, cross_weights)``: the new residual stream
    (B, L, d_model) and the per-head cross-attention weights (B, H, L, S), row i saying
    where target position i reads the source.  Queries come from the target, keys and
    values from the source (chapter 6's cross-attention, L != S allowed).
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.ln_cross = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_heads)
        self.ln_mlp = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor, memory: torch.Tensor):
        x = x + self.self_attn(self.ln_self(x), causal=True)          # (B, L, d_model)
        h, cross = self.cross_attn(self.ln_cross(x), memory, return_weights=True,
                                   average_weights=False)            # (B, H, L, S)
        x = x + h
        x = x + self.mlp(self.ln_mlp(x))
        return x, cross  # (B, L, d_model), (B, H, L, S)


class TinyEncoderDecoder(nn.Module):
    """A small encoder-decoder Transformer for sequence-to-sequence tasks (chapter 10).

    ::

        src (B, S)    -> embedding + learned positions -> n_layers x Block(causal=False)
                      -> LayerNorm = memory                          (B, S, d_model)
        tgt_in (B, L) -> embedding + learned positions -> n_layers x DecoderBlock(memory)
                      -> LayerNorm -> unembedding                    (B, L, vocab_size)

    Source and target share the vocabulary and the token embedding; each side has its
    own position table.  ``tgt_in`` is the target shifted right (a start token first),
    so position t predicts target token t from the source and the target tokens before t
    (teacher forcing); :meth:`generate` decodes greedily instead.

    Args:
        vocab_size: number of token ids (source, target and the start token).
        d_model, n_heads, n_layers: as in :class:`TinyTransformer`; ``n_layers`` blocks
            on each side.
        max_len: longest source and longest target.
        embed_std: standard deviation of the initial token and position embeddings.

    ``forward(src, tgt_in)`` returns logits (B, L, vocab_size); with
    ``return_weights=True`` also the list of per-layer cross-attention weights, each
    (B, H, L, S).  Target position t depends on ``tgt_in[:, :t + 1]`` only.
    """

    def __init__(self, vocab_size: int, d_model: int = 32, n_heads: int = 1,
                 n_layers: int = 1, max_len: int = 16, *, embed_std: float = 0.02) -> None:
        super().__init__()
        self.vocab_size = _positive_int("vocab_size", vocab_size)
        self.max_len = _positive_int("max_len", max_len)
        n_layers = _positive_int("n_layers", n_layers)
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=embed_std)
        self.src_pos = LearnedPositionEmbedding(max_len, d_model, std=embed_std)
        self.tgt_pos = LearnedPositionEmbedding(max_len, d_model, std=embed_std)
        self.encoder = nn.ModuleList(Block(d_model, n_heads, causal=False)
                                     for _ in range(n_layers))
        self.ln_memory = nn.LayerNorm(d_model)
        self.decoder = nn.ModuleList(DecoderBlock(d_model, n_heads) for _ in range(n_layers))
        self.ln_out = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, vocab_size, bias=False)

    def _check(self, tokens, name: str) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.long, torch.int):
            raise TypeError(f"{name} must be an integer torch tensor (B, n); got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.max_len:
            raise ValueError(f"{name} must have shape (B, n) with 1 <= n <= max_len = "
                             f"{self.max_len}; got {tuple(tokens.shape)}")
        if not (0 <= int(tokens.min()) and int(tokens.max()) < self.vocab_size):
            raise ValueError(f"{name} must lie in 0 .. vocab_size - 1 (vocab_size = "
                             f"{self.vocab_size}); got ids from {int(tokens.min())} to "
                             f"{int(tokens.max())}")

    def encode(self, src: torch.Tensor) -> torch.Tensor:
        """The encoder's output for ``src`` (B, S): memory (B, S, d_model)."""
        self._check(src, "src")
        x = self.embed(src) + self.src_pos(src.shape[1])  # (B, S, d_model)
        for block in self.encoder:
            x, _ = block(x)
        return self.ln_memory(x)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, *,
                return_weights: bool = False):
        memory = self.encode(src)                                  # (B, S, d_model)
        self._check(tgt_in, "tgt_in")
        if tgt_in.shape[0] != src.shape[0]:
            raise ValueError(f"src and tgt_in must have the same batch size B; got "
                             f"{src.shape[0]} and {tgt_in.shape[0]}")
        x = self.embed(tgt_in) + self.tgt_pos(tgt_in.shape[1])     # (B, L, d_model)
        cross = []
        for block in self.decoder:
            x, w = block(x, memory)                                # w: (B, H, L, S)
            cross.append(w)
        logits = self.unembed(self.ln_out(x))                      # (B, L, vocab_size)
        return (logits, cross) if return_weights else logits

    @torch.no_grad()
    def generate(self, src: torch.Tensor, start: int, length: int) -> torch.Tensor:
        """Greedy decoding: ``length`` target tokens (B, length) for ``src`` (B, S),
        each the argmax given the source and the tokens generated before it, starting
        from the token id ``start``."""
        length = _positive_int("length", length)
        if length > self.max_len:
            raise ValueError(f"length = {length} exceeds max_len = {self.max_len}")
        out = torch.full((src.shape[0], 1), start, dtype=torch.long, device=src.device)
        for _ in range(length):
            logits = self(src, out)                                # (B, t, vocab_size)
            out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        return out[:, 1:]  # (B, length), without the start token


@contextlib.contextmanager
def ablate_heads(model: TinyTransformer, heads: Iterable[tuple[int, int]]) -> Iterator[None]:
    """Silence heads inside a ``with`` block; ``heads`` holds (layer, head) pairs.

    A head's output enters the residual stream only through its d_head columns of the
    output projection (the heads are merged head-major, ``(h d)``), so zeroing those
    columns removes exactly that head's contribution; the output bias stays.  The
    weights are restored on exit, even after an exception.
    """
    with silence_heads([block.attn for block in model.blocks], heads):
        yield


def _run(model: nn.Module, tokens):
    """``model(tokens)``, or ``model(*tokens)`` for a tuple such as (src, tgt_in)."""
    return model(*tokens) if isinstance(tokens, tuple) else model(tokens)


def accuracy(model: nn.Module, tokens, targets: torch.Tensor) -> float:
    """Fraction of positions with ``targets != -100`` where the argmax logit is right.

    ``tokens`` is the model's input (B, n), or a tuple of inputs such as
    ``(src, tgt_in)`` for :class:`TinyEncoderDecoder` (teacher forcing).
    """
    with torch.no_grad():
        pred = _run(model, tokens).argmax(dim=-1)  # (B, n)
    keep = targets != -100
    return (pred[keep] == targets[keep]).double().mean().item()


def train(model: nn.Module, make_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], *,
          steps: int, lr: float = 3e-3, weight_decay: float = 0.0,
          warmup: int = 50) -> list[float]:
    """Train with AdamW on next-token cross-entropy; return the loss of every step.

    ``make_batch()`` returns ``(tokens, targets)``, both (B, n); ``targets[b, t]`` is the
    id that position t should predict, or -100 where nothing is asked.  For a model with
    several inputs, ``tokens`` is a tuple of them, e.g. ``(src, tgt_in)`` for
    :class:`TinyEncoderDecoder`, and the targets are (B, L).  The learning
    rate warms up linearly for ``warmup`` steps and then decays to zero (cosine).
    """
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then cosine decay to zero
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    for _ in range(steps):
        tokens, targets = make_batch()
        logits = _run(model, tokens)  # (B, n, vocab_size)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses
