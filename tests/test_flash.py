"""attnlib.flash (chapter 15) against independent references: a float64 attention written
from the definition (conftest), torch.softmax/logsumexp, torch autograd through torch's
fused SDPA, and closed-form counts of the memory-traffic model."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, reference_attention, to_backend, to_numpy

import attnlib
from attnlib import backward as bw
from attnlib import flash as fl
from attnlib import flash_benchmark as fb

TOL = {"float32": 1e-5, "float64": 1e-10}

# (batch of q, batch of k/v, L, S, d_k, d_v): ones, primes, L != S both ways, d_k != d_v,
# broadcast leading dimensions.
SHAPES = [
    ((), (), 1, 1, 1, 1),
    ((2,), (2,), 17, 31, 3, 5),
    ((2,), (2,), 31, 17, 4, 2),
    ((2, 3), (1, 3), 5, 2, 4, 1),
    ((1,), (3,), 2, 3, 16, 7),
]
BLOCKS = [(1, 1), (3, 7), (16, 4), (64, 64)]  # tiles smaller than, across and beyond L, S


def _qkv(rng, shape, scale=1.0):
    bq, bk, L, S, dk, dv = shape
    return (scale * rng.standard_normal(bq + (L, dk)), scale * rng.standard_normal(bk + (S, dk)),
            rng.standard_normal(bk + (S, dv)))


def _allowed(L, S, causal, lengths=None, batch_ndim=0):
    """Boolean (…, L, S) mask built from scratch: bottom-right causal and key padding."""
    allowed = np.ones((L, S), bool)
    if causal:
        allowed = np.arange(S)[None, :] <= np.arange(L)[:, None] + (S - L)
    if lengths is not None:
        pad = np.arange(S)[None, :] < np.asarray(lengths)[:, None]  # (B, S)
        allowed = allowed & pad.reshape((len(lengths),) + (1,) * batch_ndim + (1, S))
    return allowed


def _reference_lse(q, k, allowed, scale=None):
    q, k = (torch.from_numpy(np.asarray(a, np.float64)) for a in (q, k))
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    z = (q @ k.transpose(-1, -2)) * scale
    z = z.masked_fill(~torch.from_numpy(np.broadcast_to(allowed, z.shape).copy()), -math.inf)
    return torch.logsumexp(z, dim=-1).numpy()


# ----------------------------------------------------------------------------- online softmax

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [1, 2, 5, 100])
def test_online_softmax_equals_torch_softmax(rng, backend, block):
    x = rng.standard_normal((3, 11)) * 30 + 500  # large: a naive exp would overflow
    x[1, 4:] = -np.inf  # masked keys
    x[2] = -np.inf  # a row with nothing allowed: zeros
    got = to_numpy(fl.online_softmax(to_backend(x, backend), block))
    expected = torch.softmax(torch.from_numpy(x[:2]), dim=-1).numpy()
    np.testing.assert_allclose(got[:2], expected, atol=1e-14)
    assert np.all(got[2] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [1, 3, 8, 50])
def test_online_weighted_sum_is_one_pass_softmax_times_values(rng, backend, block):
    scores = rng.standard_normal((2, 5, 13)) * 5
    scores[0, 1, :7] = -np.inf
    scores[1, 3] = -np.inf  # empty row
    values = rng.standard_normal((2, 13, 4))
    out, lse = fl.online_softmax_weighted_sum(to_backend(scores, backend),
                                              to_backend(values, backend), block)
    ts = torch.from_numpy(scores)
    weights = torch.nan_to_num(torch.softmax(ts, dim=-1), nan=0.0)  # empty row: 0
    np.testing.assert_allclose(to_numpy(out), (weights @ torch.from_numpy(values)).numpy(),
                               atol=1e-13)
    np.testing.assert_allclose(to_numpy(lse), torch.logsumexp(ts, dim=-1).numpy(), atol=1e-13)
    assert to_numpy(lse)[1, 3] == -np.inf


# ----------------------------------------------------------------------------- forward

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_equals_reference_attention(rng, backend, dtype, shape, causal):
    q, k, v = _qkv(rng, shape)
    L, S = shape[2], shape[3]
    allowed = _allowed(L, S, causal)
    expected = reference_attention(q, k, v, allowed)
    expected_lse = _reference_lse(q, k, allowed)
    args = [to_backend(a, backend, dtype) for a in (q, k, v)]
    for block_q, block_k in BLOCKS:
        out, lse = fl.flash_attention_forward(*args, causal=causal, block_q=block_q,
                                              block_k=block_k)
        assert type(out) is type(args[0]) and str(out.dtype).endswith(dtype)
        assert tuple(out.shape) == expected.shape and tuple(lse.shape) == expected.shape[:-1]
        np.testing.assert_allclose(to_numpy(out), expected, atol=TOL[dtype], rtol=0)
        np.testing.assert_array_equal(np.isfinite(to_numpy(lse)), np.isfinite(expected_lse))
        finite = np.isfinite(expected_lse)
        np.testing.assert_allclose(to_numpy(lse)[finite], expected_lse[finite],
                                   atol=TOL[dtype], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_equals_attnlib_sdpa_with_masks_and_scale(rng, backend):
    q, k, v = (to_backend(a, backend) for a in _qkv(rng, ((2, 3), (2, 3), 9, 14, 5, 3)))
    bool_mask = rng.random((2, 1, 9, 14)) > 0.4
    bool_mask[1, 0, 4] = False  # a query with no key
    float_mask = rng.standard_normal((9, 14))  # a bias, added to the scores
    for mask in (bool_mask, float_mask):
        for causal in (False, True):
            m = to_backend(mask, backend)
            expected = attnlib.scaled_dot_product_attention(q, k, v, m, causal=causal,
                                                            scale=0.3)
            out, _ = fl.flash_attention_forward(q, k, v, m, causal=causal, scale=0.3,
                                                block_q=4, block_k=5)
            np.testing.assert_allclose(to_numpy(out), to_numpy(expected), atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_with_key_lengths_equals_padding_mask(rng, backend, causal):
    lengths = [0, 1, 13, 20]  # an empty sequence, a single key, odd and full lengths
    q, k, v = _qkv(rng, ((4, 2), (4, 2), 11, 20, 6, 3))
    allowed = _allowed(11, 20, causal, lengths, batch_ndim=1)
    expected = reference_attention(q, k, v, allowed)
    out, lse = fl.flash_attention_forward(
        *(to_backend(a, backend) for a in (q, k, v)), causal=causal, block_q=4, block_k=6,
        key_lengths=to_backend(np.array(lengths), backend))
    np.testing.assert_allclose(to_numpy(out), expected, atol=1e-10)
    assert np.all(to_numpy(out)[0] == 0) and np.all(to_numpy(lse)[0] == -np.inf)
    expected_lse = _reference_lse(q, k, allowed)
    finite = np.isfinite(expected_lse)
    np.testing.assert_allclose(to_numpy(lse)[finite], expected_lse[finite], atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bottom_right_causal_with_more_queries_than_keys(rng, backend):
    """L > S: the first L - S queries see no key (zeros, lse = -inf), as in attnlib."""
    q, k, v = (to_backend(a, backend) for a in _qkv(rng, ((2,), (2,), 7, 3, 4, 2)))
    out, lse = fl.flash_attention_forward(q, k, v, causal=True, block_q=2, block_k=2)
    expected = attnlib.scaled_dot_product_attention(q, k, v, causal=True)
    np.testing.assert_allclose(to_numpy(out), to_numpy(expected), atol=1e-12)
    assert np.all(to_numpy(out)[:, :4] == 0) and np.all(to_numpy(lse)[:, :4] == -np.inf)
    assert np.all(np.isfinite(to_numpy(lse)[:, 4:]))


def test_forward_agrees_with_torch_bottom_right_mask(rng):
    q, k, v = (torch.from_numpy(a) for a in _qkv(rng, ((2, 3), (2, 3), 5, 12, 8, 8)))
    lower_right = torch.ones(5, 12, dtype=torch.bool).tril(diagonal=12 - 5)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=lower_right)
    out, _ = fl.flash_attention_forward(q, k, v, causal=True, block_q=2, block_k=5)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_half_precision_is_computed_in_float32(rng):
    q, k, v = (torch.from_numpy(a).half() for a in _qkv(rng, ((2,), (2,), 33, 40, 16, 16)))
    out, lse = fl.flash_attention_forward(q, k, v, causal=True, block_q=8, block_k=16)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    ref = attnlib.scaled_dot_product_attention(q.double(), k.double(), v.double(), causal=True)
    assert (out.double() - ref).abs().max() < 2e-3  # float16 rounding of the output only


def test_tile_schedule_matches_the_mask_and_the_visits(rng, monkeypatch):
    L, S, bq, bk, lengths = 10, 13, 3, 4, [13, 6]
    allowed = _allowed(L, S, True, lengths, batch_ndim=0)  # (2, L, S)
    kinds = fl.tile_schedule(L, S, block_q=bq, block_k=bk, causal=True, key_lengths=lengths)
    assert kinds.shape == (4, 4)
    for r, c in np.ndindex(*kinds.shape):
        tile = allowed[:, r * bq:(r + 1) * bq, c * bk:(c + 1) * bk]
        want = fl.SKIPPED if not tile.any() else fl.FULL if tile.all() else fl.PARTIAL
        assert kinds[r, c] == want, (r, c)
    visits = []
    real_step = fl._online_step
    monkeypatch.setattr(fl, "_online_step", lambda *a: visits.append(1) or real_step(*a))
    q, k, v = _qkv(rng, ((2,), (2,), L, S, 4, 3))
    out, _ = fl.flash_attention_forward(q, k, v, causal=True, block_q=bq, block_k=bk,
                                        key_lengths=lengths)
    assert len(visits) == np.count_nonzero(kinds) < kinds.size  # skipped tiles not computed
    np.testing.assert_allclose(out, reference_attention(q, k, v, allowed), atol=1e-12)


# ----------------------------------------------------------------------------- backward

def _torch_grads(q, k, v, dout, allowed=None, scale=None):
    """Gradients by torch autograd through torch's fused SDPA (independent of attnlib)."""
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    leaves = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    expanded = [t.expand(*batch, *t.shape[-2:]) for t in leaves]
    mask = None if allowed is None else torch.from_numpy(np.array(allowed))
    F.scaled_dot_product_attention(*expanded, attn_mask=mask, scale=scale).backward(
        torch.from_numpy(dout))
    return [t.grad.numpy() for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_backward_equals_torch_autograd(rng, backend, shape, causal):
    q, k, v = _qkv(rng, shape)
    L, S = shape[2], shape[3]
    batch = np.broadcast_shapes(shape[0], shape[1])
    dout = rng.standard_normal(batch + (L, shape[5]))
    allowed = _allowed(L, S, causal)
    expected = _torch_grads(q, k, v, dout, np.broadcast_to(allowed, batch + (L, S)))
    args = [to_backend(a, backend) for a in (q, k, v)]
    for block_q, block_k in BLOCKS[1:3]:
        out, lse = fl.flash_attention_forward(*args, causal=causal, block_q=block_q,
                                              block_k=block_k)
        grads = fl.flash_attention_backward(*args, out, lse, to_backend(dout, backend),
                                            causal=causal, block_q=block_q, block_k=block_k)
        for name, g, ref, a in zip("qkv", grads, expected, (q, k, v)):
            assert tuple(g.shape) == a.shape, name
            np.testing.assert_allclose(to_numpy(g), ref, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_equals_sdpa_backward_with_padding_and_mask(rng, backend):
    lengths = [9, 0, 4]
    q, k, v = _qkv(rng, ((3, 2), (3, 2), 6, 9, 5, 4))
    dout = rng.standard_normal((3, 2, 6, 4))
    bias = rng.standard_normal((6, 9))  # float mask, added
    pad = _allowed(6, 9, False, lengths, batch_ndim=1)
    args = [to_backend(a, backend) for a in (q, k, v)]
    kw = {"causal": True, "scale": 0.4, "block_q": 4, "block_k": 2,
          "key_lengths": to_backend(np.array(lengths), backend)}
    out, lse = fl.flash_attention_forward(*args, to_backend(bias, backend), **kw)
    grads = fl.flash_attention_backward(*args, out, lse, to_backend(dout, backend),
                                        to_backend(bias, backend), **kw)
    expected = bw.sdpa_backward(q, k, v, dout, np.where(pad, bias, -np.inf), causal=True,
                                scale=0.4)
    for name, g, ref in zip("qkv", grads, expected):
        assert np.all(np.isfinite(to_numpy(g))), name
        np.testing.assert_allclose(to_numpy(g), ref, atol=1e-10, err_msg=name)
    assert np.all(to_numpy(grads[0])[1] == 0)  # the empty sequence gets no gradient


def test_backward_equals_autograd_through_the_tiled_forward(rng):
    """The torch forward is differentiable as written; its autograd equals our backward."""
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in _qkv(rng, ((2,), (2,), 7, 10, 3, 2)))
    dout = torch.from_numpy(rng.standard_normal((2, 7, 2)))
    out, lse = fl.flash_attention_forward(q, k, v, causal=True, block_q=3, block_k=4)
    out.backward(dout)
    grads = fl.flash_attention_backward(q.detach(), k.detach(), v.detach(), out.detach(),
                                        lse.detach(), dout, causal=True, block_q=2, block_k=3)
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-12, rtol=1e-10)


