"""Multi-head latent attention (MLA), DeepSeek-V2's attention layer (chapter 13).

Multi-head attention caches, for every past token, one key and one value per head:
``2 * H * d_head`` numbers per token and layer.  MLA caches a single narrow vector per
token instead, the *latent* ``c_KV`` of width ``d_c`` (``kv_lora_rank``), from which
every head's key and value are linear read-outs::

    c_KV  = RMSNorm(x W_DKV)            (B, S, d_model) -> (B, S, d_c)      cached
    k_C   = c_KV W_UK   (per head)      (B, S, d_c) -> (B, H, S, d_nope)
    v     = c_KV W_UV   (per head)      (B, S, d_c) -> (B, H, S, d_v)

RoPE cannot act on ``k_C`` without spoiling the trick below, so positions travel in a
few extra *decoupled* dimensions: each head's query gets ``d_rope`` more features, and
all heads share one rotated key ``k_R = RoPE(x W_KR)``, which is cached too::

    q     = [q_C, q_R]                  (B, H, L, d_nope + d_rope)
    k     = [k_C, k_R broadcast]        (B, H, S, d_nope + d_rope)
    out   = softmax(q k^T / sqrt(d_nope + d_rope)) v  -> merge heads -> W_O

Queries may be low-rank too (``q_lora_rank``): ``c_Q = RMSNorm(x W_DQ)``, then
``q_C = c_Q W_UQ`` and ``q_R = RoPE(c_Q W_QR)``.

Decoding has two equivalent paths (``path=`` in :meth:`MultiHeadLatentAttention.forward`):

- ``"expanded"``: up-project the cached latents into keys and values at every step;
- ``"absorbed"``: fold W_UK into the query (``q_C W_UK^T`` is compared with ``c_KV``
  directly) and W_UV into the output (the weights average the latents, and W_UV is
  applied once per query).  The full keys and values never exist; every head attends
  to the same ``d_c + d_rope``-wide "key" ``[c_KV, k_R]`` -- MQA in the latent space.

Reference: DeepSeek-AI, "DeepSeek-V2" (2024), section 2.1.  The parameter layout of
Hugging Face's ``DeepseekV3Attention`` can be loaded with
:meth:`MultiHeadLatentAttention.load_deepseek_state_dict`.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .._backend import check_mask, namespace
from ..kv_cache import KVCache
from ..masks import causal_mask
from ..multihead import merge_heads, split_heads
from ..positions import apply_rope
from ..sdpa import scaled_dot_product_attention

__all__ = ["MLACache", "MultiHeadLatentAttention", "mla_decode_flops"]

_PATHS = ("expanded", "absorbed")


def _positive_int(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"{name} must be a positive integer; got {n!r}")
    return int(n)


# ------------------------------------------------------------------------------ cache
class MLACache:
    """The decoding cache of one MLA layer: the latents and the shared RoPE keys.

    Holds ``latent`` (B, S, d_c) and ``rope_key`` (B, S, d_rope), with RoPE already
    applied to the keys, so nothing of size H is ever stored: ``d_c + d_rope`` numbers
    per token instead of multi-head attention's ``2 * H * d_head``.  Pass the same object
    to successive calls of :meth:`MultiHeadLatentAttention.forward`; each call appends
    its new tokens.  The storage is chapter 11's :class:`attnlib.kv_cache.KVCache`, with
    the latent in the place of the keys and the RoPE key in the place of the values.

    Args:
        capacity: as for :class:`~attnlib.kv_cache.KVCache`: the most tokens it may
            hold (preallocated), or None to grow as needed.

    Decoding is inference: run it under ``torch.no_grad()``.  See chapter 13.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self._store = KVCache(capacity)

    def __len__(self) -> int:
        """S, the number of cached tokens."""
        return len(self._store)

    @property
    def latent(self) -> torch.Tensor | None:
        """The cached latents c_KV, (B, S, d_c); None before the first update."""
        return self._store.keys

    @property
    def rope_key(self) -> torch.Tensor | None:
        """The cached rotated keys k_R, (B, S, d_rope); None before the first update."""
        return self._store.values

    def update(self, latent: torch.Tensor, rope_key: torch.Tensor):
        """Append L new tokens; return the whole cache ``(latent, rope_key)``.

        Args:
            latent: (B, L, d_c).  rope_key: (B, L, d_rope), already rotated.
        Returns:
            (B, S, d_c) and (B, S, d_rope), S counting the new tokens.
        """
        if latent.ndim != 3:
            raise ValueError(f"latent must have shape (B, L, d_c); got {tuple(latent.shape)}")
        return self._store.append(latent, rope_key)  # (B, S, d_c), (B, S, d_rope)

    def crop(self, length: int) -> None:
        """Keep only the first ``length`` tokens (e.g. to retry from a shorter prefix)."""
        self._store.crop(length)

    def reset(self) -> None:
        """Forget every token, keeping the buffers for the next sequence."""
        self._store.reset()

    def numel(self) -> int:
        """Number of cached elements, ``B * S * (d_c + d_rope)``."""
        if self.latent is None:
            return 0
        return self.latent.numel() + self.rope_key.numel()

    @property
    def nbytes(self) -> int:
        """Bytes of the cached latents and RoPE keys."""
        return self._store.nbytes

    def __repr__(self) -> str:
        if self.latent is None:
            return "MLACache(empty)"
        return (f"MLACache(latent={tuple(self.latent.shape)}, "
                f"rope_key={tuple(self.rope_key.shape)})")


