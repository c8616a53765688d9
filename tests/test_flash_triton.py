"""Tests of attnlib.kernels.flash_triton: the Triton FlashAttention kernels (chapter 16).

Without a CUDA GPU the kernels run through Triton's interpreter, which must be switched on
*before* triton (and attnlib.kernels) is imported: hence the environment variable at the
top of this module.  On a GPU the same tests run the compiled kernels.  Where Triton is
not installed (macOS, Windows) the kernel tests skip with the reason.

The reference is PyTorch's own attention in float64 (``F.scaled_dot_product_attention``
with an explicit bottom-right causal boolean mask) and its autograd: no attnlib code.
"""

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

from attnlib import kernels
from attnlib.kernels import benchmark

KERNELS_OK, WHY_NOT = kernels.available()
needs_kernels = pytest.mark.skipif(not KERNELS_OK, reason=f"Triton kernels cannot run: {WHY_NOT}")
DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRETED else "cpu"


def _inputs(B, H, L, S, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, n, d, generator=gen) for n in (L, S, S, L))
    return tuple(x.to(DEVICE, dtype) for x in (q, k, v, do))


def _reference(q, k, v, do, causal, dtype):
    """Output and (dq, dk, dv) of PyTorch attention computed in ``dtype``."""
    L, S = q.shape[-2], k.shape[-2]
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed if causal else None)
    out.backward(do.to(dtype))
    return out.detach(), q.grad, k.grad, v.grad


def _plain_low_precision(q, k, v, do, causal):
    """The textbook algorithm in q's dtype (scores, softmax, P V all rounded): the error
    budget of the flash-attention test rule."""
    L, S = q.shape[-2], k.shape[-2]
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
    out = p @ v
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


# (B, H, L, S, d, causal, dtype): every head dim in both dtypes, lengths that are not
# multiples of the block (17, 33, 45), L != S both ways (with L > S some queries see no
# key), one-query decoding.  Each case costs about a second in the interpreter.
F32, F16 = torch.float32, torch.float16
CASES = [
    (1, 2, 17, 17, 32, False, F32),
    (1, 2, 45, 45, 64, True, F32),
    (2, 1, 33, 33, 128, False, F32),
    (1, 2, 17, 45, 32, True, F32),
    (1, 1, 45, 17, 64, True, F32),
    (1, 2, 1, 33, 128, True, F32),
    (1, 2, 45, 45, 32, True, F16),
    (2, 1, 33, 33, 64, False, F16),
    (1, 1, 45, 17, 64, True, F16),
    (1, 2, 17, 45, 128, True, F16),
]


@needs_kernels
@pytest.mark.parametrize("B, H, L, S, d, causal, dtype", CASES)
def test_forward_and_backward_match_float64(B, H, L, S, d, causal, dtype):
    q, k, v, do = _inputs(B, H, L, S, d, dtype)
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    out = kernels.flash_attention(qg, kg, vg, causal=causal)
    out.backward(do)
    ours = (out.detach(), qg.grad, kg.grad, vg.grad)
    assert out.dtype == dtype and out.shape == (B, H, L, d)
    ref = _reference(q, k, v, do, causal, torch.float64)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, a, r in zip(names, ours, ref):
            err = _max_err(a, r)
            assert err < 1e-5, f"{name}: max error {err:.2e} against float64"
    else:  # flash-attention's rule: at most twice the error of the plain float16
        # algorithm, plus twice the float16 rounding at the reference's magnitude
        plain = _plain_low_precision(q, k, v, do, causal)
        for name, a, p, r in zip(names, ours, plain, ref):
            rounding = _max_err((r.to(dtype) + 0.3) - 0.3, r)
            err, budget = _max_err(a, r), 2 * _max_err(p, r) + 2 * rounding
            assert err <= budget, f"{name}: error {err:.2e} > budget {budget:.2e}"
    for g in ours[1:]:
        assert torch.isfinite(g).all()


@needs_kernels
@pytest.mark.parametrize("L, S, causal", [(33, 33, False), (45, 17, True)])
def test_lse_is_the_log_sum_exp_of_the_scores(L, S, causal):
    q, k, v, _ = _inputs(1, 2, L, S, 32, torch.float32, seed=1)
    out, lse = kernels.flash_attention_forward(q, k, v, causal=causal)
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(32)  # (B, H, L, S)
    if causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=S - L)
        s = s.masked_fill(~allowed, float("-inf"))
    expected = torch.logsumexp(s, dim=-1)  # (B, H, L); -inf where a query sees no key
    assert lse.shape == (1, 2, L) and lse.dtype == torch.float32
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(lse), finite)
    assert _max_err(lse[finite], expected[finite]) < 1e-5
    if not finite.all():  # queries that see no key: output exactly zero
        assert (out[..., ~finite[0, 0], :] == 0).all()


