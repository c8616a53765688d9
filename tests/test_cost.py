"""attnlib.cost against hand-computed values, allocated arrays, and torch's FLOP counter."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attnlib
from attnlib import cost


def counted_flops(fn, *args):
    """FLOPs of the matrix products ``fn`` runs, as counted by torch (2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


# ----------------------------------------------------------------------------- bytes

@pytest.mark.parametrize("dtype, size", [
    ("float32", 4), ("float16", 2), ("bfloat16", 2), ("float64", 8),
    (np.float16, 2), (np.dtype("float32"), 4),
    (torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4), (torch.float64, 8),
])
def test_bytes_per_element(dtype, size):
    assert cost.bytes_per_element(dtype) == size


@pytest.mark.parametrize("bad", ["float99", None, 3, object()])
def test_bytes_per_element_refuses(bad):
    with pytest.raises(TypeError, match="dtype"):
        cost.bytes_per_element(bad)


def test_attention_matrix_bytes_by_hand():
    # 12 layers x 12 heads x 512 x 512 weights, computed by hand
    assert cost.attention_matrix_bytes(12, 12, 512, dtype="float32") == 150_994_944
    assert cost.attention_matrix_bytes(12, 12, 512, dtype=torch.float16) == 75_497_472
    assert cost.attention_matrix_bytes(12, 12, 512, 512, batch=32, dtype="float16") \
        == 2_415_919_104
    assert cost.attention_matrix_bytes(1, 1, 1, 1, dtype="float64") == 8
    assert cost.attention_matrix_bytes(2, 3, 5, 7, batch=2, dtype="bfloat16") \
        == 2 * 3 * 5 * 7 * 2 * 2
    assert cost.attention_matrix_bytes(4, 2, 0, 9) == 0


@pytest.mark.parametrize("layers, heads, L, S, batch, dtype", [
    (1, 1, 1, 1, 1, "float32"), (3, 2, 17, 31, 2, "float16"), (2, 5, 31, 17, 3, "float64"),
])
def test_attention_matrix_bytes_equals_allocated(layers, heads, L, S, batch, dtype):
    one_layer = np.empty((batch, heads, L, S), dtype=dtype)  # (B, H, L, S)
    assert cost.attention_matrix_bytes(layers, heads, L, S, batch, dtype) \
        == layers * one_layer.nbytes


# ----------------------------------------------------------------------------- FLOPs

@pytest.mark.parametrize("B, H, L, S, d_k, d_v", [
    (1, 1, 1, 1, 1, 1), (2, 3, 17, 31, 4, 5), (1, 2, 31, 17, 8, 3), (3, 1, 2, 3, 16, 16),
])
def test_attention_flops_match_torch_counter(B, H, L, S, d_k, d_v):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, d_k, generator=gen)
    k = torch.randn(B, H, S, d_k, generator=gen)
    v = torch.randn(B, H, S, d_v, generator=gen)
    counted = counted_flops(attnlib.scaled_dot_product_attention, q, k, v)
    assert cost.attention_flops(L, S, d_k, d_v, H, batch=B) == counted


def test_attention_flops_by_hand():
    assert cost.attention_flops(3, 5, 2, 4, heads=2) == 2 * 3 * 5 * (2 + 4) * 2 == 360
    assert cost.attention_flops(512, 512, 64, 64, heads=12) == 805_306_368


@pytest.mark.parametrize("L, S, d_model, d_k, d_v, H, output", [
    (1, 1, 1, 1, 1, 1, True), (5, 7, 12, 3, 2, 4, True), (17, 31, 8, 5, 7, 2, False),
])
def test_projection_flops_match_torch_counter(L, S, d_model, d_k, d_v, H, output):
    gen = torch.Generator().manual_seed(1)
    xq, xkv = torch.randn(2, L, d_model, generator=gen), torch.randn(2, S, d_model, generator=gen)
    W_Q, W_K = (torch.randn(d_model, H * d_k, generator=gen) for _ in range(2))
    W_V = torch.randn(d_model, H * d_v, generator=gen)
    W_O = torch.randn(H * d_v, d_model, generator=gen)

    def project():
        q, k, v = xq @ W_Q, xkv @ W_K, xkv @ W_V  # (B, L, H d_k), (B, S, H d_k), (B, S, H d_v)
        if output:
            torch.zeros(2, L, H * d_v) @ W_O  # (B, L, d_model)

    counted = counted_flops(project)
    assert cost.projection_flops(L, S, d_model, d_k, d_v, H, output=output, batch=2) == counted


def test_projection_flops_by_hand():
    # L = S = 4, d_model = 3, one head with d_k = d_v = 2: Q, K, V: 3 * 2*4*3*2; O: 2*4*2*3
    assert cost.projection_flops(4, 4, 3, 2, 2) == 3 * 48 + 48 == 192
    assert cost.projection_flops(4, 4, 3, 2, 2, output=False) == 144


