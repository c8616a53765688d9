"""What every Triton kernel module of attnlib needs first: a guarded import of Triton,
whether its interpreter is on, and a plain-words answer to "can the kernels run here?".

Triton ships for Linux only; without it (macOS, Windows) ``HAS_TRITON`` is False, the
kernel modules still import, and :func:`available` says why nothing can run.  On a CPU
the kernels run through Triton's interpreter, which must be switched on with
``TRITON_INTERPRET=1`` *before* Triton is first imported (``@triton.jit`` decides then).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
    IMPORT_ERROR = ""
except ImportError as err:  # macOS, Windows, or a Linux install without triton
    triton = tl = None
    HAS_TRITON = False
    IMPORT_ERROR = str(err)


def _interpret_flag() -> bool:
    if not HAS_TRITON:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# Decided once, when the kernels are defined (as Triton itself does).
INTERPRETED = _interpret_flag()


def jit(fn):
    """``triton.jit`` where Triton exists; otherwise keep the plain function (never run)."""
    return triton.jit(fn) if HAS_TRITON else fn


def available(module: str) -> tuple[bool, str]:
    """Can the kernels of ``module`` run here?  ``(ok, reason)``, the reason in words."""
    if not HAS_TRITON:
        return False, ("Triton is not installed (it ships for Linux only): "
                       f"{IMPORT_ERROR}. On Linux, pip install \"attnlib[kernels]\".")
    if INTERPRETED:
        return True, ("Triton interpreter (TRITON_INTERPRET=1): kernels run on CPU tensors, "
                      "slowly; keep shapes small")
    import torch

    if torch.cuda.is_available():
        return True, f"compiled Triton kernels on {torch.cuda.get_device_name()}"
    return False, (f"no GPU, and TRITON_INTERPRET was not 1 when {module} was imported: "
                   "set os.environ['TRITON_INTERPRET'] = '1' before the first import of "
                   "triton/attnlib.kernels (e.g. at the top of the notebook or script)")