def test_backward_float32_tolerance(rng):
    q, k, v = _qkv(rng, ((2,), (2,), 40, 37, 8, 8))
    dout = rng.standard_normal((2, 40, 8))
    args = [a.astype(np.float32) for a in (q, k, v)]
    out, lse = fl.flash_attention_forward(*args, causal=True, block_q=16, block_k=8)
    grads = fl.flash_attention_backward(*args, out, lse, dout.astype(np.float32), causal=True,
                                        block_q=16, block_k=8)
    expected = _torch_grads(q, k, v, dout, _allowed(40, 37, True))
    for g, ref in zip(grads, expected):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, ref, atol=1e-5)


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("kwargs, error, words", [
    ({"block_q": 0}, ValueError, ["block_q", "positive", "0"]),
    ({"block_k": -3}, ValueError, ["block_k", "-3"]),
    ({"block_q": 2.5}, ValueError, ["block_q"]),
    ({"block_k": True}, ValueError, ["block_k"]),
    ({"scale": float("nan")}, ValueError, ["scale"]),
    ({"causal": "yes"}, TypeError, ["causal"]),
    ({"key_lengths": [3, 4, 5]}, ValueError, ["key_lengths", "(2,)", "(3,)"]),
    ({"key_lengths": [3, 9]}, ValueError, ["key_lengths", "0..8"]),
    ({"key_lengths": [-1, 2]}, ValueError, ["key_lengths"]),
    ({"key_lengths": np.array([1.0, 2.0])}, TypeError, ["key_lengths", "integers"]),
])
def test_bad_forward_input_names_the_argument(rng, kwargs, error, words):
    q, k, v = _qkv(rng, ((2,), (2,), 5, 8, 4, 3))
    with pytest.raises(error) as info:
        fl.flash_attention_forward(q, k, v, **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_bad_inputs_of_shapes_backends_and_saved_tensors(rng):
    q, k, v = _qkv(rng, ((2,), (2,), 5, 8, 4, 3))
    with pytest.raises(ValueError, match="q and k"):
        fl.flash_attention_forward(q, k[..., :3], v)
    with pytest.raises(TypeError, match="cannot mix"):
        fl.flash_attention_forward(q, torch.from_numpy(k), v)
    with pytest.raises(ValueError, match="batch dimension"):
        fl.flash_attention_forward(q[0], k[0], v[0], key_lengths=[3])
    out, lse = fl.flash_attention_forward(q, k, v)
    dout = rng.standard_normal(out.shape)
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 5\)"):
        fl.flash_attention_backward(q, k, v, out, lse[:, :4], dout)
    with pytest.raises(ValueError, match="grad_out"):
        fl.flash_attention_backward(q, k, v, out, lse, dout[..., :2])
    with pytest.raises(ValueError, match="block"):
        fl.online_softmax(q, 0)
    with pytest.raises(ValueError, match="agree on S"):
        fl.online_softmax_weighted_sum(q, v, 2)


