"""Position information for attention (chapter 9).

Self-attention without positions is permutation-equivariant: shuffle the tokens and the
outputs are shuffled the same way.  This module holds the three families of fixes the
book compares, each written once for NumPy and torch:

- **absolute** encodings added to the token vectors: :func:`sinusoidal_positions`
  (Vaswani et al. 2017; the learned variant is a torch module,
  ``attnlib.nn.transformer.LearnedPositionEmbedding``);
- **a bias on the scores**: :func:`alibi_slopes`, :func:`alibi_bias` (Press et al. 2022),
  a float mask for :func:`attnlib.scaled_dot_product_attention`;
- **a rotation of queries and keys**: :func:`apply_rope` (Su et al. 2024) in both
  pairings found in real code, ``"rotate-half"`` (GPT-NeoX and Hugging Face's port of
  Llama: dimension i is paired with i + d/2) and
  ``"interleaved"`` (the RoFormer paper, GPT-J and Meta's reference Llama code, which
  rotates each pair as one complex number: 2i with 2i+1); :func:`rope_permutation`
  converts one into the other.  Hugging Face's Llama port runs Meta's checkpoints with
  rotate-half because its conversion script permutes the rows of W_Q and W_K within
  each head, by this permutation.

Shape letters: L query positions, S key positions, H heads, d the width rotated
(d_k for RoPE, d_model for sinusoidal encodings).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._backend import check_array, check_float, device_of, namespace

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "rope_frequencies",
    "rope_permutation",
    "sinusoidal_positions",
]

_PAIRINGS = ("rotate-half", "interleaved")


# ----------------------------------------------------------------------------- helpers
def _check_int(name: str, n: Any, minimum: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {n!r}")
    return int(n)


def _check_even(name: str, d: Any) -> int:
    d = _check_int(name, d, 2)
    if d % 2:
        raise ValueError(f"{name} must be even (dimensions come in pairs); got {d}")
    return d


def _check_base(base: Any) -> float:
    if isinstance(base, bool) or not isinstance(base, (int, float)) \
            or not math.isfinite(base) or base <= 1:
        raise ValueError(f"base must be a finite number > 1; got {base!r}")
    return float(base)


def _xp_device_dtype(like: Any):
    """Namespace, device and float dtype for arrays built from scratch."""
    if like is None:
        return namespace(like=np.empty(0)), "cpu", np.float64
    xp = namespace(like=like)
    if xp.isdtype(like.dtype, "real floating"):
        return xp, device_of(like), like.dtype
    return xp, device_of(like), xp.asarray(0.0).dtype  # torch: default float dtype


def _positions_array(positions: Any, like: Any):
    """An int n (positions 0..n-1) or a 1-D array of positions -> float (n,) array."""
    if isinstance(positions, (int, np.integer)) and not isinstance(positions, bool):
        n = _check_int("positions", positions, 0)
        xp, device, dtype = _xp_device_dtype(like)
        return xp.arange(n, dtype=dtype, device=device)
    check_array(positions, "positions", min_ndim=1)
    if positions.ndim != 1:
        raise ValueError(
            f"positions must be an int n or a 1-D array of shape (n,); got shape "
            f"{tuple(positions.shape)}"
        )
    xp = namespace(positions=positions, like=like)
    if like is not None:
        _, _, dtype = _xp_device_dtype(like)
    elif xp.isdtype(positions.dtype, "real floating"):
        dtype = positions.dtype
    else:  # integer positions: float64 for NumPy, torch's default float dtype
        dtype = np.float64 if isinstance(positions, np.ndarray) else xp.asarray(0.0).dtype
    return xp.astype(positions, dtype)


# ------------------------------------------------------------------- sinusoidal (absolute)
def sinusoidal_positions(positions: Any, d_model: int, *, base: float = 10000.0,
                         like: Any = None) -> Any:
    """The sinusoidal position encodings of Vaswani et al. (2017): (n, d_model).

    Row ``p`` holds, for i = 0 .. d_model/2 - 1, the pair::

        PE[p, 2i]     = sin(p / base**(2i / d_model))
        PE[p, 2i + 1] = cos(p / base**(2i / d_model))

    so each pair of dimensions is a point on a circle turning at its own frequency, from
    one radian per position (i = 0) down to 1/base radians per position.  They are added
    to the token embeddings once, at the input.

    Args:
        positions: an int n (positions 0 .. n-1) or a 1-D array (n,) of positions.
        d_model: the (even) width of the encodings.
        base: the longest wavelength is ``2 pi base`` positions.
        like: an array whose backend, device and float dtype the result should use
            (default: the backend of ``positions``; float64 NumPy for an int).

    Returns:
        (n, d_model) array.  See chapter 9.
    """
    d_model = _check_even("d_model", d_model)
    base = _check_base(base)
    p = _positions_array(positions, like)  # (n,)
    xp = namespace(p=p)
    two_i = xp.arange(0, d_model, 2, dtype=p.dtype, device=device_of(p))  # (d_model/2,)
    angles = p[:, None] / base ** (two_i / d_model)[None, :]  # (n, d_model/2)
    pe = xp.stack([xp.sin(angles), xp.cos(angles)], axis=-1)  # (n, d_model/2, 2)
    return xp.reshape(pe, (p.shape[0], d_model))  # (n, d_model): sin, cos, sin, cos ...


# ------------------------------------------------------------------------------ ALiBi
def _slopes_power_of_two(n: int) -> list[float]:
    # Geometric sequence starting at 2^(-8/n) with that same ratio.
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]


def _slopes(n: int) -> list[float]:
    if n & (n - 1) == 0:
        return _slopes_power_of_two(n)
    p = 2 ** int(math.floor(math.log2(n)))  # largest power of two below n
    # The paper's rule: the p slopes for p heads, then every other slope for 2p heads.
    return _slopes_power_of_two(p) + _slopes(2 * p)[0::2][: n - p]


def alibi_slopes(n_heads: int, *, like: Any = None) -> Any:
    """The per-head slopes m_h of ALiBi (Press et al. 2022): shape (H,).

    For H a power of two the slopes are the geometric sequence 2^(-8/H), 2^(-16/H),
    ..., 2^(-8) (for H = 8: 1/2, 1/4, ..., 1/256).  Otherwise, with P the largest
    power of two below H, they are the P slopes for P heads followed by the first
    H - P of the odd-numbered slopes for 2P heads, the rule of the paper's code.

    Args:
        n_heads: H >= 1.
        like: an array whose backend, device and float dtype the result should use
            (default float64 NumPy).
    """
    n_heads = _check_int("n_heads", n_heads, 1)
    xp, device, dtype = _xp_device_dtype(like)
    return xp.asarray(_slopes(n_heads), dtype=dtype, device=device)


def alibi_bias(n_heads: int, L: int, S: int | None = None, *, causal: bool = True,
               like: Any = None) -> Any:
    """ALiBi's additive bias on the scores, a float mask of shape (H, L, S).

    Entry ``[h, i, j] = -m_h * (pos_i - j)`` where ``pos_i = S - L + i`` is the
    position of query i among the keys (**bottom-right** convention, as attnlib's
    ``causal=True``: the L queries are the last L of the S positions, which is what a
    KV cache needs).  Each head penalises distant keys linearly with its own slope.

    With ``causal=True`` (the paper's setting) keys after the query get ``-inf``, so the
    bias is also the causal mask.  With ``causal=False`` the bias is the symmetric
    ``-m_h * |pos_i - j|``, a common extension to encoders (not in the paper).

    Pass it as ``mask=`` to :func:`attnlib.scaled_dot_product_attention`; it broadcasts
    against scores (B, H, L, S).  See chapter 9.
    """
    L = _check_int("L", L, 0)
    S = L if S is None else _check_int("S", S, 0)
    slopes = alibi_slopes(n_heads, like=like)  # (H,)
    xp = namespace(slopes=slopes)
    device = device_of(slopes)
    i = xp.arange(L, dtype=slopes.dtype, device=device)[:, None] + (S - L)  # (L, 1)
    j = xp.arange(S, dtype=slopes.dtype, device=device)[None, :]  # (1, S)
    distance = i - j  # (L, S): how far back key j lies
    minus_abs = xp.where(distance > 0, -distance, distance)  # -|i - j|, and +0.0 at 0
    bias = slopes[:, None, None] * minus_abs[None, :, :]  # (H, L, S)
    if causal:
        neg_inf = xp.asarray(-math.inf, dtype=slopes.dtype, device=device)
        bias = xp.where((distance >= 0)[None, :, :], bias, neg_inf)
    return bias


# ------------------------------------------------------------------------------- RoPE
def rope_frequencies(d: int, *, base: float = 10000.0, like: Any = None) -> Any:
    """RoPE's d/2 angular frequencies theta_i = base^(-2i/d), i = 0 .. d/2 - 1: (d/2,).

    Pair i of a query or key at position p is rotated by the angle p * theta_i.
    """
    d = _check_even("d", d)
    base = _check_base(base)
    xp, device, dtype = _xp_device_dtype(like)
    two_i = xp.arange(0, d, 2, dtype=dtype, device=device)  # (d/2,)
    return base ** (-two_i / d)


def _rope_positions(xp, x, positions):
    """Positions for the L rows of x: None -> 0..L-1, int -> offset + 0..L-1."""
    L = x.shape[-2]
    dtype = xp.float64 if x.dtype == xp.float64 else xp.float32
    if positions is None or (isinstance(positions, (int, np.integer))
                             and not isinstance(positions, bool)):
        offset = 0 if positions is None else int(positions)
        return xp.arange(L, dtype=dtype, device=device_of(x)) + offset  # (L,)
    check_array(positions, "positions", min_ndim=1)
    namespace(x=x, positions=positions)
    if positions.shape[-1] != L:
        raise ValueError(
            f"positions must have L = {L} entries in its last dimension (one per row "
            f"of x, shape {tuple(x.shape)}); got shape {tuple(positions.shape)}"
        )
    return xp.astype(positions, dtype)  # (..., L)


def apply_rope(x: Any, positions: Any = None, *, base: float = 10000.0,
               pairing: str = "rotate-half") -> Any:
    """Rotary position embedding (Su et al. 2024): rotate pairs of dimensions of x.

    The row of x at position p has its d/2 pairs of dimensions rotated, pair i by the
    angle p * theta_i with theta_i = base^(-2i/d).  Applied to queries and keys (never
    values), it makes q_m . k_n depend on the positions only through m - n.

    Args:
        x: queries or keys, (..., L, d) with d even (NumPy array or torch tensor,
            float; gradients flow through it).
        positions: where the L rows sit.  None: 0 .. L-1.  An int t: t .. t+L-1 (the
            offset of new tokens when decoding with a KV cache).  An array (L,) or
            (..., L) broadcastable to x's leading dimensions: any positions.
        base: the base of the frequencies (10000 in the paper and in Llama 2).
        pairing: which dimensions form a pair.
            ``"rotate-half"`` (GPT-NeoX, Hugging Face's port of Llama): i with
            i + d/2.
            ``"interleaved"`` (the RoFormer paper, GPT-J, Mesh TF, Meta's reference
            Llama code): 2i with 2i + 1.
            The two are equal up to a fixed permutation of the d dimensions
            (:func:`rope_permutation`), so a checkpoint trained with one can be used
            with the other by permuting the output dimensions of W_Q and W_K (the
            columns of the book's (d_model, d_k) matrices, the rows of an
            ``nn.Linear`` weight), as Hugging Face does when it converts Meta's Llama
            weights.

    Returns:
        Same shape, backend, device and dtype as x; norms of each row unchanged.
        The angles are computed in float32 (float64 for float64 x).  See chapter 9.
    """
    check_array(x, "x", min_ndim=2, shape_hint="(..., L, d)")
    xp = namespace(x=x)
    check_float(xp, "x", x)
    d = _check_even("the last dimension d of x", x.shape[-1])
    if pairing not in _PAIRINGS:
        raise ValueError(f"pairing must be one of {_PAIRINGS}; got {pairing!r}")
    p = _rope_positions(xp, x, positions)  # (..., L)
    theta = xp.astype(rope_frequencies(d, base=base, like=p), p.dtype)  # (d/2,)
    angles = p[..., None] * theta  # (..., L, d/2)
    cos = xp.astype(xp.cos(angles), x.dtype)
    sin = xp.astype(xp.sin(angles), x.dtype)
    if pairing == "rotate-half":
        x1, x2 = x[..., : d // 2], x[..., d // 2:]  # (..., L, d/2) each
        return xp.concat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    xe, xo = x[..., 0::2], x[..., 1::2]  # (..., L, d/2) each
    out = xp.stack([xe * cos - xo * sin, xo * cos + xe * sin], axis=-1)  # (..., L, d/2, 2)
    return xp.reshape(out, (*out.shape[:-2], d))  # (..., L, d)


def rope_permutation(d: int) -> np.ndarray:
    """Indices ``perm`` (d,) taking the interleaved layout to the rotate-half layout.

    ``perm = [0, 2, 4, ..., d-2, 1, 3, ..., d-1]``: the even dimensions first, then the
    odd ones.  For any x (..., L, d)::

        apply_rope(x[..., perm], pairing="rotate-half")
            == apply_rope(x, pairing="interleaved")[..., perm]

    Permuting the columns of W_Q and W_K (the rows of their transposes) by ``perm``
    turns a model trained with one pairing into the same model with the other.
    """
    d = _check_even("d", d)
    return np.concatenate([np.arange(0, d, 2), np.arange(1, d, 2)])
