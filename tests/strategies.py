"""Hypothesis profiles and shared strategies for attnlib's property-based tests.

Profiles (chosen with the environment variable ``HYPOTHESIS_PROFILE``):

- ``ci`` (the default): 200 examples per property, derandomized (the same examples on
  every run, so a failure reproduces), no deadline, no example database.
- ``slow``: 2000 examples per property, otherwise the same.  Run it with
  ``HYPOTHESIS_PROFILE=slow make unit``.

Importing this module registers and loads the profile, so every test file that uses
Hypothesis imports it first.

The strategies draw *shapes, dtypes, backends, masks and a seed*; the arrays themselves
come from ``np.random.default_rng(seed)`` (fast, and their size is bounded by the
shapes).  Shapes include 1 and primes (2, 3, 5, 7, 17, 31); lengths L and S, and widths
d_k and d_v, are drawn independently, so most examples have L != S and d_k != d_v.
Values are drawn in float64, rounded to the dtype under test, and the float64
reference is computed from the rounded values: a comparison measures only the error
of the computation.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# ------------------------------------------------------------------------------ profiles
_COMMON = dict(deadline=None, derandomize=True, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("slow", max_examples=2000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# ------------------------------------------------------------------------------- basics
LENGTHS = (1, 2, 3, 5, 7, 17, 31)  # L and S: 1 and primes
WIDTHS = (1, 2, 3, 5, 7, 8)  # d_k, d_v, d: 1, primes and a power of two
EVEN_WIDTHS = (2, 4, 6, 8)  # RoPE and sinusoidal encodings rotate pairs
BATCHES = ((), (1,), (2,), (3,), (2, 3), (1, 2))  # leading (batch, head) dimensions
DTYPES = ("float16", "float32", "float64")
BACKENDS = ("numpy", "torch")

lengths = st.sampled_from(LENGTHS)
small_lengths = st.sampled_from(LENGTHS[:5])  # up to 7: for per-token Python loops
widths = st.sampled_from(WIDTHS)
even_widths = st.sampled_from(EVEN_WIDTHS)
batch_shapes = st.sampled_from(BATCHES)
dtypes = st.sampled_from(DTYPES)
backends = st.sampled_from(BACKENDS)
seeds = st.integers(0, 2**32 - 1)
head_counts = st.sampled_from((1, 2, 3, 4, 6))
#: Magnitude of the random values; "ints" gives small integers (exact in every dtype,
#: so dot products tie exactly) and "zeros" gives zero vectors.
value_styles = st.sampled_from(("normal", "normal", "normal", "wide", "ints", "zeros"))

#: Unit roundoff of each dtype.
UNIT_ROUNDOFF = {"float16": 2.0**-11, "float32": 2.0**-24, "float64": 2.0**-53}


def random_values(rng: np.random.Generator, shape, dtype: str, style: str = "normal"):
    """A NumPy array of ``shape`` in ``dtype``, drawn from ``rng`` in the given style."""
    shape = tuple(int(n) for n in shape)
    if style == "ints":
        x = rng.integers(-2, 3, size=shape).astype(np.float64)
    elif style == "zeros":  # about half of the vectors (rows along the last axis) zero
        x = rng.standard_normal(shape)
        if len(shape) > 1:
            x[rng.random(shape[:-1]) < 0.5] = 0.0
        else:
            x[rng.random(shape) < 0.5] = 0.0
    elif style == "wide":
        x = rng.standard_normal(shape) * 3.0
    else:
        x = rng.standard_normal(shape)
    return x.astype(dtype)


def to_backend(x, backend: str):
    """A NumPy array (any dtype) as the backend under test; dtype and shape kept."""
    if x is None or backend == "numpy":
        return x
    return torch.from_numpy(np.array(x, copy=True))


def to_numpy(x) -> np.ndarray:
    """Any attnlib result as a float64 (or bool) NumPy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.numpy() if x.dtype == torch.bool else x.to(torch.float64).numpy()
    x = np.asarray(x)
    return x if x.dtype == bool else x.astype(np.float64)


def f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def assert_close(actual, expected, dtype: str, magnitude: float = 1.0, *, factor: float = 4.0,
                 atol: float = 0.0, what: str = "result") -> None:
    """``|actual - expected| <= factor * u(dtype) * magnitude + atol`` entrywise, same shape.

    ``magnitude`` is the size of the first-order rounding error the computation can make,
    in units of the unit roundoff u (e.g. ``max|v| * (1 + max|score|) * (d_k + S)`` for
    attention).  Infinite entries of ``expected`` must be matched exactly, and no entry of
    ``actual`` may be NaN.
    """
    a, e = to_numpy(actual), f64(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != reference {e.shape}"
    assert not np.isnan(a).any(), f"{what}: NaN where the reference has {e[np.isnan(a)]}"
    inf = ~np.isfinite(e)
    assert np.array_equal(a[inf], e[inf]), f"{what}: infinities differ from the reference"
    assert np.isfinite(a[~inf]).all(), f"{what}: an infinity where the reference is finite"
    err = float(np.max(np.abs(a[~inf] - e[~inf]), initial=0.0))
    tol = factor * UNIT_ROUNDOFF[dtype] * max(float(magnitude), 1.0) + atol
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g} ({dtype})"


def amax(x) -> float:
    """max |x| over the finite entries (0 for an empty array)."""
    x = f64(x)
    return float(np.max(np.abs(x[np.isfinite(x)]), initial=0.0))