# ----------------------------------------------------------------------------- module
class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention with decoupled RoPE (DeepSeek-V2), chapter 13.

    Args:
        d_model: width of the input and output token vectors.
        n_heads: number of heads H.
        kv_lora_rank: d_c, the width of the cached key/value latent.
        q_lora_rank: d_c', the width of the query latent; None projects queries
            straight from x (as DeepSeek-V2-Lite does).
        qk_nope_head_dim: d_nope, the per-head width of the query/key part without
            positions (computed from the latents).
        qk_rope_head_dim: d_rope (even), the per-head width of the rotated query part
            and the width of the one shared rotated key.
        v_head_dim: d_v, the per-head width of the values.
        rope_base: the RoPE base (theta_i = base^(-2i/d_rope)).
        rope_interleaved: pair dimensions (2i, 2i+1) as DeepSeek does (True) or
            (i, i + d_rope/2) as Hugging Face's Llama port does (False).  See
            :func:`attnlib.positions.apply_rope`.
        norm_eps: epsilon of the two RMSNorms on the latents.
        device, dtype: of the parameters.

    Attributes (``nn.Linear`` layers, no biases; the paper's names in brackets):
        q_down [W_DQ], q_norm: only with ``q_lora_rank``.
        q_nope_proj [W_UQ]: -> H * d_nope.  q_rope_proj [W_QR]: -> H * d_rope.
        kv_down [W_DKV]: d_model -> d_c.  kv_norm: RMSNorm(d_c).
        k_rope_proj [W_KR]: d_model -> d_rope (one key shared by all heads).
        k_up [W_UK]: d_c -> H * d_nope.  v_up [W_UV]: d_c -> H * d_v.
        out_proj [W_O]: H * d_v -> d_model.

    The scale of the scores is ``1 / sqrt(d_nope + d_rope)``.
    """

    def __init__(self, d_model: int, n_heads: int, *, kv_lora_rank: int,
                 q_lora_rank: int | None = None, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, rope_base: float = 10000.0,
                 rope_interleaved: bool = True, norm_eps: float = 1e-6,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.d_model = _positive_int("d_model", d_model)
        self.n_heads = _positive_int("n_heads", n_heads)
        self.kv_lora_rank = _positive_int("kv_lora_rank", kv_lora_rank)
        self.q_lora_rank = None if q_lora_rank is None else \
            _positive_int("q_lora_rank", q_lora_rank)
        self.d_nope = _positive_int("qk_nope_head_dim", qk_nope_head_dim)
        self.d_rope = _positive_int("qk_rope_head_dim", qk_rope_head_dim)
        if self.d_rope % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE rotates pairs); "
                             f"got {qk_rope_head_dim}")
        self.d_v = _positive_int("v_head_dim", v_head_dim)
        if isinstance(rope_base, bool) or not isinstance(rope_base, numbers.Real) \
                or not math.isfinite(rope_base) or rope_base <= 1:
            raise ValueError(f"rope_base must be a finite number > 1; got {rope_base!r}")
        if not (isinstance(norm_eps, numbers.Real) and norm_eps >= 0):
            raise ValueError(f"norm_eps must be a number >= 0; got {norm_eps!r}")
        self.rope_base = float(rope_base)
        self.rope_pairing = "interleaved" if rope_interleaved else "rotate-half"
        self.scale = 1.0 / math.sqrt(self.d_nope + self.d_rope)
        H, d_c, f = self.n_heads, self.kv_lora_rank, {"device": device, "dtype": dtype}

        def linear(n_in, n_out):
            return nn.Linear(n_in, n_out, bias=False, **f)

        d_q_in = d_model if q_lora_rank is None else self.q_lora_rank
        self.q_down = None if q_lora_rank is None else linear(d_model, d_q_in)
        self.q_norm = None if q_lora_rank is None else nn.RMSNorm(d_q_in, eps=norm_eps, **f)
        self.q_nope_proj = linear(d_q_in, H * self.d_nope)
        self.q_rope_proj = linear(d_q_in, H * self.d_rope)
        self.kv_down = linear(d_model, d_c)
        self.kv_norm = nn.RMSNorm(d_c, eps=norm_eps, **f)
        self.k_rope_proj = linear(d_model, self.d_rope)
        self.k_up = linear(d_c, H * self.d_nope)
        self.v_up = linear(d_c, H * self.d_v)
        self.out_proj = linear(H * self.d_v, d_model)

    # ------------------------------------------------------------------ the pieces
    def _rope(self, t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return apply_rope(t, positions, base=self.rope_base, pairing=self.rope_pairing)

    def queries(self, x: torch.Tensor, positions: torch.Tensor):
        """Per-head queries without and with rotation: (B, H, L, d_nope), (B, H, L, d_rope)."""
        c_q = x if self.q_down is None else self.q_norm(self.q_down(x))  # (B, L, d_c')
        q_nope = split_heads(self.q_nope_proj(c_q), self.n_heads)        # (B, H, L, d_nope)
        q_rope = split_heads(self.q_rope_proj(c_q), self.n_heads)        # (B, H, L, d_rope)
        return q_nope, self._rope(q_rope, positions)

    def latents(self, x: torch.Tensor, positions: torch.Tensor):
        """What the cache stores for x: c_KV (B, L, d_c) and k_R (B, L, d_rope), rotated."""
        c_kv = self.kv_norm(self.kv_down(x))                  # (B, L, d_c)
        k_rope = self._rope(self.k_rope_proj(x), positions)   # (B, L, d_rope)
        return c_kv, k_rope

    def expand(self, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Up-project latents into every head's keys (B, H, S, d_nope + d_rope) and
        values (B, H, S, d_v)."""
        k_nope = split_heads(self.k_up(c_kv), self.n_heads)   # (B, H, S, d_nope)
        v = split_heads(self.v_up(c_kv), self.n_heads)        # (B, H, S, d_v)
        k_r = k_rope[:, None].expand(-1, self.n_heads, -1, -1)  # (B, H, S, d_rope)
        return torch.cat([k_nope, k_r], dim=-1), v

    def absorbed_weights(self):
        """W_UK and W_UV per head, shaped for absorption: (H, d_nope, d_c), (H, d_c, d_v).

        ``q_C @ w_uk`` maps a head's query into latent space (so that it can be compared
        with c_KV directly), and ``o_latent @ w_uv`` maps an average of latents to the
        head's output.
        """
        w_uk = self.k_up.weight.view(self.n_heads, self.d_nope, self.kv_lora_rank)
        w_uv = self.v_up.weight.view(self.n_heads, self.d_v, self.kv_lora_rank)
        return w_uk, w_uv.transpose(-1, -2)

    def _attend_expanded(self, q_nope, q_rope, c_kv, k_rope, mask, causal):
        k, v = self.expand(c_kv, k_rope)                      # (B, H, S, d_qk), (B, H, S, d_v)
        q = torch.cat([q_nope, q_rope], dim=-1)               # (B, H, L, d_qk)
        return scaled_dot_product_attention(q, k, v, mask, causal=causal, scale=self.scale)

    def _attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask, causal):
        B, H, L, _ = q_nope.shape
        S = c_kv.shape[-2]
        w_uk, w_uv = self.absorbed_weights()                  # (H, d_nope, d_c), (H, d_c, d_v)
        q = torch.cat([q_nope @ w_uk, q_rope], dim=-1)        # (B, H, L, d_c + d_rope)
        k = torch.cat([c_kv, k_rope], dim=-1)                 # (B, S, d_c + d_rope): all heads
        # One key and value sequence for every head: fold the heads into the query rows,
        # (B, H*L, .), so the cache is read once, not copied H times by broadcasting.
        q = q.reshape(B, H * L, q.shape[-1])                  # (B, H*L, d_c + d_rope)
        mask = self._rows_mask(mask, causal, (B, H, L, S), like=q)  # (B, H*L, S) or None
        o_lat = scaled_dot_product_attention(q, k, c_kv, mask, scale=self.scale)
        return o_lat.view(B, H, L, -1) @ w_uv                 # (B, H, L, d_v)

    @staticmethod
    def _rows_mask(mask, causal, target, like):
        """``mask`` and the causal mask, combined and reshaped (B, H, L, S) -> (B, H*L, S)."""
        B, H, L, S = target
        if mask is not None:
            mask = check_mask(namespace(mask=mask, q=like), mask, target, like=like)
        if causal:
            allowed = causal_mask(L, S, like=like)            # (L, S), bottom-right aligned
            if mask is None:
                mask = allowed
            elif mask.dtype == torch.bool:
                mask = mask & allowed
            else:
                mask = mask.masked_fill(~allowed, -math.inf)
        if mask is None:
            return None
        return mask.broadcast_to(target).reshape(B, H * L, S)

    # ------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *, mask: torch.Tensor | None = None,
                causal: bool = False, cache: MLACache | None = None,
                positions: torch.Tensor | int | None = None,
                path: str = "expanded") -> torch.Tensor:
        """Self-attention over x, and over the cached tokens if ``cache`` is given.

        Args:
            x: (B, L, d_model), the new tokens.
            mask: optional, broadcastable to (B, H, L, S) where S counts cached and new
                tokens.  Boolean: True = may attend; floating: added to the scores.
            causal: bottom-right aligned causal mask (new token i sits at position
                S - L + i), what prefill and decoding need.
            cache: an :class:`MLACache`; the new latents are appended to it, and the
                queries attend to everything in it.
            positions: RoPE positions of the new tokens: None (``len(cache)`` onwards,
                or 0 onwards without a cache), an int offset, or a tensor (L,) / (B, L).
            path: ``"expanded"`` or ``"absorbed"`` (equal results, different cost).

        Returns:
            (B, L, d_model).
        """
        self._check_input(x, cache, path)
        if positions is None:
            positions = 0 if cache is None else len(cache)
        per_batch = torch.is_tensor(positions) and positions.ndim == 2  # (B, L)
        q_positions = positions[:, None] if per_batch else positions  # (B, 1, L): all heads
        q_nope, q_rope = self.queries(x, q_positions)         # (B, H, L, d_nope / d_rope)
        c_kv, k_rope = self.latents(x, positions)             # (B, L, d_c), (B, L, d_rope)
        if cache is not None:
            c_kv, k_rope = cache.update(c_kv, k_rope)         # (B, S, d_c), (B, S, d_rope)
        attend = self._attend_expanded if path == "expanded" else self._attend_absorbed
        o = attend(q_nope, q_rope, c_kv, k_rope, mask, causal)  # (B, H, L, d_v)
        return self.out_proj(merge_heads(o))                  # (B, L, d_model)

    def _check_input(self, x, cache, path) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch tensor (B, L, d_model = {self.d_model}); got "
                            f"{type(x).__name__}")
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be a tensor (B, L, d_model = {self.d_model}); "
                             f"got {tuple(x.shape)}")
        weight = next(self.parameters())
        if x.dtype != weight.dtype or x.device != weight.device:
            raise TypeError(f"x is {x.dtype} on {x.device} but the module's weights are "
                            f"{weight.dtype} on {weight.device}; convert one with .to(...)")
        if path not in _PATHS:
            raise ValueError(f"path must be one of {_PATHS}; got {path!r}")
        if cache is not None and not isinstance(cache, MLACache):
            raise TypeError(f"cache must be an MLACache; got {type(cache).__name__}")
        if cache is not None and len(cache) and cache.latent.shape[0] != x.shape[0]:
            raise ValueError(f"the cache holds batch size {cache.latent.shape[0]} but x "
                             f"has shape {tuple(x.shape)}")

    # ------------------------------------------------------------------- accounting
    def cache_elements_per_token(self) -> int:
        """Numbers cached per token: d_c + d_rope (MHA: 2 * H * d_head)."""
        return self.kv_lora_rank + self.d_rope

    def decode_flops(self, context_length: int) -> dict[str, int]:
        """:func:`mla_decode_flops` for this layer's sizes."""
        return mla_decode_flops(
            context_length, d_model=self.d_model, n_heads=self.n_heads,
            kv_lora_rank=self.kv_lora_rank, q_lora_rank=self.q_lora_rank,
            qk_nope_head_dim=self.d_nope, qk_rope_head_dim=self.d_rope, v_head_dim=self.d_v)

    # ------------------------------------------------------------------- loading
    @torch.no_grad()
    def load_deepseek_state_dict(self, state_dict: dict[str, torch.Tensor]):
        """Copy weights named as in Hugging Face's ``DeepseekV3Attention``.

        ``q_proj`` / ``q_b_proj`` (H * (d_nope + d_rope), ·) hold each head's nope rows
        followed by its rope rows; ``kv_a_proj_with_mqa`` (d_c + d_rope, d_model) stacks
        W_DKV over W_KR; ``kv_b_proj`` (H * (d_nope + d_v), d_c) holds each head's W_UK
        rows followed by its W_UV rows.  Biases are not supported.  Returns self.
        """
        sd = dict(state_dict)
        biases = [k for k, v in sd.items() if k.endswith(".bias") and v is not None]
        if biases:
            raise ValueError(f"biases are not supported; state_dict has {biases}")
        H, d_c = self.n_heads, self.kv_lora_rank

        def take(name):
            if name not in sd:
                raise ValueError(f"state_dict has no {name!r}; keys: {sorted(sd)}")
            return sd.pop(name)

        def per_head(w, sizes):  # (H * sum(sizes), n_in) -> one (H * size, n_in) per part
            parts = w.view(H, sum(sizes), w.shape[-1]).split(sizes, dim=1)
            return [p.reshape(-1, w.shape[-1]) for p in parts]

        if self.q_down is None:
            w_q = take("q_proj.weight")
        else:
            self._copy(self.q_down, take("q_a_proj.weight"), "q_a_proj.weight")
            self._copy(self.q_norm, take("q_a_layernorm.weight"), "q_a_layernorm.weight")
            w_q = take("q_b_proj.weight")
        w_uq, w_qr = per_head(w_q, [self.d_nope, self.d_rope])
        self._copy(self.q_nope_proj, w_uq, "q nope rows")
        self._copy(self.q_rope_proj, w_qr, "q rope rows")
        w_dkv, w_kr = take("kv_a_proj_with_mqa.weight").split([d_c, self.d_rope], dim=0)
        self._copy(self.kv_down, w_dkv, "kv_a_proj_with_mqa (latent rows)")
        self._copy(self.k_rope_proj, w_kr, "kv_a_proj_with_mqa (rope rows)")
        self._copy(self.kv_norm, take("kv_a_layernorm.weight"), "kv_a_layernorm.weight")
        w_uk, w_uv = per_head(take("kv_b_proj.weight"), [self.d_nope, self.d_v])
        self._copy(self.k_up, w_uk, "kv_b_proj (key rows)")
        self._copy(self.v_up, w_uv, "kv_b_proj (value rows)")
        self._copy(self.out_proj, take("o_proj.weight"), "o_proj.weight")
        if sd:
            raise ValueError(f"unexpected entries in state_dict: {sorted(sd)}")
        return self

    @staticmethod
    def _copy(layer: nn.Module, w: torch.Tensor, name: str) -> None:
        if tuple(layer.weight.shape) != tuple(w.shape):
            raise ValueError(f"{name} has shape {tuple(w.shape)}; expected "
                             f"{tuple(layer.weight.shape)}")
        layer.weight.copy_(w)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, "
                f"kv_lora_rank={self.kv_lora_rank}, q_lora_rank={self.q_lora_rank}, "
                f"qk_nope_head_dim={self.d_nope}, qk_rope_head_dim={self.d_rope}, "
                f"v_head_dim={self.d_v}, rope={self.rope_pairing}")


