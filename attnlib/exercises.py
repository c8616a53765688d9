"""Exercises that grade themselves: run a reader's function against attnlib's own.

::

    from attnlib import exercises
    exercises.check("ch03-sdpa", my_attention)

:func:`check` calls the reader's function on hidden random cases, edge cases included
(one query, L != S, d_k != d_v, huge scores, rows with every key masked), compares each
result with attnlib's reference, and reports in words what went wrong: the case and the
shapes that broke, the first wrong entry, and, when the wrong answer is exactly what a
common mistake gives (the softmax over the wrong axis, a missing scale, a mask read the
wrong way round), the name of that mistake.  It prints a short report, and raises
:class:`ExerciseFailed` (an ``AssertionError``) when a case fails, so a notebook cell that
calls it fails too.  :func:`describe` prints what an exercise asks for; :data:`EXERCISES`
lists them all by chapter.

The reader's function receives NumPy float64 arrays and may return NumPy arrays or torch
tensors.  The mistakes listed for each exercise are implemented here too, and the tests
check that each one is caught and named (``tests/test_exercises.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

__all__ = ["EXERCISES", "Exercise", "ExerciseFailed", "check", "describe"]


class ExerciseFailed(AssertionError):
    """A reader's function gave a wrong answer on at least one case."""


@dataclass
class Case:
    name: str          # what the case tests, in words
    args: tuple        # positional arguments given to the function


@dataclass
class Exercise:
    key: str
    chapter: int
    task: str                                   # what to write, with the signature
    reference: Callable                         # attnlib's answer
    cases: Callable[[np.random.Generator], list[Case]]
    mistakes: dict[str, Callable] = field(default_factory=dict)  # name -> a wrong version
    rtol: float = 1e-6
    atol: float = 1e-8


EXERCISES: dict[str, Exercise] = {}


def _exercise(**kwargs) -> None:
    EXERCISES[kwargs["key"]] = Exercise(**kwargs)


# -- comparing answers ----------------------------------------------------------------

def _as_numpy(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return tuple(_as_numpy(t) for t in x)
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64) if not isinstance(x, np.ndarray) or x.dtype != bool \
        else x


def _shape_text(args: tuple) -> str:
    return ", ".join(f"{tuple(a.shape)}" if hasattr(a, "shape") else repr(a) for a in args)


def _close(got, want, ex: Exercise, equal_nan: bool = False) -> bool:
    """Same shape and values (NaN matches NaN only with ``equal_nan``, as when a reader's
    answer is compared with a mistaken version)."""
    if isinstance(want, tuple):
        return isinstance(got, tuple) and len(got) == len(want) and all(
            _close(g, w, ex, equal_nan) for g, w in zip(got, want))
    got = np.asarray(got)
    if got.shape != want.shape:
        return False
    if want.dtype == bool:
        return bool(np.array_equal(got.astype(bool), want))
    with np.errstate(invalid="ignore"):
        return bool(np.allclose(got, want, rtol=ex.rtol, atol=ex.atol, equal_nan=equal_nan))


def _difference(got, want, ex: Exercise, label: str = "the result") -> str:
    """The first thing that differs, in words."""
    if isinstance(want, tuple):
        if not isinstance(got, tuple) or len(got) != len(want):
            return f"expected a tuple of {len(want)} arrays, got {type(got).__name__}"
        for i, (g, w) in enumerate(zip(got, want)):
            if not _close(g, w, ex):
                return _difference(g, w, ex, f"output {i}")
        return "no difference"
    got = np.asarray(got)
    if got.shape != want.shape:
        hint = ""
        if sorted(got.shape) == sorted(want.shape):
            hint = " (the same sizes in another order: a transpose or a reshape that mixes axes?)"
        return f"{label} has shape {got.shape}, expected {want.shape}{hint}"
    if want.dtype != bool and not np.isfinite(got).all():
        where = tuple(int(i) for i in np.argwhere(~np.isfinite(got))[0])
        return (f"{label} has {_number(got[where])} at index {where}: an overflow (exp of a large "
                f"score?) or 0/0 (a row with nothing to attend to?)")
    bad = ~np.isclose(got, want, rtol=ex.rtol, atol=ex.atol) if want.dtype != bool \
        else got.astype(bool) != want
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return (f"{label} differs at index {where}: got {_number(got[where])}, expected "
            f"{_number(want[where])} "
            f"({int(bad.sum())} of {bad.size} entries wrong)")


def _number(x) -> str:
    return str(bool(x)) if isinstance(x, (bool, np.bool_)) else f"{float(x):.6g}"