# ----------------------------------------------------------------------------- memory traffic

def _slope(xs, ys):
    return np.polyfit(np.log(xs), np.log(ys), 1)[0]


def test_flash_traffic_is_quadratic_in_n_and_inverse_in_m():
    d, M = 64, 2 ** 14
    ns = [2048, 4096, 8192, 16384]
    flash = [fl.flash_attention_traffic(n, d, M).total for n in ns]
    plain = [fl.plain_attention_traffic(n, d, M).total for n in ns]
    assert abs(_slope(ns, flash) - 2) < 0.1 and abs(_slope(ns, plain) - 2) < 0.1
    n = 8192
    ms = [2 ** 12, 2 ** 13, 2 ** 14, 2 ** 15]
    flash_m = [fl.flash_attention_traffic(n, d, m).total for m in ms]
    assert abs(_slope(ms, flash_m) + 1) < 0.1  # Theta(n^2 d^2 / M)
    ms = [2 ** 14, 2 ** 15, 2 ** 16, 2 ** 17]  # M >= 4 d^2: tiles of plain attention >= d
    plain_m = [fl.plain_attention_traffic(n, d, m).total for m in ms]
    assert abs(_slope(ms, plain_m)) < 0.15  # Theta(n d + n^2): M hardly matters ...
    assert min(plain_m) >= 4 * n * n  # ... Z and A cross the slow memory twice each