@needs_kernels
def test_block_sizes_and_strides_do_not_change_the_result():
    q, k, v, do = _inputs(1, 2, 45, 45, 32, torch.float32, seed=2)
    grads = []
    for blocks, layout in [((None, None), "contiguous"), ((16, 64), "transposed")]:
        qg, kg, vg = (x.clone() for x in (q, k, v))
        if layout == "transposed":  # (B, L, H, d) memory seen as (B, H, L, d): no copy
            qg, kg, vg = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (qg, kg, vg))
            assert not qg.is_contiguous()
        qg, kg, vg = (x.requires_grad_() for x in (qg, kg, vg))
        out = kernels.flash_attention(qg, kg, vg, causal=True, block_m=blocks[0], block_n=blocks[1])
        out.backward(do)
        grads.append((out.detach(), qg.grad, kg.grad, vg.grad))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert _max_err(a, b) < 1e-5


@needs_kernels
def test_scale_argument():
    q, k, v, _ = _inputs(1, 1, 17, 17, 16, torch.float32, seed=3)
    out = kernels.flash_attention(q, k, v, scale=0.3)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    assert _max_err(out, ref) < 1e-5
    assert _max_err(out, kernels.flash_attention(q, k, v)) > 1e-3  # the scale matters


@needs_kernels
@pytest.mark.parametrize("shapes, dtype, err, match", [
    (((1, 2, 8, 48), (1, 2, 8, 48), (1, 2, 8, 48)), torch.float32, ValueError, "head dimension"),
    (((2, 8, 32), (2, 8, 32), (2, 8, 32)), torch.float32, ValueError, "4 dimensions"),
    (((1, 2, 8, 32), (1, 1, 8, 32), (1, 1, 8, 32)), torch.float32, ValueError, "share"),
    (((1, 2, 8, 32), (1, 2, 9, 32), (1, 2, 8, 32)), torch.float32, ValueError, "k must be"),
    (((1, 2, 8, 32), (1, 2, 8, 32), (1, 2, 8, 32)), torch.float64, TypeError, "dtype"),
])
def test_bad_inputs_are_refused(shapes, dtype, err, match):
    q, k, v = (torch.zeros(s, dtype=dtype, device=DEVICE) for s in shapes)
    with pytest.raises(err, match=match):
        kernels.flash_attention(q, k, v)


@needs_kernels
def test_bad_arguments_are_refused():
    x = torch.zeros(1, 1, 8, 32, device=DEVICE)
    with pytest.raises(TypeError, match="torch tensor"):
        kernels.flash_attention(x.cpu().numpy(), x, x)
    with pytest.raises(TypeError, match="dtype"):
        kernels.flash_attention(x, x.half(), x)
    with pytest.raises(ValueError, match="scale"):
        kernels.flash_attention(x, x, x, scale=float("nan"))
    with pytest.raises(ValueError, match="block_m"):
        kernels.flash_attention(x, x, x, block_m=24)
    if kernels.INTERPRETED:
        with pytest.raises(TypeError, match="bfloat16"):
            kernels.flash_attention(x.bfloat16(), x.bfloat16(), x.bfloat16())


def test_available_gives_a_reason():
    ok, reason = kernels.available()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason
    try:
        has_triton = importlib.util.find_spec("triton") is not None
    except ImportError:
        has_triton = False
    assert kernels.HAS_TRITON == has_triton
    if not has_triton:
        assert not ok and "Triton" in reason


def test_attention_flops():
    # one head, N = 2, d = 3: Q K^T and P V are 2 * (2 * 2 * 3) flops each
    assert benchmark.attention_flops(1, 1, 2, 3, False) == 48
    assert benchmark.attention_flops(4, 32, 1024, 64, True, "fwd") == 4 * 32 * 1024**2 * 64 * 2
    assert benchmark.attention_flops(1, 1, 8, 8, False, "bwd") == 2.5 * 4 * 8 * 8 * 8
    with pytest.raises(ValueError, match="mode"):
        benchmark.attention_flops(1, 1, 8, 8, False, "both")


def test_benchmark_table_and_exit_without_gpu():
    row = {"dtype": "float16", "causal": True, "d": 64, "N": 1024, "fwd_ours": 300.0,
           "fwd_torch": 400.0, "bwd_ours": 150.0, "bwd_torch": 200.0, "err_o": 1e-3, "err_dq": 2e-3}
    table = benchmark.format_table([row, {"dtype": "bfloat16", "causal": False, "d": 128, "N": 8}])
    assert "0.75" in table and table.count("\n") == 3
    assert benchmark.format_table([row], markdown=True).startswith("| dtype |")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the benchmark would run")
    with pytest.raises(SystemExit, match="No CUDA GPU|Triton is not installed"):
        benchmark.main([])
