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

For contexts longer than the training length (chapter 11), RoPE's frequencies are
changed rather than its rotation: :func:`rope_frequencies_pi` (position interpolation,
Chen et al. 2023), :func:`rope_frequencies_ntk` (NTK-aware scaling, bloc97 2023),
:func:`rope_frequencies_yarn` (YaRN, Peng et al. 2023, with its attention factor) and
:func:`rope_frequencies_llama3` (Llama 3.1's rule) each return a set of inverse
frequencies, and :func:`apply_rope_frequencies` rotates with any such set, also over
only the first dimensions of a head (partial rotary, GPT-NeoX's ``rotary_pct``;
:func:`partial_rotary_dims`).

Shape letters: L query positions, S key positions, H heads, d the width rotated
(d_k for RoPE, d_model for sinusoidal encodings).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._backend import check_array, check_float, device_of, namespace

__all__ = [
    "alibi_bias",
    "alibi_slopes",
    "apply_rope",
    "apply_rope_frequencies",
    "partial_rotary_dims",
    "rope_frequencies",
    "rope_frequencies_llama3",
    "rope_frequencies_ntk",
    "rope_frequencies_pi",
    "rope_frequencies_yarn",
    "rope_permutation",
    "yarn_attention_factor",
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
    return _rotate_pairs(xp, x, p[..., None] * theta, pairing)  # angles (..., L, d/2)


def _rotate_pairs(xp, x, angles, pairing, attention_factor=None):
    """Rotate the d pairs-worth of dimensions of x (..., L, d) by angles (..., L, d/2).

    With ``attention_factor``, cos and sin are multiplied by it first (YaRN's scaling,
    applied as Hugging Face applies it).
    """
    d = x.shape[-1]
    cos, sin = xp.cos(angles), xp.sin(angles)
    if attention_factor is not None:
        cos, sin = cos * attention_factor, sin * attention_factor
    cos, sin = xp.astype(cos, x.dtype), xp.astype(sin, x.dtype)
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


# ------------------------------------------------- RoPE past the training length (ch. 11)
# Each rule below returns RoPE's d/2 inverse frequencies theta'_i (radians per position),
# pair i = 0 (fastest) .. d/2 - 1 (slowest), for a model trained on L_train positions and
# run on about s * L_train.  apply_rope_frequencies rotates with them.
def _check_factor(factor: Any) -> float:
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) \
            or not math.isfinite(factor) or factor < 1:
        raise ValueError(f"factor (the context extension s = L_new / L_train) must be a "
                         f"finite number >= 1; got {factor!r}")
    return float(factor)


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return float(value)


def rope_frequencies_pi(d: int, factor: float, *, base: float = 10000.0,
                        like: Any = None) -> Any:
    """Position interpolation (Chen et al. 2023): every frequency divided by s, (d/2,).

    ``theta'_i = theta_i / s``, the same as squeezing the positions: position p is
    rotated as p / s was, so positions 0 .. s * L_train - 1 produce only the angles of
    0 .. L_train - 1, all seen in training.  The price: neighbouring positions are s
    times closer in angle, also in the fastest pairs.  (Hugging Face: ``"linear"``.)

    Args:
        d: the (even) number of rotated dimensions.
        factor: s >= 1, the context extension L_new / L_train.
        base, like: as in :func:`rope_frequencies`.
    """
    factor = _check_factor(factor)
    return rope_frequencies(d, base=base, like=like) / factor


def rope_frequencies_ntk(d: int, factor: float, *, base: float = 10000.0,
                         like: Any = None) -> Any:
    """NTK-aware scaling (bloc97 2023): a larger base, ``base * s**(d / (d - 2))``, (d/2,).

    The new base keeps the fastest pair exactly (theta'_0 = theta_0 = 1) and divides the
    slowest, i = d/2 - 1, by exactly s; the pairs between are divided by
    ``s**(2i / (d - 2))``, more the slower they turn.  High frequencies, which tell
    neighbours apart, are kept; low ones are interpolated.  Hugging Face's ``"dynamic"``
    rule is this with s chosen from the current sequence length.

    Args:
        d: the (even) number of rotated dimensions, at least 4.
        factor: s >= 1.
        base, like: as in :func:`rope_frequencies`.
    """
    d = _check_even("d", d)
    if d < 4:
        raise ValueError(f"NTK-aware scaling needs d >= 4 (its exponent is d / (d - 2)); "
                         f"got d = {d}")
    factor = _check_factor(factor)
    base = _check_base(base)
    return rope_frequencies(d, base=base * factor ** (d / (d - 2)), like=like)


def yarn_attention_factor(factor: float) -> float:
    """YaRN's attention factor ``0.1 ln(s) + 1`` (1 for s = 1).

    Queries and keys are both multiplied by it (through cos and sin), so the scores are
    multiplied by its square: a lower softmax temperature for the longer context.
    """
    factor = _check_factor(factor)
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_frequencies_yarn(d: int, factor: float, original_max_positions: int, *,
                          base: float = 10000.0, beta_fast: float = 32.0,
                          beta_slow: float = 1.0, truncate: bool = True,
                          like: Any = None):
    """YaRN (Peng et al. 2023): interpolate only the slow pairs, and a temperature.

    Pair i turns ``r_i = L_train / lambda_i`` times over the training context
    (``lambda_i = 2 pi / theta_i``, its wavelength).  Pairs that turn more than
    ``beta_fast`` times keep theta_i (they have seen every angle many times); pairs that
    turn less than ``beta_slow`` times are interpolated, theta_i / s, as in
    :func:`rope_frequencies_pi`; between them a linear ramp over the pair index i blends
    the two, ``theta'_i = (1 - gamma_i) theta_i / s + gamma_i theta_i``.  As in
    Hugging Face's implementation (``"yarn"``), the ramp runs between the indices where
    r_i = beta_fast and r_i = beta_slow, rounded outward when ``truncate``.

    Args:
        d: the (even) number of rotated dimensions.
        factor: s >= 1.
        original_max_positions: L_train, the context length of pre-training.
        base, like: as in :func:`rope_frequencies`.
        beta_fast, beta_slow: the paper's beta = 32 and alpha = 1 (turns over L_train).

    Returns:
        ``(inv_freq, attention_factor)``: the (d/2,) frequencies and
        :func:`yarn_attention_factor` (s), for :func:`apply_rope_frequencies`.
    """
    d = _check_even("d", d)
    factor = _check_factor(factor)
    base = _check_base(base)
    L_train = _check_int("original_max_positions", original_max_positions, 1)
    beta_fast = _check_positive("beta_fast", beta_fast)
    beta_slow = _check_positive("beta_slow", beta_slow)
    if beta_slow >= beta_fast:
        raise ValueError(f"beta_slow must be below beta_fast (turns over the training "
                         f"context); got beta_slow = {beta_slow}, beta_fast = {beta_fast}")

    def index_of(turns):  # the (real) pair index i where r_i = turns
        return d * math.log(L_train / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = index_of(beta_fast), index_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp; avoids dividing by zero
    theta = rope_frequencies(d, base=base, like=like)  # (d/2,)
    xp = namespace(theta=theta)
    i = xp.arange(d // 2, dtype=theta.dtype, device=device_of(theta))
    gamma = 1 - xp.clip((i - low) / (high - low), 0, 1)  # 1: keep theta_i, 0: theta_i / s
    return theta / factor * (1 - gamma) + theta * gamma, yarn_attention_factor(factor)


def rope_frequencies_llama3(d: int, factor: float, original_max_positions: int, *,
                            base: float = 10000.0, low_freq_factor: float = 1.0,
                            high_freq_factor: float = 4.0, like: Any = None) -> Any:
    """Llama 3.1's frequency-dependent scaling of RoPE: (d/2,).

    With ``lambda_i = 2 pi / theta_i`` the wavelength of pair i and L_train the
    pre-training context (8192 for Llama 3, with base 500000, s = 8, low_freq_factor 1,
    high_freq_factor 4):

    - ``lambda_i < L_train / high_freq_factor``: kept, theta_i;
    - ``lambda_i > L_train / low_freq_factor``: interpolated, theta_i / s;
    - between: ``(1 - g) theta_i / s + g theta_i`` with
      ``g = (L_train / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor)``,
      which runs from 0 to 1 across the band.

    Args:
        d: the (even) number of rotated dimensions.
        factor: s >= 1.
        original_max_positions: L_train.
        base, like: as in :func:`rope_frequencies`.
        low_freq_factor, high_freq_factor: the two band edges, as fractions of L_train.
    """
    factor = _check_factor(factor)
    L_train = _check_int("original_max_positions", original_max_positions, 1)
    low = _check_positive("low_freq_factor", low_freq_factor)
    high = _check_positive("high_freq_factor", high_freq_factor)
    if low >= high:
        raise ValueError(f"low_freq_factor must be below high_freq_factor; got "
                         f"low_freq_factor = {low}, high_freq_factor = {high}")
    theta = rope_frequencies(d, base=base, like=like)  # (d/2,)
    xp = namespace(theta=theta)
    wavelength = 2 * math.pi / theta  # (d/2,)
    g = (L_train / wavelength - low) / (high - low)  # < 0: slow band, > 1: fast band
    smoothed = (1 - g) * theta / factor + g * theta
    out = xp.where(wavelength > L_train / low, theta / factor, smoothed)
    return xp.where(wavelength < L_train / high, theta, out)


def partial_rotary_dims(head_dim: int, fraction: float) -> int:
    """How many of a head's dimensions RoPE rotates under partial rotary embedding.

    ``int(head_dim * fraction)``, the rule of GPT-NeoX's ``rotary_pct`` and Hugging
    Face's ``partial_rotary_factor`` (GPT-NeoX-20B: 96 * 0.25 = 24).  The result must be
    even and at least 2; compute the frequencies over this many dimensions, e.g.
    ``rope_frequencies(partial_rotary_dims(96, 0.25))``.
    """
    head_dim = _check_int("head_dim", head_dim, 2)
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number in (0, 1]; got {fraction!r}")
    n = int(head_dim * fraction)
    if n < 2 or n % 2:
        raise ValueError(f"head_dim * fraction = {head_dim} * {fraction} gives {n} rotary "
                         f"dimensions; it must be an even number >= 2")
    return n


def apply_rope_frequencies(x: Any, inv_freq: Any, positions: Any = None, *,
                           pairing: str = "rotate-half",
                           attention_factor: float = 1.0) -> Any:
    """RoPE with given inverse frequencies, over all or only the first dims of x.

    Pair i of the first ``2 m`` dimensions of x (m = len(inv_freq)) is rotated by the
    angle ``p * inv_freq[i]``; the remaining ``d - 2 m`` dimensions pass through
    unchanged (partial rotary embedding, as GPT-NeoX: they carry no position).  With
    ``inv_freq = rope_frequencies(d)`` this is :func:`apply_rope`.

    Args:
        x: queries or keys (..., L, d), float, NumPy or torch.
        inv_freq: (m,) frequencies with 2 m <= d, from :func:`rope_frequencies`,
            :func:`rope_frequencies_pi`, :func:`rope_frequencies_ntk`,
            :func:`rope_frequencies_yarn` (its first result) or
            :func:`rope_frequencies_llama3`; the backend of x.
        positions: as in :func:`apply_rope` (None, an int offset, or an array).
        pairing: ``"rotate-half"`` or ``"interleaved"``, within the rotated dimensions.
        attention_factor: multiplies cos and sin (so the rotated dimensions), as Hugging
            Face applies YaRN's factor; 1 leaves the norms unchanged.

    Returns:
        Same shape, backend, device and dtype as x.  See chapter 11.
    """
    check_array(x, "x", min_ndim=2, shape_hint="(..., L, d)")
    check_array(inv_freq, "inv_freq", min_ndim=1, shape_hint="(m,)")
    xp = namespace(x=x, inv_freq=inv_freq)
    check_float(xp, "x", x)
    check_float(xp, "inv_freq", inv_freq)
    if pairing not in _PAIRINGS:
        raise ValueError(f"pairing must be one of {_PAIRINGS}; got {pairing!r}")
    d, m = x.shape[-1], inv_freq.shape[0]
    if inv_freq.ndim != 1 or m < 1 or 2 * m > d:
        raise ValueError(
            f"inv_freq must have shape (m,) with 1 <= 2 m <= d = {d} (the last dimension "
            f"of x, shape {tuple(x.shape)}); got shape {tuple(inv_freq.shape)}")
    attention_factor = _check_positive("attention_factor", attention_factor)
    p = _rope_positions(xp, x, positions)  # (..., L)
    angles = p[..., None] * xp.astype(inv_freq, p.dtype)  # (..., L, m)
    factor = None if attention_factor == 1 else attention_factor
    rotated = _rotate_pairs(xp, x[..., : 2 * m], angles, pairing, factor)  # (..., L, 2m)
    if 2 * m == d:
        return rotated
    return xp.concat([rotated, x[..., 2 * m:]], axis=-1)  # (..., L, d)