# ------------------------------------------------------------------------------ FLOPs
def mla_decode_flops(context_length: int, *, d_model: int, n_heads: int, kv_lora_rank: int,
                     q_lora_rank: int | None = None, qk_nope_head_dim: int,
                     qk_rope_head_dim: int, v_head_dim: int) -> dict[str, int]:
    """Matrix-multiply FLOPs (2 per multiply-add) of one decoded token of one MLA layer.

    The new token attends to ``S = context_length`` tokens (itself included).  Norms,
    RoPE and the softmax are not counted.  Three strategies:

    - ``"expanded"``: cache the latents and up-project all S of them into keys and
      values at every step (``2 S d_c H (d_nope + d_v)``), then attend over H heads of
      width d_nope + d_rope;
    - ``"absorbed"``: cache the latents; map the query into latent space
      (``2 H d_nope d_c``), attend over ``[c_KV, k_R]`` of width d_c + d_rope and
      average latents of width d_c, then apply W_UV once (``2 H d_c d_v``);
    - ``"cached_kv"``: cache the expanded keys and values (a cache as large as
      multi-head attention's) and only attend.

    All three share the projections of the new token (queries, latent, rope key, and
    W_O); only the expanded path grows with ``S * d_c * H``.  See chapter 13.

    Returns:
        dict with integer FLOPs for ``"expanded"``, ``"absorbed"`` and ``"cached_kv"``.
    """
    S = _positive_int("context_length", context_length)
    d, H = _positive_int("d_model", d_model), _positive_int("n_heads", n_heads)
    d_c = _positive_int("kv_lora_rank", kv_lora_rank)
    dn = _positive_int("qk_nope_head_dim", qk_nope_head_dim)
    dr = _positive_int("qk_rope_head_dim", qk_rope_head_dim)
    dv = _positive_int("v_head_dim", v_head_dim)
    if q_lora_rank is None:
        q = 2 * d * H * (dn + dr)
    else:
        dq = _positive_int("q_lora_rank", q_lora_rank)
        q = 2 * d * dq + 2 * dq * H * (dn + dr)
    shared = q + 2 * d * (d_c + dr) + 2 * H * dv * d             # queries, latents, W_O
    attend_heads = 2 * S * H * (dn + dr) + 2 * S * H * dv         # q k^T and a v per head
    up_project = 2 * S * d_c * H * (dn + dv)                      # k_up and v_up on S latents
    absorbed = 2 * H * dn * d_c + 2 * S * H * (d_c + dr) + 2 * S * H * d_c + 2 * H * d_c * dv
    return {"expanded": shared + up_project + attend_heads,
            "absorbed": shared + absorbed,
            "cached_kv": shared + attend_heads}