def score_bound(q, k, scale: float, bias=None) -> float:
    """max over (i, j) of scale * sum_d |q_id| |k_jd| (+ max|finite bias|): the size of
    the terms a score sums, which bounds its rounding error even under cancellation."""
    qa, ka = np.abs(f64(q)), np.abs(f64(k))
    s = float(np.max(np.einsum("...ld,...sd->...ls", qa, ka), initial=0.0)) * abs(scale)
    return s + (0.0 if bias is None else amax(bias))


def attention_magnitude(q, k, v, scale: float, bias=None) -> float:
    """First-order error scale of softmax(q k^T scale + bias) @ v, in units of u:
    max(1, max|v|) (1 + score bound) (d_k + S + 1)."""
    n_terms = q.shape[-1] + k.shape[-2] + 1
    return max(amax(v), 1.0) * (1.0 + score_bound(q, k, scale, bias)) * n_terms


# ------------------------------------------------------------------------------- masks
def _dead_rows(draw, m: np.ndarray) -> np.ndarray:
    """Mask out a few whole rows (queries with no key at all) of an (..., L, S) mask."""
    if m.shape[-2] == 0 or m.shape[-1] == 0:
        return m
    rows = draw(st.sets(st.integers(0, m.shape[-2] - 1), max_size=min(3, m.shape[-2])))
    m = m.copy()
    for r in rows:
        m[..., r, :] = False
    return m


@st.composite
def bool_masks(draw, batch: tuple, L: int, S: int, *, dead_rows: bool = True,
               shapes: tuple = ("LS", "full", "lead1", "keys")):
    """A boolean mask (True = may attend) that broadcasts to ``batch + (L, S)``.

    Its shape is one of (L, S), the full ``batch + (L, S)``, ``(1, ...) + (L, S)`` or a
    key-padding ``batch + (1, S)``; its density is 0, 0.2, 0.5, 0.8 or 1; with
    ``dead_rows`` a few query rows are masked entirely.
    """
    kind = draw(st.sampled_from(shapes))
    shape = {"LS": (L, S), "full": (*batch, L, S), "lead1": (*(1,) * len(batch), L, S),
             "keys": (*batch, 1, S)}[kind]
    density = draw(st.sampled_from((0.0, 0.2, 0.5, 0.8, 1.0)))
    rng = np.random.default_rng(draw(seeds))
    m = rng.random(shape) < density
    return _dead_rows(draw, m) if dead_rows else m


def causal_reference(L: int, S: int, align: str = "bottom-right") -> np.ndarray:
    """(L, S) boolean: query i may see key j when j <= i + (S - L) (bottom-right) or
    j <= i (top-left).  Written as a double loop, independent of attnlib."""
    offset = S - L if align == "bottom-right" else 0
    out = np.zeros((L, S), dtype=bool)
    for i in range(L):
        for j in range(S):
            out[i, j] = j <= i + offset
    return out


# ---------------------------------------------------------------------------- cases
@dataclass
class AttentionCase:
    """Inputs of one attention call, as NumPy arrays in ``dtype`` (mask: bool or None)."""

    backend: str
    dtype: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    mask: np.ndarray | None
    causal: bool
    scale: float | None

    @property
    def L(self) -> int:
        return self.q.shape[-2]

    @property
    def S(self) -> int:
        return self.k.shape[-2]

    def allowed(self) -> np.ndarray:
        """The boolean (..., L, S) pattern of allowed pairs: mask and causal."""
        a = np.ones((self.L, self.S), dtype=bool) if self.mask is None else self.mask
        if self.causal:
            a = a & causal_reference(self.L, self.S)
        return a

    def effective_scale(self) -> float:
        return 1.0 / math.sqrt(self.q.shape[-1]) if self.scale is None else self.scale

    def magnitude(self, bias=None) -> float:
        """The error scale of attention on these inputs (see attention_magnitude)."""
        return attention_magnitude(self.q, self.k, self.v, self.effective_scale(), bias)

    def tensors(self):
        """q, k, v, mask in the backend under test."""
        return tuple(to_backend(x, self.backend) for x in (self.q, self.k, self.v, self.mask))


@st.composite
def attention_cases(draw, *, masks: bool = True, causal: bool | None = None,
                    scale: bool = True, broadcast: bool = True, dtype=None,
                    backend=None, style=None) -> AttentionCase:
    """q (..., L, d_k), k (..., S, d_k), v (..., S, d_v) with optional mask, causal flag
    and scale; the leading dimensions of q, k and v may differ and broadcast."""
    dt = draw(dtypes) if dtype is None else dtype
    be = draw(backends) if backend is None else backend
    batch = draw(batch_shapes)
    L, S, d_k, d_v = draw(lengths), draw(lengths), draw(widths), draw(widths)
    style = draw(value_styles) if style is None else style
    rng = np.random.default_rng(draw(seeds))

    def lead():  # a leading shape that broadcasts to batch
        if not broadcast or not batch:
            return batch
        return tuple(draw(st.sampled_from((n, 1))) for n in batch)

    q = random_values(rng, (*lead(), L, d_k), dt, style)
    k = random_values(rng, (*lead(), S, d_k), dt, style)
    v = random_values(rng, (*lead(), S, d_v), dt, style)
    # The mask broadcasts to the scores (..., L, S), whose leading dimensions are those of
    # q and k (as in PyTorch, a mask may not add dimensions that only v has).
    full = tuple(np.broadcast_shapes(q.shape[:-2], k.shape[:-2]))
    mask = draw(st.none() | bool_masks(full, L, S)) if masks else None
    is_causal = draw(st.booleans()) if causal is None else causal
    sc = draw(st.none() | st.sampled_from((0.25, 1.0, 0.7))) if scale else None
    return AttentionCase(be, dt, q, k, v, mask, is_causal, sc)