def test_flash_traffic_counts_in_closed_form():
    n, d, M = 1000, 16, 1000  # ragged blocks: B_c = 16, B_r = 9; 1000 = 62 * 16 + 8
    B_r, B_c = fl.flash_block_sizes(M, d)
    assert (B_r, B_c) == (9, 16)  # min(B_c, d) = 16 query rows would not fit in M
    count = fl.flash_attention_traffic(n, d, M)
    T_c = math.ceil(n / B_c)
    assert count.reads["K"] == count.reads["V"] == n * d  # K and V read once
    assert count.reads["Q"] == T_c * n * d  # Q read once per key block
    assert count.writes["O"] == n * d + T_c * n * d
    assert count.total == 2 * n * d + n * d + 2 * n + T_c * (3 * n * d + 4 * n)
    assert count.peak_fast <= M
    assert fl.flash_block_sizes(2 ** 16, 64) == (64, 256)  # the paper's B_r = min(B_c, d)
    assert fl.flash_block_sizes(1000, 64) == (3, 4)  # min(B_c, d) = 4 would not fit


def test_flash_block_sizes_fit_the_fast_memory_and_are_the_largest_that_do():
    for d in (1, 3, 16, 64, 128):
        for M in sorted({16 * d + 32, 1000, 4096, max(3 * d * d + 7, 16 * d + 32), 2 ** 14, 2 ** 16, 2 ** 18}):
            B_r, B_c = fl.flash_block_sizes(M, d)
            assert B_c == math.ceil(M / (4 * d))  # the paper's key block
            need = lambda b_r: 2 * B_c * d + 2 * b_r * d + 4 * b_r + b_r * B_c  # noqa: E731
            assert 1 <= B_r <= min(B_c, d) and need(B_r) <= M, (M, d, B_r, B_c)
            assert B_r == min(B_c, d) or need(B_r + 1) > M, (M, d, B_r, B_c)
            count = fl.flash_attention_traffic(4 * B_c + 3, d, M)
            assert count.peak_fast == need(B_r) <= M
            assert count.peak_parts["K_j"] == count.peak_parts["V_j"] == B_c * d
            assert count.peak_parts["Z_ij"] == B_r * B_c
    with pytest.raises(ValueError, match="too small"):
        fl.flash_block_sizes(4 * 64, 64)  # K_j and V_j leave no room for a query row


