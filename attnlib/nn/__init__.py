"""PyTorch modules built on attnlib's functions.

==========================================  =============================================
``attnlib.nn.Attention``                    ch. 6   single-head self/cross-attention
``attnlib.nn.MultiHeadAttention``           ch. 7   multi-head attention
``attnlib.nn.TinyTransformer``              ch. 10  a small decoder-only Transformer
``attnlib.nn.TinyEncoderDecoder``           ch. 10  a small encoder-decoder (cross-attention)
``attnlib.nn.GroupedQueryAttention``        ch. 12  MQA / GQA / MHA with RoPE and a KV cache
``attnlib.nn.MultiHeadLatentAttention``     ch. 13  DeepSeek-V2's MLA with decoupled RoPE
==========================================  =============================================
"""

try:
    import torch  # noqa: F401
except ImportError as error:  # attnlib's functions work on NumPy alone; its modules do not
    raise ImportError("attnlib.nn holds PyTorch modules and needs PyTorch, which is not "
                      "installed. Install it with: pip install \"attnlib[torch]\" "
                      "(or pip install torch)") from error

from .attention import Attention
from .gqa import GroupedQueryAttention, mha_to_gqa
from .mla import MLACache, MultiHeadLatentAttention
from .multihead import MultiHeadAttention
from .transformer import DecoderBlock, TinyEncoderDecoder, TinyTransformer

__all__ = [
    "Attention",
    "DecoderBlock",
    "GroupedQueryAttention",
    "MLACache",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "TinyEncoderDecoder",
    "TinyTransformer",
    "mha_to_gqa",
]