@pytest.mark.parametrize("d_model, d_k, d_v, H", [(768, 64, 64, 12), (64, 16, 16, 4),
                                                  (30, 5, 10, 6), (7, 3, 1, 1)])
@pytest.mark.parametrize("output", [True, False])
def test_crossover_balances_the_flops(d_model, d_k, d_v, H, output):
    n_star = cost.crossover_length(d_model, d_k, d_v, H, output=output)
    ratio = cost.attention_flops(100, 100, d_k, d_v, H) / cost.projection_flops(
        100, 100, d_model, d_k, d_v, H, output=output)
    # both counts are proportional to n (attention to n^2): the ratio is n / n*
    assert ratio == pytest.approx(100 / n_star, rel=1e-12)
    below, above = int(np.floor(n_star * 0.9)), int(np.ceil(n_star * 1.1))
    for n, more_attention in ((below, False), (above, True)):
        a = cost.attention_flops(n, n, d_k, d_v, H)
        p = cost.projection_flops(n, n, d_model, d_k, d_v, H, output=output)
        assert (a > p) is more_attention


def test_crossover_closed_forms():
    assert cost.crossover_length(768, 64, heads=12) == 1536.0  # 2 d_model with W_O
    assert cost.crossover_length(768, 64, heads=12, output=False) == 1152.0  # 1.5 d_model
    assert cost.crossover_length(30, 5, 10) == 30 * (10 + 10 + 10) / 15


@pytest.mark.parametrize("call", [
    lambda: cost.attention_flops(0, 4, 2, 2),
    lambda: cost.attention_flops(4, 4, 2.0, 2),
    lambda: cost.attention_flops(4, 4, 2, 2, heads=True),
    lambda: cost.projection_flops(4, 4, -3, 2, 2),
    lambda: cost.attention_matrix_bytes(12, 12, -1),
    lambda: cost.attention_matrix_bytes(0, 12, 512),
    lambda: cost.crossover_length(768, 0),
])
def test_bad_sizes_are_refused(call):
    with pytest.raises(ValueError, match="must be a (positive|non-negative) integer"):
        call()


# ----------------------------------------------------------------------------- measured traffic

def test_memory_traffic_counts_each_operation():
    x = torch.randn(40, 50)                                          # 2000 float32 = 8000 bytes
    t = cost.memory_traffic(lambda: (x * 2).exp(), min_numel=2000)   # x*2: r1 w1; exp: r1 w1
    assert (t.reads, t.writes, t.total) == (2, 2, 4)
    assert t.bytes_read == t.bytes_written == 2 * 8000
    fused = cost.memory_traffic(torch.softmax, x, -1, min_numel=2000)
    assert (fused.reads, fused.writes) == (1, 1)


def test_memory_traffic_views_move_nothing_and_small_arrays_are_ignored():
    x = torch.randn(6, 7, dtype=torch.float64)
    assert cost.memory_traffic(lambda: (x.view(42), x.T, x.expand(2, 6, 7), x[1:]),
                               min_numel=1).total == 0
    assert cost.memory_traffic(lambda: x.sum(), min_numel=2) == cost.Traffic(1, 0, 336, 0)
    assert cost.memory_traffic(lambda: x + 1, min_numel=43).total == 0


def test_memory_traffic_matmul_and_in_place():
    a, b = torch.randn(30, 2), torch.randn(2, 40)                   # small inputs, large output
    t = cost.memory_traffic(torch.matmul, a, b, min_numel=1000)
    assert (t.reads, t.writes, t.bytes_written) == (0, 1, 30 * 40 * 4)
    y = torch.zeros(1000)
    t = cost.memory_traffic(lambda: y.add_(1.0), min_numel=1000)     # read-modify-write
    assert (t.reads, t.writes) == (1, 1) and torch.all(y == 1)


def test_memory_traffic_separate_softmax_steps_move_more():
    # the softmax of chapter 3, as separate steps, against torch's fused one
    s = torch.randn(4, 64, 64)
    steps = lambda: (lambda e: e / e.sum(-1, keepdim=True))((s - s.amax(-1, keepdim=True)).exp())
    assert torch.allclose(steps(), torch.softmax(s, -1), atol=1e-6)
    separate = cost.memory_traffic(steps, min_numel=s.numel())
    fused = cost.memory_traffic(torch.softmax, s, -1, min_numel=s.numel())
    assert (separate.reads, separate.writes) == (5, 3) and fused.total == 2
    assert cost.memory_traffic(attnlib.softmax, s, min_numel=s.numel()).total >= separate.total


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_memory_traffic_refuses_bad_min_numel(bad):
    with pytest.raises(ValueError, match="min_numel"):
        cost.memory_traffic(lambda: None, min_numel=bad)