def test_the_simulator_refuses_a_working_set_larger_than_m():
    mem = fl.TwoLevelMemory(100)
    mem.hold(a=60, b=40)  # exactly full is allowed
    assert mem.count.peak_fast == 100 and mem.count.peak_parts == {"a": 60, "b": 40}
    mem.hold(30)
    assert mem.count.peak_fast == 100  # only the largest working set is kept
    with pytest.raises(fl.FastMemoryOverflowError, match=r"a = 60; b = 41.*M = 100"):
        mem.hold(a=60, b=41)
    with pytest.raises(fl.FastMemoryOverflowError):
        mem.hold(101)
    # the paper's formulas taken literally overflow a small fast memory ...
    n, d, M = 4096, 64, 2 ** 12
    B_c = math.ceil(M / (4 * d))
    with pytest.raises(fl.FastMemoryOverflowError, match="M = 4096") as info:
        fl.flash_attention_traffic(n, d, M, block_q=min(B_c, d), block_k=B_c)
    assert (info.value.needed, info.value.M) == (2 * B_c * d + 16 * (2 * d + B_c + 4), M)
    # ... while the default sizes fit, and move exactly as much (the count depends on B_c)
    fits = fl.flash_attention_traffic(n, d, M)
    assert fits.block_k == B_c and fits.block_q < min(B_c, d) and fits.peak_fast <= M
    literal = fl.flash_attention_traffic(n, d, 2 * M, block_q=min(B_c, d), block_k=B_c)
    assert literal.total == fits.total
    for M in (2 ** 12, 2 ** 14, 2 ** 16, 2 ** 18):
        assert fl.plain_attention_traffic(n, d, M).peak_fast <= M


