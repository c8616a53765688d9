"""attnlib: the companion library of the course on attention.

Every chapter of the book imports it.  The modules follow the book:

==================  =========================================================
``attnlib.lookup``  chapter 1: hard and soft lookups
``attnlib.softmax`` chapters 1 and 3: stable softmax and log-sum-exp
``attnlib.sdpa``    chapter 3: scaled dot-product attention
``attnlib.masks``   chapters 3 and 8: causal and padding masks
==================  =========================================================

Every function takes NumPy arrays or torch tensors and returns the same kind.
"""

from .lookup import hard_lookup, hard_lookup_weights, soft_lookup
from .masks import causal_mask, padding_mask
from .sdpa import attention_scores, attention_weights, scaled_dot_product_attention
from .softmax import logsumexp, softmax

__version__ = "0.1.0"

__all__ = [
    "attention_scores",
    "attention_weights",
    "causal_mask",
    "hard_lookup",
    "hard_lookup_weights",
    "logsumexp",
    "padding_mask",
    "scaled_dot_product_attention",
    "soft_lookup",
    "softmax",
]