def _call(fn: Callable, case: Case):
    return _as_numpy(fn(*[a.copy() if isinstance(a, np.ndarray) else a for a in case.args]))


def check(key: str, fn: Callable, *, seed: int = 0, quiet: bool = False) -> bool:
    """Run ``fn`` on the hidden cases of exercise ``key`` and report.

    Returns True when every case passes; raises :class:`ExerciseFailed`, with what went
    wrong in words, when one does not.  ``quiet`` prints nothing on success.
    """
    if key not in EXERCISES:
        raise KeyError(f"no exercise {key!r}; the exercises are: {', '.join(EXERCISES)}")
    ex = EXERCISES[key]
    cases = ex.cases(np.random.default_rng(seed))
    for n, case in enumerate(cases, start=1):
        want = _call(ex.reference, case)
        try:
            got = _call(fn, case)
        except Exception as error:
            raise ExerciseFailed(
                f"{key}: case {n} of {len(cases)} ({case.name}; inputs {_shape_text(case.args)}): "
                f"your function raised {type(error).__name__}: {error}") from error
        if _close(got, want, ex):
            continue
        message = [f"{key}: case {n} of {len(cases)} fails ({case.name}; inputs "
                   f"{_shape_text(case.args)}).", "  " + _difference(got, want, ex)]
        for mistake, wrong in ex.mistakes.items():
            try:
                if _close(got, _call(wrong, case), ex, equal_nan=True):
                    message.append(f"  Likely mistake: {mistake}.")
                    break
            except Exception:
                continue
        raise ExerciseFailed("\n".join(message))
    if not quiet:
        print(f"{key}: all {len(cases)} cases pass ({'; '.join(c.name for c in cases)}).")
    return True


def describe(key: str) -> None:
    """Print what exercise ``key`` asks for."""
    ex = EXERCISES[key]
    print(f"{key} (chapter {ex.chapter}): {ex.task}")


# -- the exercises, in the order of the book ------------------------------------------
# References come from attnlib; the imports are local so that `import attnlib.exercises`
# stays light.

def _softmax_cases(rng):
    return [Case("a vector", (rng.normal(size=5),)),
            Case("a batch of rows", (rng.normal(size=(3, 7)),)),
            Case("three axes", (rng.normal(size=(2, 3, 4)),)),
            Case("huge scores (naive exp overflows)", (rng.normal(size=(2, 6)) * 400 + 800,)),
            Case("one entry per row", (rng.normal(size=(4, 1)),))]


def _ref_softmax(x):
    from .softmax import softmax
    return softmax(x, axis=-1)


def _softmax_no_max(x):
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(x)
        return e / e.sum(-1, keepdims=True)


_exercise(
    key="ch01-softmax", chapter=1,
    task="softmax(x): the softmax over the last axis of an array of any shape; it must not "
         "overflow for scores in the thousands.",
    reference=_ref_softmax, cases=_softmax_cases,
    mistakes={
        "the softmax is taken over the first axis instead of the last":
            lambda x: np.exp(x - x.max(0)) / np.exp(x - x.max(0)).sum(0),
        "exp overflows: subtract each row's maximum before np.exp": _softmax_no_max,
        "the exponentials are not divided by their sum": lambda x: np.exp(x - x.max(-1, keepdims=True)),
        "the row sum is taken over the whole array, not each row":
            lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum(),
    })


def _lookup_cases(rng):
    def qkv(L, n, d, d_v):
        return rng.normal(size=(L, d)), rng.normal(size=(n, d)), rng.normal(size=(n, d_v))
    return [Case("2 queries, 4 keys, d = 3, temperature 1", (*qkv(2, 4, 3, 2), 1.0)),
            Case("temperature 0.1 (sharper)", (*qkv(3, 5, 3, 4), 0.1)),
            Case("temperature 10 (flatter)", (*qkv(1, 3, 2, 1), 10.0)),
            Case("one key", (*qkv(2, 1, 3, 2), 1.0))]


def _ref_soft_lookup(q, k, v, t):
    from .lookup import soft_lookup
    return soft_lookup(q, k, v, temperature=t)