def test_plain_traffic_writes_and_reads_the_n_by_n_arrays():
    n, d, M = 512, 32, 4096
    count = fl.plain_attention_traffic(n, d, M)
    assert count.writes["Z"] == count.writes["A"] == count.reads["A"] == n * n
    assert count.reads["Z"] == n * n  # a row of 512 fits in M: one read
    assert fl.plain_attention_traffic(8192, d, M).reads["Z"] == 2 * 8192 ** 2  # it does not
    assert count.reads["Q"] == n * d and count.writes["O"] == n * d
    assert count.peak_fast <= M
    assert fl.flash_attention_traffic(n, d, M).total < count.total  # d^2 < M: flash wins


@pytest.mark.parametrize("args, words", [((0, 64, 4096), ["n"]), ((128, 64, 100), ["M", "256"]),
                                         ((128, -1, 4096), ["d"])])
def test_traffic_bad_sizes(args, words):
    for fn in (fl.plain_attention_traffic, fl.flash_attention_traffic):
        with pytest.raises(ValueError) as info:
            fn(*args)
        assert all(w in str(info.value) for w in words)


# ----------------------------------------------------------------------------- benchmark

def test_benchmark_measures_memory_and_agrees(rng):
    q, k, v = (rng.standard_normal((64, 8), dtype=np.float32) for _ in range(3))
    np.testing.assert_allclose(fb.plain_attention(q, k, v),
                               attnlib.scaled_dot_product_attention(q, k, v), atol=1e-6)
    assert abs(fb.peak_extra_bytes(np.ones, 10 ** 6) - 8 * 10 ** 6) < 10 ** 4
    rows = fb.run_benchmark([96, 384], d=16, block=64, repeat=1, verbose=False)
    assert [r["n"] for r in rows] == [96, 384]
    last = rows[-1]
    assert last["plain_bytes"] >= 384 * 384 * 4  # at least one n x n float32 array
    assert last["tiled_bytes"] < last["plain_bytes"] / 4
    assert last["max_abs_diff"] < 1e-5
    assert "mem ratio" in fb.format_table(rows)


# ------------------------------------------------- the GPU benchmark's accuracy rule, on a CPU

