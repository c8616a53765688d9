"""PyTorch modules built on attnlib's functions.

======================================  =========================================
``attnlib.nn.Attention``                ch. 6   single-head self/cross-attention
``attnlib.nn.MultiHeadAttention``       ch. 7   multi-head attention
======================================  =========================================
"""

from .attention import Attention
from .multihead import MultiHeadAttention

__all__ = ["Attention", "MultiHeadAttention"]
