"""GPU kernels written in Triton (Part IV of the book).

``import attnlib.kernels`` always works; whether the kernels can *run* depends on the
machine, and :func:`available` says so in words:

* Linux with an NVIDIA/AMD GPU and ``triton`` installed: compiled kernels on GPU tensors.
* Linux without a GPU: set ``os.environ["TRITON_INTERPRET"] = "1"`` **before** the first
  ``import attnlib.kernels`` (or ``import triton``); the kernels then run on CPU tensors
  through Triton's interpreter, slowly (keep shapes small).
* macOS, Windows: Triton is not available; ``HAS_TRITON`` is False and calling a kernel
  raises a ``RuntimeError`` naming the reason.

Modules: :mod:`attnlib.kernels.flash_triton` (FlashAttention forward and backward,
chapter 16), ``python -m attnlib.kernels.benchmark`` (its GPU benchmark against PyTorch,
chapter 16) and :mod:`attnlib.kernels.paged_triton` (paged decode attention, chapter 17).
"""

from .flash_triton import (
    HAS_TRITON,
    INTERPRETED,
    SUPPORTED_HEAD_DIMS,
    FlashAttentionFunction,
    available,
    flash_attention,
    flash_attention_forward,
)

__all__ = ["HAS_TRITON", "INTERPRETED", "SUPPORTED_HEAD_DIMS", "FlashAttentionFunction",
           "available", "flash_attention", "flash_attention_forward"]
