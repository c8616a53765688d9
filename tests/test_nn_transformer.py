"""Tests of attnlib.nn.transformer: shapes, causality, an independent block reference,
head ablation, and that a tiny model can overfit a tiny batch; the same for the
encoder-decoder (TinyEncoderDecoder)."""

import math

import pytest
import torch
from torch.nn import functional as F

from attnlib.nn.multihead import silence_heads
from attnlib.nn.transformer import (
    Block,
    DecoderBlock,
    LearnedPositionEmbedding,
    TinyEncoderDecoder,
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


# -- the encoder-decoder ----------------------------------------------------------------

def _split(t, H):  # (B, n, H * d_head) -> (B, H, n, d_head)
    B, n, d = t.shape
    return t.view(B, n, H, d // H).transpose(1, 2)


def _mha_ref(attn, x, context, causal):
    """attnlib's MultiHeadAttention rebuilt from torch's SDPA, with the same weights."""
    H = attn.n_heads
    q = _split(attn.q_proj(x), H)
    k, v = _split(attn.k_proj(context), H), _split(attn.v_proj(context), H)
    ctx = F.scaled_dot_product_attention(q, k, v, is_causal=causal)   # (B, H, L, d_head)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    B, _, L, _ = ctx.shape
    return attn.out_proj(ctx.transpose(1, 2).reshape(B, L, -1)), w


def make_seq2seq(**kw):
    torch.manual_seed(7)
    args = dict(vocab_size=13, d_model=12, n_heads=3, n_layers=2, max_len=9)
    args.update(kw)
    return TinyEncoderDecoder(**args).double().eval()


def test_encoder_block_is_not_causal_and_matches_torch():
    torch.manual_seed(8)
    block = Block(d_model=8, n_heads=2, causal=False).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out, weights = block(x)
    h, _ = _mha_ref(block.attn, block.ln_attn(x), block.ln_attn(x), causal=False)
    ref = x + h
    ref = ref + block.mlp(block.ln_mlp(ref))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    upper = torch.ones(5, 5, dtype=torch.bool).triu(diagonal=1)
    assert (weights[..., upper] > 0).all(), "an encoder query must see later keys"
    assert Block(8, 2).causal and not block.causal


def test_decoder_block_matches_torch_reference():
    """Causal self-attention, cross-attention to the memory (L != S), MLP."""
    torch.manual_seed(9)
    block = DecoderBlock(d_model=8, n_heads=2).double()
    x = torch.randn(3, 4, 8, dtype=torch.float64)                     # (B, L, d_model)
    memory = torch.randn(3, 6, 8, dtype=torch.float64)                # (B, S, d_model)
    out, cross = block(x, memory)
    h, _ = _mha_ref(block.self_attn, block.ln_self(x), block.ln_self(x), causal=True)
    ref = x + h
    h, ref_w = _mha_ref(block.cross_attn, block.ln_cross(ref), memory, causal=False)
    ref = ref + h
    ref = ref + block.mlp(block.ln_mlp(ref))
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert cross.shape == (3, 2, 4, 6)
    torch.testing.assert_close(cross, ref_w, atol=1e-12, rtol=0)


@pytest.mark.parametrize("B, S, L", [(1, 1, 1), (2, 5, 3), (3, 4, 9)])
def test_seq2seq_shapes_and_cross_weights(B, S, L):
    model = make_seq2seq()
    g = torch.Generator().manual_seed(10)
    src = torch.randint(0, 13, (B, S), generator=g)
    tgt_in = torch.randint(0, 13, (B, L), generator=g)
    logits, cross = model(src, tgt_in, return_weights=True)
    assert logits.shape == (B, L, 13)
    assert len(cross) == 2
    for w in cross:
        assert w.shape == (B, 3, L, S)
        torch.testing.assert_close(w.sum(-1), torch.ones(B, 3, L, dtype=w.dtype))
    torch.testing.assert_close(model(src, tgt_in), logits, atol=0, rtol=0)


def test_seq2seq_target_is_causal_and_source_is_seen_everywhere():
    model = make_seq2seq()
    g = torch.Generator().manual_seed(11)
    src = torch.randint(0, 13, (2, 7), generator=g)
    tgt_in = torch.randint(0, 13, (2, 6), generator=g)
    base = model(src, tgt_in)
    for t in (0, 3, 5):
        changed = tgt_in.clone()
        changed[:, t] = (changed[:, t] + 1) % 13
        out = model(src, changed)
        assert torch.equal(out[:, :t], base[:, :t]), f"target position {t} leaks backwards"
        assert (out[:, t] - base[:, t]).abs().max() > 1e-6
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % 13                   # the last source token ...
    diff = (model(src2, tgt_in) - base).abs().amax(dim=(0, 2))
    assert (diff > 1e-6).all(), "... reaches every target position, the first included"


def test_generate_is_greedy_decoding():
    model = make_seq2seq()
    src = torch.randint(0, 13, (4, 5), generator=torch.Generator().manual_seed(12))
    out = model.generate(src, start=12, length=6)
    assert out.shape == (4, 6) and out.dtype == torch.long
    tgt_in = torch.cat([torch.full((4, 1), 12), out[:, :-1]], dim=1)
    torch.testing.assert_close(model(src, tgt_in).argmax(-1), out, atol=0, rtol=0)
    with pytest.raises(ValueError, match="max_len"):
        model.generate(src, start=12, length=10)


def test_seq2seq_learns_to_reverse_a_tiny_batch(one_thread):
    """train and accuracy take a tuple (src, tgt_in); the cross-attention of a trained
    reverser reads the mirrored source position, and silencing it breaks the model."""
    torch.manual_seed(13)
    model = TinyEncoderDecoder(vocab_size=6, d_model=16, n_heads=1, n_layers=1, max_len=5,
                               embed_std=1.0)
    g = torch.Generator().manual_seed(14)
    src = torch.randint(0, 5, (16, 5), generator=g)
    tgt = src.flip(1)
    tgt_in = torch.cat([torch.full((16, 1), 5), tgt[:, :-1]], dim=1)
    losses = train(model, lambda: ((src, tgt_in), tgt), steps=120, lr=1e-2, warmup=10)
    assert losses[-1] < 0.05 < losses[0]
    assert accuracy(model, (src, tgt_in), tgt) == 1.0
    assert torch.equal(model.generate(src, start=5, length=5), tgt)
    with silence_heads([blk.cross_attn for blk in model.decoder], [(0, 0)]):
        assert accuracy(model, (src, tgt_in), tgt) < 0.7


_ZEROS = lambda *shape: torch.zeros(*shape, dtype=torch.long)  # noqa: E731


@pytest.mark.parametrize("src, tgt_in, err, match", [
    (torch.zeros(2, 3), _ZEROS(2, 3), TypeError, "src must be an integer"),
    (_ZEROS(2, 10), _ZEROS(2, 3), ValueError, "max_len"),
    (_ZEROS(2, 3), _ZEROS(3, 3), ValueError, "batch size"),
    (_ZEROS(2, 3), torch.full((2, 3), 13), ValueError, "vocab_size"),
])
def test_seq2seq_bad_inputs(src, tgt_in, err, match):
    with pytest.raises(err, match=match):
        make_seq2seq()(src, tgt_in)
