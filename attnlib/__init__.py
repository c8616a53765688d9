"""attnlib: the companion library of the course on attention.

Every chapter of the book imports it, and its modules follow the book, so a reader who
has finished a chapter knows where its code lives:

========================  ======================================================
``attnlib.lookup``        ch. 1   hard and soft lookups
``attnlib.softmax``       ch. 1, 3  stable softmax and log-sum-exp
``attnlib.smoothing``     ch. 2   Nadaraya-Watson kernel smoothing
``attnlib.sdpa``          ch. 3   scaled dot-product attention
``attnlib.cost``          ch. 3   FLOP and memory counts
``attnlib.backward``      ch. 4   the backward pass by hand
``attnlib.scoring``       ch. 5   dot, bilinear, additive and cosine scores
``attnlib.projections``   ch. 6   single-head attention with explicit W_Q, W_K, W_V
``attnlib.multihead``     ch. 7   split heads, attend, merge
``attnlib.masks``         ch. 3, 8  causal, padding, window and function masks
``attnlib.positions``     ch. 9   sinusoidal, ALiBi and rotary positions
``attnlib.kv_cache``      ch. 11  the KV cache and its size for real models
``attnlib.sparse``        ch. 14  sparse patterns and block-sparse attention
``attnlib.linear_attention`` ch. 14  linear (feature-map) attention
``attnlib.flash``         ch. 15  online softmax, tiled attention, memory traffic
``attnlib.kernels``       ch. 16, 17  Triton kernels (FlashAttention, paged decode)
``attnlib.paged``         ch. 17  block allocator, paged KV cache, serving trace
``attnlib.pretrained``    ch. 18  all-MiniLM-L6-v2 rebuilt with attnlib
``attnlib.nn``            ch. 6, 7, 10, 12, 13: PyTorch modules
``attnlib.exercises``     exercises that grade themselves: ``check(key, your_fn)``
``attnlib.notebook``      ``glue`` with or without myst_nb; optional chapter parts
========================  ======================================================

Every function takes NumPy arrays or torch tensors and returns the same kind; the core
below is importable from ``attnlib`` directly.
"""

from .lookup import hard_lookup, hard_lookup_weights, soft_lookup
from .masks import causal_mask, padding_mask
from .sdpa import (
    attention_scores,
    attention_weights,
    mask_scores,
    scaled_dot_product_attention,
)
from .softmax import logsumexp, softmax

__version__ = "0.1.0"

__all__ = [
    "attention_scores",
    "attention_weights",
    "causal_mask",
    "hard_lookup",
    "hard_lookup_weights",
    "logsumexp",
    "mask_scores",
    "padding_mask",
    "scaled_dot_product_attention",
    "soft_lookup",
    "softmax",
]
