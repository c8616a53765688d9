"""The self-grading exercises: the reference passes, and every named mistake is caught
and named in the report (attnlib.exercises)."""

import warnings

import numpy as np
import pytest
import torch

from attnlib import exercises

CASES = [(key, name) for key, ex in exercises.EXERCISES.items() for name in ex.mistakes]


@pytest.mark.parametrize("key", list(exercises.EXERCISES))
def test_reference_passes_every_case(key, capsys):
    ex = exercises.EXERCISES[key]
    assert exercises.check(key, ex.reference) is True
    assert f"{key}: all" in capsys.readouterr().out
    assert len(ex.cases(np.random.default_rng(0))) >= 3, "too few hidden cases"
    assert ex.mistakes, f"{key}: name at least one common mistake"


@pytest.mark.parametrize("key, mistake", CASES, ids=[f"{k}:{m[:40]}" for k, m in CASES])
def test_each_common_mistake_is_caught_and_named(key, mistake):
    wrong = exercises.EXERCISES[key].mistakes[mistake]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the overflowing mistakes
        with pytest.raises(exercises.ExerciseFailed) as failure:
            exercises.check(key, wrong)
    report = str(failure.value)
    assert f"Likely mistake: {mistake}." in report
    assert "; inputs " in report, "the report must show the inputs (shapes) of the failing case"


def test_a_function_that_raises_is_reported_with_the_case_and_shapes():
    def broken(q, k, v):
        return q @ k @ v  # forgot the transpose: shapes do not match

    with pytest.raises(exercises.ExerciseFailed, match=r"case 1 of \d+ .*inputs \(3, 2\), \(3, 2\).*raised ValueError"):
        exercises.check("ch03-sdpa", broken)


def test_wrong_shape_and_first_wrong_entry_are_described():
    with pytest.raises(exercises.ExerciseFailed, match=r"shape \(2, 3, 2, 4\), expected \(2, 2, 3, 4\).*another order"):
        exercises.check("ch07-split-heads", lambda x, h: x.reshape(x.shape[0], x.shape[1], h, -1))
    with pytest.raises(exercises.ExerciseFailed, match=r"differs at index \(0,\): got .*, expected"):
        exercises.check("ch01-softmax", lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True) + 1e-3)


def test_torch_answers_are_accepted():
    def attention(q, k, v):
        q, k, v = (torch.from_numpy(a) for a in (q, k, v))
        return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v

    assert exercises.check("ch03-sdpa", attention, quiet=True)


def test_unknown_key_lists_the_exercises():
    with pytest.raises(KeyError, match="ch03-sdpa"):
        exercises.check("ch99-nothing", print)


def test_online_step_reference_agrees_with_attnlib_flash():
    exercises._check_online_reference()


def test_chapter_2_references_agree_with_independent_computations():
    from attnlib import smoothing
    # Leave-one-out: each prediction is Nadaraya-Watson on the other S - 1 points.
    for x, y, h in [case.args for case in exercises.EXERCISES["ch02-leave-one-out"].cases(
            np.random.default_rng(3))]:
        loo = exercises.EXERCISES["ch02-leave-one-out"].reference(x, y, h)
        for i in range(len(x)):
            others = np.arange(len(x)) != i
            one = smoothing.nadaraya_watson(x[i:i + 1], x[others], y[others], "gaussian", h)[0]
            assert abs(loo[i] - one) < 1e-12
    # Nadaraya-Watson far from the data: the target of the nearest training point, no NaN.
    x_train, y_train = np.array([0.0, 1.0, 2.0]), np.array([5.0, -1.0, 3.0])
    far = exercises.EXERCISES["ch02-nadaraya-watson"].reference(
        np.array([-30.0, 40.0]), x_train, y_train, 0.05)
    assert np.array_equal(far, np.array([5.0, 3.0]))


def test_chapter_9_references_agree_with_independent_computations():
    import math
    # Sinusoidal encodings, one entry at a time from the formula (interleaved sin, cos).
    pe = exercises.EXERCISES["ch09-sinusoidal"].reference(7, 10)
    for p in range(7):
        for i in range(5):
            angle = p / 10000 ** (2 * i / 10)
            assert abs(pe[p, 2 * i] - math.sin(angle)) < 1e-15
            assert abs(pe[p, 2 * i + 1] - math.cos(angle)) < 1e-15
    # RoPE, rotate-half: pair (i, i + d/2) turned by p * 10000**(-2i/d) with a 2x2 matrix.
    rng = np.random.default_rng(4)
    x, positions = rng.normal(size=(3, 6)), np.array([0.0, 4.0, 250.5])
    out = exercises.EXERCISES["ch09-rope"].reference(x, positions)
    for row, p in enumerate(positions):
        for i in range(3):
            a = p * 10000 ** (-2 * i / 6)
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            assert np.allclose(out[row, [i, i + 3]], rot @ x[row, [i, i + 3]], atol=1e-12)