def _gpu_benchmark():
    """attnlib.kernels.benchmark, imported as tests/test_flash_triton.py does: without a
    GPU, Triton's interpreter must be switched on before triton is first imported."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from attnlib.kernels import benchmark

    return benchmark


def _qkvdo(dtype, B=2, H=3, N=77, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(4))


def _plain_low_precision(causal):
    """The textbook algorithm in the inputs' dtype (the softmax in float32): the baseline."""
    def plain(q, k, v):
        z = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if causal:
            L, S = z.shape[-2:]
            z = z.masked_fill(~torch.ones(L, S, dtype=torch.bool).tril(S - L), float("-inf"))
        return torch.softmax(z.float(), dim=-1).to(q.dtype) @ v
    return plain


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by 1.05: a kernel with a wrong dK."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * 1.05


def test_benchmark_reference_is_plain_attention_in_float32():
    bm = _gpu_benchmark()
    q, k, v, do = _qkvdo(torch.float16, N=19, d=8)
    for causal in (False, True):
        ref = bm.reference_outputs(q, k, v, do, causal)
        assert all(r.dtype == torch.float32 for r in ref)
        q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
        o64 = F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal)
        o64.backward(do.double())
        for r, want in zip(ref, (o64, q64.grad, k64.grad, v64.grad)):
            assert (r.double() - want.detach()).abs().max() < 1e-5
        assert q.grad is None  # the inputs' own gradients are left alone


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_benchmark_accuracy_rule_passes_good_kernels_and_names_a_wrong_gradient(dtype, causal):
    bm = _gpu_benchmark()
    q, k, v, do = _qkvdo(dtype)
    reference = bm.reference_outputs(q, k, v, do, causal)
    baseline = bm.outputs_and_grads(_plain_low_precision(causal), q, k, v, do)

    def fused(q, k, v):  # a stand-in for the Triton kernel: PyTorch's fused SDPA on the CPU
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    report = bm.accuracy_report(bm.outputs_and_grads(fused, q, k, v, do), baseline, reference)
    assert set(report) == {"o", "dq", "dk", "dv"} and all(r["ok"] for r in report.values())
    for r in report.values():  # the numbers behind the verdict
        assert 0 < r["ours"] <= r["bound"] == bm.ACCURACY_FACTOR * r["baseline"] + r["slack"]
        assert 0 < r["slack"] < 0.1 and 0 < r["baseline"] < 0.1
    assert bm._worst_ratio(report) <= 1
    bm.check_accuracy(report)  # passes silently

    def wrong_dk(q, k, v):
        return fused(q, _ScaleGrad.apply(k), v)

    bad = bm.accuracy_report(bm.outputs_and_grads(wrong_dk, q, k, v, do), baseline, reference)
    assert [name for name, r in bad.items() if not r["ok"]] == ["dk"]
    assert bm._worst_ratio(bad) > 1
    with pytest.raises(AssertionError, match=r"dk: error .* > bound") as info:
        bm.check_accuracy(bad, "the fake kernel")
    assert "dq:" not in str(info.value) and "the fake kernel" in str(info.value)

    def wrong_scale(q, k, v):  # scores scaled by 1/d instead of 1/sqrt(d)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1 / q.shape[-1])

    worse = bm.accuracy_report(bm.outputs_and_grads(wrong_scale, q, k, v, do), baseline,
                               reference)
    assert not any(r["ok"] for r in worse.values())


def test_benchmark_table_shows_the_accuracy_and_help_needs_no_gpu():
    import subprocess
    import sys

    bm = _gpu_benchmark()
    row = {"dtype": "float16", "causal": False, "d": 64, "N": 1024, "fwd_ours": 300.0,
           "fwd_torch": 400.0, "bwd_ours": 150.0, "bwd_torch": 200.0, "err_ratio": 0.4,
           "accuracy": "ok"}
    table = bm.format_table([row, dict(row, err_ratio=1.7, accuracy="FAIL dk")])
    assert "err/bound" in table and "0.40" in table and "FAIL dk" in table
    done = subprocess.run([sys.executable, "-m", "attnlib.kernels.benchmark", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--ref-heads" in done.stdout and "--quick" in done.stdout
