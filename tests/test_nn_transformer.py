"""Tests of attnlib.nn.transformer: shapes, causality, an independent block reference,
head ablation, and that a tiny model can overfit a tiny batch."""

import math

import pytest
import torch
from torch.nn import functional as F

from attnlib.nn.transformer import (
    Block,
    LearnedPositionEmbedding,
    TinyTransformer,
    ablate_heads,
    accuracy,
    train,
)
from attnlib.positions import alibi_bias, sinusoidal_positions

POSITIONS = ["learned", "sinusoidal", "alibi", "none"]


def make(positions="learned", **kw):
    torch.manual_seed(0)
    args = dict(vocab_size=11, d_model=12, n_heads=3, n_layers=2, max_len=17)
    args.update(kw)
    return TinyTransformer(**args, positions=positions).double().eval()


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("B, n", [(1, 1), (2, 3), (3, 17)])
def test_shapes_and_weights(positions, B, n):
    model = make(positions)
    tokens = torch.randint(0, 11, (B, n), generator=torch.Generator().manual_seed(1))
    logits, weights = model(tokens, return_weights=True)
    assert logits.shape == (B, n, 11)
    assert len(weights) == 2
    for w in weights:
        assert w.shape == (B, 3, n, n)
        torch.testing.assert_close(w.sum(-1), torch.ones(B, 3, n, dtype=w.dtype))
        assert (w.triu(diagonal=1) == 0).all(), "a query attends to a later key"


@pytest.mark.parametrize("positions", POSITIONS)
def test_causality(positions):
    """Changing token t changes no logits before t, and does change the logits at t."""
    model = make(positions)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 11, (2, 9), generator=g)
    base = model(tokens)
    for t in (0, 4, 8):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"logits before {t} moved"
        assert (out[:, t] - base[:, t]).abs().max() > 1e-6


def test_block_matches_torch_reference():
    """One block against a reference written with torch's own SDPA and the same weights."""
    torch.manual_seed(3)
    block = Block(d_model=8, n_heads=2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    bias = alibi_bias(2, 5, like=x)  # (H, n, n), -inf above the diagonal
    out, weights = block(x, mask=bias)

    a, h = block.attn, block.ln_attn(x)
    split = lambda t: t.view(2, 5, 2, 4).transpose(1, 2)  # (B, H, n, d_head)
    q, k, v = split(a.q_proj(h)), split(a.k_proj(h)), split(a.v_proj(h))
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # causal via the bias
    ref = x + a.out_proj(ctx.transpose(1, 2).reshape(2, 5, 8))
    ref = ref + block.mlp.down(F.gelu(block.mlp.up(block.ln_mlp(ref))))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    ref_w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(4) + bias, dim=-1)
    torch.testing.assert_close(weights, ref_w, atol=1e-12, rtol=0)


def test_sinusoidal_positions_are_added():
    model = make("sinusoidal")
    tokens = torch.tensor([[1, 2, 3]])
    x = model.embed(tokens) + sinusoidal_positions(3, 12, like=model.embed.weight)
    first_block_out, _ = model.blocks[0](x)
    # Same tokens in another order give another output at the shared last token.
    assert not torch.allclose(model(tokens)[0, -1], model(tokens.flip(1))[0, -1])
    assert first_block_out.shape == (1, 3, 12)


def test_without_positions_the_last_output_ignores_order():
    """No positions, one layer: the last query sees the same *set* of keys in any order.
    (With two causal layers the earlier tokens' vectors already depend on their order.)"""
    model = make("none", n_layers=1)
    tokens = torch.tensor([[1, 5, 7, 2]])
    shuffled = tokens[:, [2, 0, 1, 3]]  # same set before the last token
    torch.testing.assert_close(model(tokens)[0, -1], model(shuffled)[0, -1], atol=1e-12, rtol=0)
    assert not torch.allclose(model(tokens)[0, 1], model(shuffled)[0, 1])


def test_ablate_heads_zeroes_exactly_one_head_and_restores():
    model = make("learned")
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(4))
    before = model(tokens)
    w_before = model.blocks[1].attn.out_proj.weight.clone()

    # Reference: run layer 1's attention by hand without head 2's output.
    x = model.embed(tokens) + model.pos(6)
    x, _ = model.blocks[0](x)
    blk = model.blocks[1]
    h = blk.ln_attn(x)
    split = lambda t: t.view(2, 6, 3, 4).transpose(1, 2)
    q, k, v = split(blk.attn.q_proj(h)), split(blk.attn.k_proj(h)), split(blk.attn.v_proj(h))
    ctx = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, n, d_head)
    ctx[:, 2] = 0.0
    x = x + blk.attn.out_proj(ctx.transpose(1, 2).reshape(2, 6, 12))
    x = x + blk.mlp(blk.ln_mlp(x))
    ref = model.unembed(model.ln_out(x))

    with ablate_heads(model, [(1, 2)]):
        ablated = model(tokens)
    torch.testing.assert_close(ablated, ref, atol=1e-12, rtol=0)
    assert (ablated - before).abs().max() > 1e-6
    assert torch.equal(model.blocks[1].attn.out_proj.weight, w_before)
    assert torch.equal(model(tokens), before)


def test_ablate_heads_restores_after_error():
    model = make()
    w = model.blocks[0].attn.out_proj.weight.clone()
    with pytest.raises(ValueError, match="head"):
        with ablate_heads(model, [(0, 0), (0, 3)]):
            pass
    assert torch.equal(model.blocks[0].attn.out_proj.weight, w)


@pytest.fixture
def one_thread():
    # Tiny models run faster on one thread, and much faster on a busy machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_model_overfits_tiny_batch(one_thread):
    torch.manual_seed(5)
    model = TinyTransformer(vocab_size=13, d_model=16, n_heads=2, n_layers=1, max_len=8)
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 13, (4, 8), generator=g)
    targets = torch.randint(0, 13, (4, 8), generator=g)
    targets[:, 0] = -100  # ignored positions must not count
    losses = train(model, lambda: (tokens, targets), steps=80, lr=2e-2, warmup=5)
    assert losses[-1] < 0.05 < losses[0]
    assert accuracy(model, tokens, targets) == 1.0


def test_learned_positions_table():
    pe = LearnedPositionEmbedding(5, 3)
    torch.testing.assert_close(pe(2, offset=3), pe.weight[3:5])
    with pytest.raises(ValueError, match="max_len = 5"):
        pe(3, offset=3)


@pytest.mark.parametrize("tokens, err, match", [
    (torch.zeros(2, 3), TypeError, "integer"),
    (torch.zeros(3, dtype=torch.long), ValueError, r"\(B, n\)"),
    (torch.zeros(1, 18, dtype=torch.long), ValueError, "max_len"),
])
def test_bad_tokens(tokens, err, match):
    with pytest.raises(err, match=match):
        make()(tokens)


def test_bad_positions_name():
    with pytest.raises(ValueError, match="positions"):
        TinyTransformer(5, positions="rope")
