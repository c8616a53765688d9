"""Tests of attnlib.positions against float64 loops written from the papers' formulas."""

import math

import numpy as np
import pytest
import torch

import attnlib
from attnlib.positions import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    apply_rope_frequencies,
    partial_rotary_dims,
    rope_frequencies,
    rope_frequencies_llama3,
    rope_frequencies_ntk,
    rope_frequencies_pi,
    rope_frequencies_yarn,
    rope_permutation,
    sinusoidal_positions,
    yarn_attention_factor,
)
from conftest import BACKENDS, to_backend, to_numpy

TOL = {"float64": 1e-12, "float32": 2e-5}


# --------------------------------------------------------------------- references
def sinusoidal_loop(positions, d_model, base=10000.0):
    """Vaswani et al. (2017), section 3.5, one entry at a time."""
    pe = np.zeros((len(positions), d_model))
    for r, pos in enumerate(positions):
        for i in range(d_model // 2):
            angle = pos / base ** (2 * i / d_model)
            pe[r, 2 * i] = math.sin(angle)
            pe[r, 2 * i + 1] = math.cos(angle)
    return pe


def rope_loop(x, positions, pairing, base=10000.0):
    """Rotate each pair of dimensions of each row by an explicit 2x2 matrix."""
    x = np.asarray(x, dtype=np.float64)
    L, d = x.shape
    out = np.zeros_like(x)
    for r in range(L):
        for i in range(d // 2):
            a, b = (i, i + d // 2) if pairing == "rotate-half" else (2 * i, 2 * i + 1)
            phi = positions[r] * base ** (-2 * i / d)
            rot = np.array([[math.cos(phi), -math.sin(phi)], [math.sin(phi), math.cos(phi)]])
            out[r, [a, b]] = rot @ x[r, [a, b]]
    return out


def alibi_loop(slopes, L, S, causal):
    bias = np.zeros((len(slopes), L, S))
    for h, m in enumerate(slopes):
        for i in range(L):
            pos = S - L + i  # bottom-right: the queries are the last L positions
            for j in range(S):
                if causal and j > pos:
                    bias[h, i, j] = -np.inf
                else:
                    bias[h, i, j] = -m * abs(pos - j)
    return bias


# -------------------------------------------------------------------- sinusoidal
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d_model", [2, 4, 6, 18])
def test_sinusoidal_matches_loop(backend, d_model):
    ours = sinusoidal_positions(17, d_model, like=to_backend(np.zeros(1), backend))
    assert tuple(ours.shape) == (17, d_model)
    tol = 1e-12 if backend == "numpy" else 1e-6
    np.testing.assert_allclose(to_numpy(ours), sinusoidal_loop(range(17), d_model), atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinusoidal_array_positions(backend):
    pos = np.array([5, 0, 31, 1000])
    ours = sinusoidal_positions(to_backend(pos, backend), 8, base=100.0)
    tol = 1e-12 if backend == "numpy" else 1e-4  # float32 angles up to 1000 rad
    np.testing.assert_allclose(to_numpy(ours), sinusoidal_loop(pos, 8, base=100.0), atol=tol)


def test_sinusoidal_dot_depends_only_on_distance():
    pe = sinusoidal_positions(40, 16)
    gram = pe @ pe.T  # (40, 40)
    for delta in range(-5, 6):
        diag = np.diagonal(gram, offset=delta)
        assert np.ptp(diag) < 1e-12
    assert not np.allclose(gram[0, 1], gram[0, 2])


def test_sinusoidal_shift_is_linear_map():
    # PE[p + k] = PE[p] @ M_k for one matrix M_k (block rotations), for every p.
    pe = sinusoidal_positions(30, 8)
    k = 3
    m_k, *_ = np.linalg.lstsq(pe[:-k], pe[k:], rcond=None)
    assert np.abs(pe[:-k] @ m_k - pe[k:]).max() < 1e-10


@pytest.mark.parametrize("bad", [3, 0, -2])
def test_sinusoidal_rejects_bad_width(bad):
    with pytest.raises(ValueError, match="d_model"):
        sinusoidal_positions(4, bad)


def test_sinusoidal_rejects_2d_positions():
    with pytest.raises(ValueError, match="positions"):
        sinusoidal_positions(np.zeros((2, 3)), 4)


# ------------------------------------------------------------------------- ALiBi
def test_alibi_slopes_eight_heads_paper_values():
    np.testing.assert_array_equal(alibi_slopes(8), [1 / 2 ** k for k in range(1, 9)])


@pytest.mark.parametrize("n, expected", [
    (1, [2 ** -8]),
    (2, [2 ** -4, 2 ** -8]),
    (3, [2 ** -4, 2 ** -8, 2 ** -2]),
    (16, [2 ** (-k / 2) for k in range(1, 17)]),
    (12, [2 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]),
])
def test_alibi_slopes_rule(n, expected):
    np.testing.assert_allclose(alibi_slopes(n), expected, rtol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H, L, S", [(1, 1, 1), (2, 3, 3), (3, 2, 5), (8, 17, 17), (4, 1, 31)])
@pytest.mark.parametrize("causal", [True, False])
def test_alibi_bias_matches_loop(backend, H, L, S, causal):
    like = to_backend(np.zeros(1), backend)
    ours = alibi_bias(H, L, S, causal=causal, like=like)
    assert tuple(ours.shape) == (H, L, S)
    ref = alibi_loop(alibi_slopes(H), L, S, causal)
    np.testing.assert_allclose(to_numpy(ours), ref, atol=1e-6 if backend == "torch" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alibi_bias_works_as_sdpa_float_mask(backend, rng):
    B, H, L, S, d_k, d_v = 2, 4, 3, 7, 5, 6
    q, k, v = (rng.standard_normal(s) for s in [(B, H, L, d_k), (B, H, S, d_k), (B, H, S, d_v)])
    bias = alibi_bias(H, L, S)
    out = attnlib.scaled_dot_product_attention(
        *(to_backend(a, backend) for a in (q, k, v)), mask=to_backend(bias, backend))
    # Reference: softmax over the allowed keys of (scores + bias), row by row.
    ref = np.zeros((B, H, L, d_v))
    for b, h, i in np.ndindex(B, H, L):
        s = q[b, h, i] @ k[b, h].T / math.sqrt(d_k) + bias[h, i]
        w = np.exp(s - s.max())
        ref[b, h, i] = (w / w.sum()) @ v[b, h]
    np.testing.assert_allclose(to_numpy(out), ref, atol=1e-12)
    # The causal ALiBi bias is also a bottom-right causal mask.
    last_allowed = (np.isfinite(bias[0])).sum(-1)
    np.testing.assert_array_equal(last_allowed, np.arange(S - L + 1, S + 1))


def test_alibi_rejects_bad_heads():
    with pytest.raises(ValueError, match="n_heads"):
        alibi_slopes(0)


# -------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("pairing", ["rotate-half", "interleaved"])
@pytest.mark.parametrize("L, d", [(1, 2), (3, 4), (17, 6), (31, 16)])
def test_rope_matches_loop(backend, dtype, pairing, L, d, rng):
    x = rng.standard_normal((L, d))
    ours = apply_rope(to_backend(x, backend, dtype), pairing=pairing)
    assert ours.dtype == to_backend(x, backend, dtype).dtype
    ref = rope_loop(x, np.arange(L), pairing)
    np.testing.assert_allclose(to_numpy(ours), ref, atol=TOL[dtype] * 10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_pairings_equal_up_to_permutation(backend, rng):
    x = to_backend(rng.standard_normal((2, 3, 9, 10)), backend)
    perm = rope_permutation(10)
    assert sorted(perm.tolist()) == list(range(10))
    half = apply_rope(x[..., perm], pairing="rotate-half")
    inter = apply_rope(x, pairing="interleaved")[..., perm]
    np.testing.assert_allclose(to_numpy(half), to_numpy(inter), atol=1e-12)
    # ... and they are not equal without the permutation.
    assert np.abs(to_numpy(apply_rope(x)) - to_numpy(apply_rope(x, pairing="interleaved"))).max() > 0.1


@pytest.mark.parametrize("pairing", ["rotate-half", "interleaved"])
def test_rope_preserves_norms(pairing, rng):
    x = rng.standard_normal((4, 50, 8)) * 3
    y = apply_rope(x, pairing=pairing)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)


@pytest.mark.parametrize("pairing", ["rotate-half", "interleaved"])
def test_rope_relative_property(pairing, rng):
    q, k = rng.standard_normal((2, 8))
    def score(m, n):
        qm = apply_rope(q[None], np.array([m]), pairing=pairing)[0]
        kn = apply_rope(k[None], np.array([n]), pairing=pairing)[0]
        return qm @ kn
    for m, n in [(0, 0), (3, 1), (1, 3), (10, 2), (7, 7)]:
        for shift in (1, 5, 123):
            assert abs(score(m, n) - score(m + shift, n + shift)) < 1e-10
    assert abs(score(3, 1) - score(1, 3)) > 1e-3  # depends on the sign of m - n


@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_offset_equals_slice_of_full_sequence(backend, rng):
    """Decoding with a KV cache: the last rows rotated with an offset = the full rotation."""
    x = to_backend(rng.standard_normal((2, 11, 6)), backend)
    full = apply_rope(x)
    tail = apply_rope(x[:, 7:], positions=7)
    np.testing.assert_allclose(to_numpy(tail), to_numpy(full[:, 7:]), atol=1e-12)
    arr = apply_rope(x[:, 7:], positions=to_backend(np.arange(7, 11), backend))
    np.testing.assert_allclose(to_numpy(arr), to_numpy(full[:, 7:]), atol=1e-12)


def test_rope_per_batch_positions(rng):
    x = rng.standard_normal((2, 3, 4))
    pos = np.array([[0, 1, 2], [5, 6, 7]])
    ours = apply_rope(x, pos)
    for b in range(2):
        np.testing.assert_allclose(ours[b], rope_loop(x[b], pos[b], "rotate-half"), atol=1e-12)


def test_rope_gradient_is_rotation_transpose(rng):
    x = torch.tensor(rng.standard_normal((5, 4)), requires_grad=True)
    g = torch.tensor(rng.standard_normal((5, 4)))
    (apply_rope(x) * g).sum().backward()
    # d/dx <R x, g> = R^T g: rotating g back by the same angles.
    expected = rope_loop(g.numpy(), -np.arange(5), "rotate-half")
    np.testing.assert_allclose(x.grad.numpy(), expected, atol=1e-12)


def test_rope_frequencies_values():
    np.testing.assert_allclose(rope_frequencies(8), [1, 10 ** -1, 10 ** -2, 10 ** -3], rtol=1e-14)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=np.zeros((3, 5))), "even"),
    (dict(x=np.zeros(4)), "at least 2"),
    (dict(x=np.zeros((3, 4), dtype=np.int64)), "floating"),
    (dict(x=np.zeros((3, 4)), pairing="neox"), "pairing"),
    (dict(x=np.zeros((3, 4)), positions=np.arange(4)), "positions"),
    (dict(x=np.zeros((3, 4)), positions=torch.arange(3)), "mix"),
    (dict(x=np.zeros((3, 4)), base=1.0), "base"),
])
def test_rope_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        apply_rope(**kwargs)


def test_rope_matches_transformers_llama():
    """Optional: Hugging Face's Llama rotary embedding (rotate-half), if installed."""
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    d, H, L = 16, 2, 9
    config = LlamaConfig(hidden_size=d * H, num_attention_heads=H, num_key_value_heads=H,
                         head_dim=d, max_position_embeddings=64)
    rotary = llama.LlamaRotaryEmbedding(config=config)
    np.testing.assert_allclose(rotary.inv_freq.double().numpy(), rope_frequencies(d), rtol=1e-6)
    q, k = torch.randn(2, 1, H, L, d, dtype=torch.float32)
    position_ids = torch.arange(3, 3 + L)[None]
    cos, sin = rotary(q, position_ids)
    q_hf, k_hf = llama.apply_rotary_pos_emb(q, k, cos, sin)
    torch.testing.assert_close(apply_rope(q, positions=3), q_hf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(apply_rope(k, positions=3), k_hf, atol=1e-5, rtol=1e-5)


# ------------------------------------------------- RoPE past the training length
def _hf_rope(rope_type, head_dim, base, factor, partial=1.0, original=None, seq_len=None,
             **extra):
    """Hugging Face's inverse frequencies and attention factor for a tiny Llama config."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": rope_type, "rope_theta": base, "factor": factor, **extra}
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    if original is not None:
        params["original_max_position_embeddings"] = original
    config = LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                         max_position_embeddings=4 * (original or 256),
                         rope_parameters=params)
    kwargs = {} if seq_len is None else {"seq_len": seq_len}
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
    return inv_freq.double().numpy(), attention_factor, config


HF_CASES = [(16, 10000.0, 2.0, 1.0), (32, 10000.0, 4.0, 0.5), (64, 500000.0, 8.0, 1.0),
            (128, 10000.0, 16.0, 0.25), (96, 10000.0, 3.5, 0.25)]


@pytest.mark.parametrize("head_dim, base, factor, partial", HF_CASES)
def test_pi_matches_transformers_linear(head_dim, base, factor, partial):
    want, attn, _ = _hf_rope("linear", head_dim, base, factor, partial)
    d = partial_rotary_dims(head_dim, partial)
    np.testing.assert_allclose(rope_frequencies_pi(d, factor, base=base), want, rtol=2e-6)
    assert attn == 1.0


@pytest.mark.parametrize("head_dim, base, factor, partial", HF_CASES)
@pytest.mark.parametrize("hf_factor, stretch", [(1.0, None), (2.0, 3), (4.0, 1.5)])
def test_ntk_matches_transformers_dynamic(head_dim, base, factor, partial, hf_factor, stretch):
    # HF's dynamic NTK at sequence length n uses base * a**(d / (d - 2)) with
    # a = f * n / L_max - (f - 1): pick n so that a is our factor.
    _, _, config = _hf_rope("dynamic", head_dim, base, hf_factor, partial)
    L_max = config.max_position_embeddings
    n = L_max * (factor + hf_factor - 1) / hf_factor
    want, attn, _ = _hf_rope("dynamic", head_dim, base, hf_factor, partial, seq_len=n)
    d = partial_rotary_dims(head_dim, partial)
    np.testing.assert_allclose(rope_frequencies_ntk(d, factor, base=base), want, rtol=2e-6)
    assert attn == 1.0


@pytest.mark.parametrize("head_dim, base, factor, partial", HF_CASES)
@pytest.mark.parametrize("original", [64, 2048, 4096])
@pytest.mark.parametrize("betas", [{}, {"beta_fast": 16.0, "beta_slow": 2.0}])
@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_matches_transformers(head_dim, base, factor, partial, original, betas, truncate):
    want, attn, _ = _hf_rope("yarn", head_dim, base, factor, partial, original,
                             truncate=truncate, **betas)
    d = partial_rotary_dims(head_dim, partial)
    ours, ours_attn = rope_frequencies_yarn(d, factor, original, base=base, truncate=truncate,
                                            **betas)
    np.testing.assert_allclose(ours, want, rtol=2e-6)
    assert abs(ours_attn - attn) < 1e-12 and abs(ours_attn - (0.1 * math.log(factor) + 1)) < 1e-12


@pytest.mark.parametrize("head_dim, base, factor, partial", HF_CASES)
@pytest.mark.parametrize("original", [64, 512, 8192])
@pytest.mark.parametrize("bands", [(1.0, 4.0), (2.0, 8.0)])
def test_llama3_matches_transformers(head_dim, base, factor, partial, original, bands):
    low, high = bands
    want, attn, _ = _hf_rope("llama3", head_dim, base, factor, partial, original,
                             low_freq_factor=low, high_freq_factor=high)
    d = partial_rotary_dims(head_dim, partial)
    ours = rope_frequencies_llama3(d, factor, original, base=base, low_freq_factor=low,
                                   high_freq_factor=high)
    np.testing.assert_allclose(ours, want, rtol=2e-6)
    assert attn == 1.0


def llama3_loop(d, factor, L_train, base, low, high):
    """Meta's rule written out pair by pair, in float64."""
    out = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        wavelength = 2 * math.pi / theta
        if wavelength < L_train / high:
            out.append(theta)
        elif wavelength > L_train / low:
            out.append(theta / factor)
        else:
            g = (L_train / wavelength - low) / (high - low)
            out.append((1 - g) * theta / factor + g * theta)
    return np.array(out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_frequencies_follow_the_backend(backend):
    like = to_backend(np.zeros(1), backend, "float32")
    for freqs in (rope_frequencies_pi(16, 4, like=like), rope_frequencies_ntk(16, 4, like=like),
                  rope_frequencies_yarn(16, 4, 64, like=like)[0],
                  rope_frequencies_llama3(16, 4, 64, like=like)):
        assert type(freqs) is type(like) and freqs.dtype == like.dtype
        assert tuple(freqs.shape) == (8,)
    np.testing.assert_allclose(to_numpy(rope_frequencies_llama3(16, 4, 64, like=like)),
                               llama3_loop(16, 4, 64, 10000.0, 1.0, 4.0), rtol=1e-6)


def test_scaled_frequencies_design_properties():
    d, base, s, L = 128, 10000.0, 8.0, 4096
    theta = rope_frequencies(d, base=base)
    # PI: position s * p is rotated exactly as p was.
    np.testing.assert_allclose(s * L * rope_frequencies_pi(d, s), L * theta, rtol=1e-14)
    # NTK-aware: the fastest pair unchanged, the slowest divided by exactly s.
    ntk = rope_frequencies_ntk(d, s)
    assert ntk[0] == theta[0] == 1.0
    assert abs(ntk[-1] / (theta[-1] / s) - 1) < 1e-12
    assert np.all(np.diff(theta / ntk) > 0)  # the slower the pair, the more it is divided
    # YaRN: pairs turning > beta_fast times over L_train kept, < beta_slow times divided.
    yarn, _ = rope_frequencies_yarn(d, s, L)
    turns = L * theta / (2 * math.pi)
    np.testing.assert_array_equal(yarn[turns > 32], theta[turns > 32])
    np.testing.assert_allclose(yarn[turns < 1], theta[turns < 1] / s, rtol=1e-14)
    assert np.all((yarn >= theta / s * (1 - 1e-14)) & (yarn <= theta))
    # Llama 3: the same three bands, by wavelength against L_train / 4 and L_train.
    ll = rope_frequencies_llama3(d, s, L)
    wavelength = 2 * math.pi / theta
    np.testing.assert_array_equal(ll[wavelength < L / 4], theta[wavelength < L / 4])
    np.testing.assert_allclose(ll[wavelength > L], theta[wavelength > L] / s, rtol=1e-14)
    # factor 1 changes nothing
    for same in (rope_frequencies_pi(d, 1), rope_frequencies_ntk(d, 1),
                 rope_frequencies_yarn(d, 1, L)[0], rope_frequencies_llama3(d, 1, L)):
        np.testing.assert_allclose(same, theta, rtol=1e-14)
    assert yarn_attention_factor(1) == 1.0


@pytest.mark.parametrize("fn, args, match", [
    (rope_frequencies_pi, (8, 0.5), "factor"),
    (rope_frequencies_pi, (8, float("inf")), "factor"),
    (rope_frequencies_pi, (7, 2.0), "even"),
    (rope_frequencies_ntk, (2, 2.0), "d >= 4"),
    (rope_frequencies_yarn, (8, 2.0, 0), "original_max_positions"),
    (rope_frequencies_yarn, (8, 2.0, 64, ), None),
    (rope_frequencies_llama3, (8, 2.0, 64.5), "original_max_positions"),
    (yarn_attention_factor, (True,), "factor"),
    (partial_rotary_dims, (64, 0.0), "fraction"),
    (partial_rotary_dims, (10, 0.3), "even"),
])
def test_scaled_frequencies_bad_input(fn, args, match):
    if match is None:
        fn(*args)  # the valid call
        return
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_yarn_and_llama3_reject_crossed_bands():
    with pytest.raises(ValueError, match="beta_slow"):
        rope_frequencies_yarn(8, 2.0, 64, beta_fast=1.0, beta_slow=32.0)
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_frequencies_llama3(8, 2.0, 64, low_freq_factor=4.0, high_freq_factor=1.0)


def test_partial_rotary_dims_gpt_neox():
    assert partial_rotary_dims(96, 0.25) == 24  # GPT-NeoX-20B
    assert partial_rotary_dims(128, 1.0) == 128
    assert partial_rotary_dims(64, 0.5) == 32


# ------------------------------------------------------------ apply_rope_frequencies
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("pairing", ["rotate-half", "interleaved"])
def test_rope_frequencies_full_equals_apply_rope(backend, dtype, pairing, rng):
    x = to_backend(rng.standard_normal((2, 3, 13, 8)), backend, dtype)
    inv_freq = to_backend(rope_frequencies(8), backend, dtype)
    ours = apply_rope_frequencies(x, inv_freq, positions=5, pairing=pairing)
    assert ours.dtype == x.dtype and tuple(ours.shape) == tuple(x.shape)
    np.testing.assert_allclose(to_numpy(ours), to_numpy(apply_rope(x, 5, pairing=pairing)),
                               atol=TOL[dtype])


@pytest.mark.parametrize("pairing", ["rotate-half", "interleaved"])
@pytest.mark.parametrize("d, n_rot", [(8, 2), (12, 4), (16, 8), (10, 10)])
def test_partial_rotary_against_loop(pairing, d, n_rot, rng):
    x = rng.standard_normal((11, d))
    pos = np.arange(3, 14)
    ours = apply_rope_frequencies(x, rope_frequencies(n_rot), pos, pairing=pairing)
    np.testing.assert_allclose(ours[:, :n_rot], rope_loop(x[:, :n_rot], pos, pairing),
                               atol=1e-12)
    np.testing.assert_array_equal(ours[:, n_rot:], x[:, n_rot:])  # passed through


def test_scaled_rope_keeps_the_relative_property(rng):
    q, k = rng.standard_normal((2, 1, 32))
    inv_freq, factor = rope_frequencies_yarn(24, 8, 64)  # partial: 24 of 32 dims
    def score(m, n):
        qm = apply_rope_frequencies(q, inv_freq, np.array([m]), attention_factor=factor)
        kn = apply_rope_frequencies(k, inv_freq, np.array([n]), attention_factor=factor)
        return (qm @ kn.T).item()
    for m, n in [(0, 0), (5, 2), (300, 17)]:
        assert abs(score(m, n) - score(m + 1000, n + 1000)) < 1e-9
    # the factor multiplies the rotated part of each vector, so its score by factor**2
    plain = apply_rope_frequencies(q, inv_freq, 4)
    scaled = apply_rope_frequencies(q, inv_freq, 4, attention_factor=factor)
    np.testing.assert_allclose(scaled[:, :24], factor * plain[:, :24], rtol=1e-14)
    np.testing.assert_array_equal(scaled[:, 24:], q[:, 24:])


def test_partial_rotary_matches_transformers_gpt_neox():
    neox = pytest.importorskip("transformers.models.gpt_neox.modeling_gpt_neox")
    from transformers import GPTNeoXConfig

    H, d, L = 2, 16, 7
    for rope in ({"rope_type": "default"},
                 {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}):
        config = GPTNeoXConfig(hidden_size=H * d, num_attention_heads=H,
                               max_position_embeddings=128,
                               rope_parameters={"rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5, **rope})
        rotary = neox.GPTNeoXRotaryEmbedding(config=config)
        q, k = torch.randn(2, 1, H, L, d)
        position_ids = torch.arange(20, 20 + L)[None]
        cos, sin = rotary(q, position_ids)
        q_hf, k_hf = neox.apply_rotary_pos_emb(q, k, cos, sin)
        n_rot = partial_rotary_dims(d, 0.5)
        if rope["rope_type"] == "default":
            inv_freq, factor = rope_frequencies(n_rot, like=q), 1.0
        else:
            inv_freq, factor = rope_frequencies_yarn(n_rot, 4.0, 32, like=q)
        for ours_in, want in ((q, q_hf), (k, k_hf)):
            ours = apply_rope_frequencies(ours_in, inv_freq, 20, attention_factor=factor)
            torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x=np.zeros((3, 4)), inv_freq=np.ones(3)), "2 m <= d"),
    (dict(x=np.zeros((3, 4)), inv_freq=np.ones((2, 1))), "shape"),
    (dict(x=np.zeros((3, 4)), inv_freq=torch.ones(2)), "mix"),
    (dict(x=np.zeros((3, 4)), inv_freq=np.ones(2, dtype=np.int64)), "floating"),
    (dict(x=np.zeros((3, 4), dtype=np.int64), inv_freq=np.ones(2)), "floating"),
    (dict(x=np.zeros((3, 4)), inv_freq=np.ones(2), attention_factor=0.0), "attention_factor"),
    (dict(x=np.zeros((3, 4)), inv_freq=np.ones(2), pairing="gptj"), "pairing"),
])
def test_apply_rope_frequencies_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        apply_rope_frequencies(**kwargs)