def _soft(q, k, v, t):
    s = q @ k.T / t
    w = np.exp(s - s.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


_exercise(
    key="ch01-soft-lookup", chapter=1,
    task="soft_lookup(q, k, v, temperature): queries q (L, d), keys k (n, d), values v (n, d_v); "
         "each query's blend of the values with weights softmax(q @ k.T / temperature) over "
         "the keys; returns (L, d_v).",
    reference=_ref_soft_lookup, cases=_lookup_cases,
    mistakes={
        "the scores are multiplied by the temperature instead of divided":
            lambda q, k, v, t: _soft(q, k, v, 1 / t) @ v,
        "the temperature is ignored": lambda q, k, v, t: _soft(q, k, v, 1.0) @ v,
        "the weights are not normalised (no softmax)": lambda q, k, v, t: np.exp(q @ k.T / t) @ v,
        "the hard lookup (argmax) is returned instead of the blend":
            lambda q, k, v, t: v[np.argmax(q @ k.T, axis=-1)],
    })


def _nw_scores(xq, xt, h, variance=False):
    """The Gaussian log-kernel -(x - x_j)^2 / (2 h^2) of scalar inputs: (L, S).  With
    ``variance`` the bandwidth is (wrongly) read as a variance: -(x - x_j)^2 / (2 h)."""
    d2 = (xq[:, None] - xt[None, :]) ** 2
    return -d2 / (2 * h) if variance else -d2 / (2 * h**2)


def _nw_cases(rng):
    def data(L, S):  # L queries and S training points in [0, 6], S targets
        return rng.uniform(0, 6, L), np.sort(rng.uniform(0, 6, S)), rng.normal(size=S)
    far = (np.array([-15.0, 2.0, 20.0]), *data(0, 9)[1:])  # queries far outside [0, 6]
    return [Case("5 queries and 8 training points (h = 0.5)", (*data(5, 8), 0.5)),
            Case("one query (h = 0.3)", (*data(1, 6), 0.3)),
            Case("one training point: every prediction is its target", (*data(4, 1), 0.7)),
            Case("a wide bandwidth h = 4: close to the mean of the targets", (*data(3, 7), 4.0)),
            Case("queries far outside the data with h = 0.05: every kernel value "
                 "underflows to 0", (*far, 0.05))]


def _ref_nw(xq, xt, yt, h):
    from .smoothing import nadaraya_watson
    return nadaraya_watson(xq, xt, yt, kernel="gaussian", bandwidth=h)


def _nw_naive(xq, xt, yt, h):
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.exp(_nw_scores(xq, xt, h))
        return (k / k.sum(1, keepdims=True)) @ yt


_exercise(
    key="ch02-nadaraya-watson", chapter=2,
    task="nadaraya_watson(x_query, x_train, y_train, h): scalar inputs x_query (L,) and x_train "
         "(S,), targets y_train (S,), bandwidth h > 0; the Gaussian-kernel prediction "
         "sum_j w_j y_j with w_j proportional to exp(-(x - x_j)^2 / (2 h^2)) and the weights "
         "of each query summing to one over the S training points; returns (L,). It must give "
         "a number, not NaN, for a query far from every training point.",
    reference=_ref_nw, cases=_nw_cases,
    mistakes={
        "the kernel values are not normalised: divide by their sum over the training points "
        "so that the weights sum to one": lambda xq, xt, yt, h: np.exp(_nw_scores(xq, xt, h)) @ yt,
        "the bandwidth is used as a variance, exp(-(x - x_j)^2 / (2 h)), instead of a standard "
        "deviation, exp(-(x - x_j)^2 / (2 h^2))":
            lambda xq, xt, yt, h: _ref_softmax(_nw_scores(xq, xt, h, variance=True)) @ yt,
        "the weights are normalised over the queries (axis 0) instead of over the training "
        "points (axis 1)": lambda xq, xt, yt, h: (lambda k: (k / k.sum(0, keepdims=True)) @ yt)(
            np.exp(_nw_scores(xq, xt, h))),
        "far from the data every kernel value underflows to 0 and the weights are 0/0: "
        "subtract each query's largest score before np.exp (chapter 1's shift invariance)":
            _nw_naive,
    })


def _loo_cases(rng):
    def data(S):  # S training points in [0, 6] and their targets
        return np.sort(rng.uniform(0, 6, S)), rng.normal(size=S)
    x_dup = np.array([0.5, 1.0, 1.0, 1.5, 2.5, 3.0])      # two training points at x = 1
    x_far = np.array([0.0, 0.1, 0.3, 0.5, 0.6, 20.0])     # one point far from the others
    return [Case("6 points (h = 0.5)", (*data(6), 0.5)),
            Case("two points: each is predicted by the other", (*data(2), 0.8)),
            Case("a wide bandwidth (h = 5)", (*data(7), 5.0)),
            Case("two training points at the same input: each must still count for "
                 "the other", (x_dup, rng.normal(size=6), 0.4)),
            Case("one point far from the others with h = 0.1: its kernel values "
                 "underflow to 0", (x_far, rng.normal(size=6), 0.1))]


def _ref_loo(x, y, h):
    from .sdpa import mask_scores
    from .smoothing import kernel_scores
    keep = ~np.eye(len(x), dtype=bool)  # (S, S), True = may attend: never the point itself
    return _ref_softmax(mask_scores(kernel_scores(x, x, "gaussian", h), keep)) @ y


def _loo_naive(x, y, h):
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.exp(_nw_scores(x, x, h)) * (1 - np.eye(len(x)))
        return (k / k.sum(1, keepdims=True)) @ y


_exercise(
    key="ch02-leave-one-out", chapter=2,
    task="loo_predictions(x, y, h): training inputs x (S,), targets y (S,) with S >= 2, "
         "bandwidth h > 0; for each i, the Gaussian Nadaraya-Watson prediction of y[i] from "
         "all the other training points (point i itself gets weight 0); returns (S,).",
    reference=_ref_loo, cases=_loo_cases,
    mistakes={
        "the training point itself is not left out: mask the diagonal so that point i gets "
        "weight 0 in its own prediction": lambda x, y, h: _ref_nw(x, x, y, h),
        "the weights are zeroed on the diagonal after the softmax but not renormalised: "
        "mask the scores (-inf) before it, or divide by the new row sums":
            lambda x, y, h: (_ref_softmax(_nw_scores(x, x, h)) * (1 - np.eye(len(x)))) @ y,
        "points are left out by value (x_j == x_i) instead of by index: another training "
        "point at the same input is a different point and must count":
            lambda x, y, h: _ref_softmax(np.where(x[:, None] != x[None, :],
                                                  _nw_scores(x, x, h), -np.inf)) @ y,
        "far from the others a point's kernel values underflow to 0 and its weights are 0/0: "
        "subtract each row's largest allowed score before np.exp": _loo_naive,
    })


def _sdpa_cases(rng):
    def qkv(*shape_q, S, d_v):
        *batch, L, d = shape_q
        return (rng.normal(size=(*batch, L, d)), rng.normal(size=(*batch, S, d)),
                rng.normal(size=(*batch, S, d_v)))
    return [Case("L = S = 3, d_k = d_v = 2", qkv(3, 2, S=3, d_v=2)),
            Case("L = 4 queries, S = 6 keys", qkv(4, 8, S=6, d_v=8)),
            Case("d_v = 5 differs from d_k = 3", qkv(2, 3, S=4, d_v=5)),
            Case("one query", qkv(1, 16, S=5, d_v=16)),
            Case("batch and heads (2, 3, L, d)", qkv(2, 3, 4, 8, S=4, d_v=8)),
            Case("large d_k = 256", qkv(3, 256, S=7, d_v=4))]


def _ref_sdpa(q, k, v):
    from .sdpa import scaled_dot_product_attention
    return scaled_dot_product_attention(q, k, v)


def _sdpa_with(q, k, v, scale, axis=-1):
    s = q @ np.swapaxes(k, -1, -2) * scale
    w = np.exp(s - s.max(axis, keepdims=True))
    return (w / w.sum(axis, keepdims=True)) @ v


_exercise(
    key="ch03-sdpa", chapter=3,
    task="attention(q, k, v): q (..., L, d_k), k (..., S, d_k), v (..., S, d_v) -> "
         "softmax(q k^T / sqrt(d_k)) v, of shape (..., L, d_v).",
    reference=_ref_sdpa, cases=_sdpa_cases,
    mistakes={
        "the scores are not divided by sqrt(d_k)": lambda q, k, v: _sdpa_with(q, k, v, 1.0),
        "the scores are divided by d_k instead of sqrt(d_k)":
            lambda q, k, v: _sdpa_with(q, k, v, 1 / q.shape[-1]),
        "the softmax runs over the queries (axis -2) instead of the keys (axis -1)":
            lambda q, k, v: _sdpa_with(q, k, v, 1 / math.sqrt(q.shape[-1]), axis=-2),
        "the scores are multiplied by sqrt(d_k) instead of divided":
            lambda q, k, v: _sdpa_with(q, k, v, math.sqrt(q.shape[-1])),
    })


def _masked_cases(rng):
    s = rng.normal(size=(4, 6))
    causal = np.tril(np.ones((4, 6), bool), k=2)
    empty = np.ones((3, 5), bool)
    empty[1] = False
    return [Case("a random mask", (s, (rng.random((4, 6)) > 0.4) | np.eye(4, 6, dtype=bool))),
            Case("a causal mask, L = 4, S = 6", (s, causal)),
            Case("nothing masked", (rng.normal(size=(2, 3)), np.ones((2, 3), bool))),
            Case("a row with every key masked (must give zeros, not NaN)",
                 (rng.normal(size=(3, 5)), empty)),
            Case("huge scores", (rng.normal(size=(2, 4)) * 300 + 900, np.array(
                [[True, False, True, True], [False, True, True, False]])))]


def _ref_masked_softmax(scores, mask):
    from .sdpa import mask_scores
    from .softmax import softmax
    return softmax(mask_scores(scores, mask), axis=-1)


def _masked_with(scores, keep, fill):
    s = np.where(keep, scores, fill)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


_exercise(
    key="ch03-masked-softmax", chapter=3,
    task="masked_softmax(scores, mask): scores (L, S), mask (L, S) boolean with True = may "
         "attend; the softmax over the last axis with masked entries weighted 0. A row with "
         "every key masked gives zeros.",
    reference=_ref_masked_softmax, cases=_masked_cases,
    mistakes={
        "the mask is read the wrong way round (True should mean 'may attend')":
            lambda s, m: _ref_masked_softmax(s, ~m),
        "a row with every key masked gives uniform weights (-1e9 instead of -inf): return "
        "zeros there": lambda s, m: _masked_with(s, m, -1e9),
        "masked scores are set to 0 instead of -inf (exp(0) = 1 still gets weight)":
            lambda s, m: _masked_with(s, m, 0.0),
        "a row with every key masked gives NaN (0/0): return zeros there":
            lambda s, m: np.where(m.any(-1, keepdims=True), _ref_masked_softmax(s, m), np.nan),
        "the weights are multiplied by the mask after the softmax, without renormalising":
            lambda s, m: _ref_softmax(s) * m,
    })


def _backward_cases(rng):
    def wd(*shape):
        w = _ref_softmax(rng.normal(size=shape))
        return (w, rng.normal(size=shape))
    return [Case("one row of 5 weights", wd(5)), Case("4 rows of 6", wd(4, 6)),
            Case("batch (2, 3, 4)", wd(2, 3, 4)), Case("one weight per row", wd(3, 1))]


def _ref_softmax_backward(w, dw):
    from .backward import softmax_backward
    return softmax_backward(w, dw)


_exercise(
    key="ch04-softmax-backward", chapter=4,
    task="softmax_backward(w, dw): w = softmax(s) over the last axis and dw = dLoss/dw, both "
         "(..., n); return dLoss/ds = w * (dw - sum(w * dw, last axis)).",
    reference=_ref_softmax_backward, cases=_backward_cases,
    mistakes={
        "the term - sum(w * dw) is missing (that is the diagonal of the Jacobian only)":
            lambda w, dw: w * dw,
        "the sum runs over the whole array instead of each row": lambda w, dw: w * (dw - (w * dw).sum()),
        "the sum runs over the first axis": lambda w, dw: w * (dw - (w * dw).sum(0, keepdims=True)),
        "the factor w in front is missing": lambda w, dw: dw - (w * dw).sum(-1, keepdims=True),
    })


def _sdpa_backward_cases(rng):
    def case(L, S, d, d_v):
        return (rng.normal(size=(L, d)), rng.normal(size=(S, d)), rng.normal(size=(S, d_v)),
                rng.normal(size=(L, d_v)))
    return [Case("L = S = 3, d = 2", case(3, 3, 2, 2)), Case("L = 2, S = 5", case(2, 5, 4, 4)),
            Case("d_v = 3 differs from d_k = 6", case(4, 4, 6, 3)), Case("one query", case(1, 4, 8, 2))]


def _ref_sdpa_backward(q, k, v, do):
    from .backward import sdpa_backward
    return sdpa_backward(q, k, v, do)


def _sdpa_backward_variant(q, k, v, do, *, scale_grads=True, dv_transposed=True,
                           full_softmax_backward=True):
    """The backward pass by hand, with one of its steps optionally done wrong."""
    scale = 1 / math.sqrt(q.shape[-1])
    w = _ref_softmax(q @ k.T * scale)
    dv = w.T @ do if dv_transposed else w @ do
    dw = do @ v.T
    ds = w * (dw - (w * dw).sum(-1, keepdims=True)) if full_softmax_backward else w * dw
    g = scale if scale_grads else 1.0
    return ds @ k * g, ds.T @ q * g, dv


_exercise(
    key="ch04-sdpa-backward", chapter=4,
    task="sdpa_backward(q, k, v, do): q (L, d), k (S, d), v (S, d_v), do = dLoss/dO (L, d_v) "
         "for O = softmax(q k^T / sqrt(d)) v; return (dq, dk, dv).",
    reference=_ref_sdpa_backward, cases=_sdpa_backward_cases,
    mistakes={
        "dq and dk miss the factor 1/sqrt(d) of the scores":
            lambda q, k, v, do: _sdpa_backward_variant(q, k, v, do, scale_grads=False),
        "dv uses W instead of W^T (dv = W^T dO)":
            lambda q, k, v, do: _sdpa_backward_variant(q, k, v, do, dv_transposed=False),
        "the softmax backward misses its - sum(w * dw) term":
            lambda q, k, v, do: _sdpa_backward_variant(q, k, v, do, full_softmax_backward=False),
    })


def _split_cases(rng):
    return [Case("B = 2, L = 3, d_model = 8, 2 heads", (rng.normal(size=(2, 3, 8)), 2)),
            Case("4 heads of width 3", (rng.normal(size=(1, 5, 12)), 4)),
            Case("one head", (rng.normal(size=(2, 4, 6)), 1)),
            Case("L = 1", (rng.normal(size=(3, 1, 8)), 4))]


def _ref_split(x, h):
    from .multihead import split_heads
    return split_heads(x, h)


_exercise(
    key="ch07-split-heads", chapter=7,
    task="split_heads(x, n_heads): x (B, L, d_model) -> (B, H, L, d_model // H); head h holds "
         "features h*d_head .. (h+1)*d_head - 1 of every position.",
    reference=_ref_split, cases=_split_cases,
    mistakes={
        "reshaped straight to (B, H, L, d_head) without the transpose: that mixes positions "
        "into heads; reshape to (B, L, H, d_head), then swap axes 1 and 2":
            lambda x, h: x.reshape(x.shape[0], h, x.shape[1], x.shape[2] // h),
        "the features are dealt out round-robin (feature i to head i % H) instead of in "
        "contiguous blocks": lambda x, h: np.swapaxes(
            x.reshape(x.shape[0], x.shape[1], x.shape[2] // h, h), 1, 3).swapaxes(2, 3),
    })


def _merge_cases(rng):
    return [Case("B = 2, H = 2, L = 3, d_head = 4", (rng.normal(size=(2, 2, 3, 4)),)),
            Case("one head", (rng.normal(size=(1, 1, 5, 3)),)),
            Case("L = 1, 4 heads", (rng.normal(size=(2, 4, 1, 2)),))]


def _ref_merge(x):
    from .multihead import merge_heads
    return merge_heads(x)


_exercise(
    key="ch07-merge-heads", chapter=7,
    task="merge_heads(x): x (B, H, L, d_head) -> (B, L, H * d_head), the inverse of split_heads.",
    reference=_ref_merge, cases=_merge_cases,
    mistakes={
        "reshaped straight to (B, L, H * d_head) without moving the head axis next to d_head":
            lambda x: x.reshape(x.shape[0], x.shape[2], -1),
    })


def _causal_cases(rng):
    return [Case("L = S = 4", (4, 4)), Case("decoding: L = 1 new query, S = 5 keys", (1, 5)),
            Case("L = 3 queries, S = 7 keys", (3, 7)), Case("L = S = 1", (1, 1))]


def _ref_causal(L, S):
    from .masks import causal_mask
    return np.asarray(causal_mask(L, S))


_exercise(
    key="ch08-causal-mask", chapter=8,
    task="causal_mask(L, S): a boolean (L, S) array, True = may attend; the L queries are the "
         "last L of the S positions (bottom-right alignment), so query i sees keys 0 .. S - L + i.",
    reference=_ref_causal, cases=_causal_cases,
    mistakes={
        "the mask is top-left aligned (np.tril(ones(L, S))), which is wrong when L != S: the "
        "queries are the *last* L positions": lambda L, S: np.tril(np.ones((L, S), bool)),
        "True marks the hidden keys instead of the visible ones": lambda L, S: ~_ref_causal(L, S),
        "the diagonal is excluded: a query must see its own key": lambda L, S: np.tril(
            np.ones((L, S), bool), k=S - L - 1),
    })


def _sinusoidal_cases(rng):
    return [Case("6 positions, d_model = 8", (6, 8)),
            Case("position 0 only: sin 0 = 0 and cos 0 = 1 in every pair", (1, 16)),
            Case("d_model = 2: a single pair", (5, 2)),
            Case("100 positions, d_model = 64", (100, 64)),
            Case("2048 positions, d_model = 6: large angles", (2048, 6))]


def _ref_sinusoidal(n, d_model):
    from .positions import sinusoidal_positions
    return sinusoidal_positions(n, d_model)


def _sinusoidal_angles(n, d_model, exponent):
    """(n, d_model/2) angles p / 10000**exponent(i) for the pair index i."""
    i = np.arange(d_model // 2)
    return np.arange(n)[:, None] / 10000.0 ** exponent(i)[None, :]


def _sinusoidal_with(n, d_model, *, swap=False, halves=False, exponent=None):
    a = _sinusoidal_angles(n, d_model, exponent or (lambda i: 2 * i / d_model))
    first, second = (np.cos(a), np.sin(a)) if swap else (np.sin(a), np.cos(a))
    if halves:
        return np.concatenate([first, second], axis=-1)
    return np.stack([first, second], axis=-1).reshape(n, d_model)


def _sinusoidal_own_index(n, d_model):
    # Each dimension j uses its own index in the exponent: 10000**(j / d_model).
    j = np.arange(d_model)
    a = np.arange(n)[:, None] / 10000.0 ** (j / d_model)[None, :]
    return np.where(j % 2 == 0, np.sin(a), np.cos(a))


_exercise(
    key="ch09-sinusoidal", chapter=9,
    task="sinusoidal(n, d_model): the (n, d_model) float64 sinusoidal encodings of positions "
         "0 .. n-1, d_model even: for each pair i = 0 .. d_model/2 - 1, PE[p, 2i] = "
         "sin(p / 10000**(2i / d_model)) and PE[p, 2i + 1] = cos(p / 10000**(2i / d_model)) "
         "(sines and cosines interleaved, as attnlib.positions.sinusoidal_positions).",
    reference=_ref_sinusoidal, cases=_sinusoidal_cases,
    mistakes={
        "sin and cos are swapped: the even dimensions 2i hold the sine, the odd ones 2i + 1 "
        "the cosine": lambda n, d: _sinusoidal_with(n, d, swap=True),
        "the sines and cosines are concatenated (all sines, then all cosines) instead of "
        "interleaved: pair i is dimensions 2i and 2i + 1":
            lambda n, d: _sinusoidal_with(n, d, halves=True),
        "the exponent is i / d_model with i the pair index; it should be 2i / d_model":
            lambda n, d: _sinusoidal_with(n, d, exponent=lambda i: i / d),
        "each dimension j uses its own index in the exponent, 10000**(j / d_model), so the "
        "cosine of pair i turns slower than its sine: both use 2i / d_model":
            _sinusoidal_own_index,
    })


def _rope_cases(rng):
    return [Case("L = 5 positions 0..4, d = 8", (rng.normal(size=(5, 8)), np.arange(5.0))),
            Case("d = 2: a single pair", (rng.normal(size=(4, 2)), np.arange(4.0))),
            Case("positions that are not 0..L-1: a decoding offset, fractional and large "
                 "positions", (rng.normal(size=(4, 6)), np.array([17.0, 2.5, 1000.0, 0.0]))),
            Case("batch and heads (2, 3, L, d), one position per row",
                 (rng.normal(size=(2, 3, 4, 16)), np.arange(4.0) + 3)),
            Case("d = 64, 32 positions", (rng.normal(size=(32, 64)), np.arange(32.0)))]


def _ref_rope(x, positions):
    from .positions import apply_rope
    return apply_rope(x, positions)


def _rope_interleaved(x, positions):
    from .positions import apply_rope
    return apply_rope(x, positions, pairing="interleaved")


def _rope_freqs(x, positions, freqs):
    """Rotate-half RoPE with per-dimension frequencies ``freqs`` (d,) for the cos/sin."""
    d = x.shape[-1]
    a = positions[:, None] * freqs[None, :]                      # (L, d)
    rotated = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], axis=-1)
    return x * np.cos(a) + rotated * np.sin(a)


def _rope_theta(d, two=2):
    return 10000.0 ** (-two * np.arange(d // 2) / d)             # (d/2,)


_exercise(
    key="ch09-rope", chapter=9,
    task="rope(x, positions): x (..., L, d) with d even, positions (L,) floats; the rotary "
         "embedding in attnlib's default rotate-half pairing: for i < d/2, dimension i is "
         "paired with i + d/2 and the pair is turned by the angle a = positions * theta_i, "
         "theta_i = 10000**(-2i / d): (x_i, x_{i+d/2}) -> (x_i cos a - x_{i+d/2} sin a, "
         "x_{i+d/2} cos a + x_i sin a); returns the same shape as x (as "
         "attnlib.positions.apply_rope(x, positions)).",
    reference=_ref_rope, cases=_rope_cases,
    mistakes={
        "the pairs are interleaved, (2i, 2i + 1), as in the RoFormer paper; attnlib's default "
        "pairs dimension i with i + d/2 (rotate-half)":
            _rope_interleaved,
        "the rotation goes the wrong way (angle -p theta_i): check the sign of the sine terms, "
        "or of rotate_half, which must give (-x2, x1)": lambda x, p: _ref_rope(x, -p),
        "the two dimensions of a pair get different frequencies (theta repeated as "
        "theta_0, theta_0, theta_1, theta_1, ... instead of concatenated): with rotate-half, "
        "dimensions i and i + d/2 must share theta_i":
            lambda x, p: _rope_freqs(x, p, np.repeat(_rope_theta(x.shape[-1]), 2)),
        "theta_i = 10000**(-i / d); the exponent is -2i / d":
            lambda x, p: _rope_freqs(x, p, np.tile(_rope_theta(x.shape[-1], two=1), 2)),
    })


def _repeat_cases(rng):
    return [Case("2 KV heads, 2 query heads each", (rng.normal(size=(1, 2, 3, 4)), 2)),
            Case("MQA: 1 KV head for 4 query heads", (rng.normal(size=(2, 1, 5, 2)), 4)),
            Case("3 KV heads, n_rep = 2", (rng.normal(size=(1, 3, 2, 3)), 2)),
            Case("n_rep = 1", (rng.normal(size=(1, 2, 2, 2)), 1))]


def _ref_repeat(x, n):
    from .nn.gqa import repeat_kv
    return repeat_kv(x, n)


_exercise(
    key="ch12-repeat-kv", chapter=12,
    task="repeat_kv(x, n_rep): x (B, H_kv, S, d) -> (B, H_kv * n_rep, S, d) so that query head i "
         "meets KV head i // n_rep.",
    reference=_ref_repeat, cases=_repeat_cases,
    mistakes={
        "the heads are tiled (np.tile: KV head i % H_kv) instead of repeated (i // n_rep)":
            lambda x, n: np.tile(x, (1, n, 1, 1)),
    })


def _online_cases(rng):
    def state(n_rows, d_v, b):
        s0 = rng.normal(size=(n_rows, 3)) * 3
        v0 = rng.normal(size=(3, d_v))
        m = s0.max(-1)
        e = np.exp(s0 - m[:, None])
        return (m, e.sum(-1), e @ v0, rng.normal(size=(n_rows, b)) * 3 + 2,
                rng.normal(size=(b, d_v)))
    m, l, acc, s, v = state(2, 3, 4)
    return [Case("2 rows, a block of 4 keys", (m, l, acc, s, v)),
            Case("a block whose maximum is larger than the running one", (m, l, acc, s + 20, v)),
            Case("a block whose maximum is smaller", (m, l, acc, s - 20, v)),
            Case("one row, a block of 1 key", state(1, 2, 1))]


def _ref_online(m, l, acc, s, v):
    m_new = np.maximum(m, s.max(-1))
    alpha = np.exp(m - m_new)
    p = np.exp(s - m_new[:, None])
    return m_new, l * alpha + p.sum(-1), acc * alpha[:, None] + p @ v


def _check_online_reference():  # the reference agrees with attnlib's tiled weighted sum
    from .flash import online_softmax_weighted_sum
    rng = np.random.default_rng(1)
    s, v = rng.normal(size=(2, 8)), rng.normal(size=(8, 3))
    m = s[:, :4].max(-1)
    e = np.exp(s[:, :4] - m[:, None])
    m, l, acc = _ref_online(m, e.sum(-1), e @ v[:4], s[:, 4:], v[4:])
    out, _ = online_softmax_weighted_sum(s, v, block=4)
    assert np.allclose(acc / l[:, None], out)


_exercise(
    key="ch15-online-step", chapter=15,
    task="online_step(m, l, acc, s, v): the running max m (n,), sum l (n,) and unnormalised "
         "output acc (n, d_v) after a new block of scores s (n, b) with values v (b, d_v); "
         "return the updated (m, l, acc).",
    reference=_ref_online, cases=_online_cases,
    mistakes={
        "acc is not rescaled by exp(m_old - m_new) when the maximum grows":
            lambda m, l, acc, s, v: (lambda r: (r[0], r[1], acc + np.exp(s - r[0][:, None]) @ v))(
                _ref_online(m, l, acc, s, v)),
        "l is not rescaled by exp(m_old - m_new) when the maximum grows":
            lambda m, l, acc, s, v: (lambda r: (r[0], l + np.exp(s - r[0][:, None]).sum(-1), r[2]))(
                _ref_online(m, l, acc, s, v)),
        "the new block is exponentiated against the old maximum, not the new one":
            lambda m, l, acc, s, v: (np.maximum(m, s.max(-1)), l + np.exp(s - m[:, None]).sum(-1),
                                     acc + np.exp(s - m[:, None]) @ v),
    })
