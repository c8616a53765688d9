"""Backend dispatch and argument checks shared by every attnlib function.

attnlib writes each algorithm once.  The arrays a caller passes in decide the backend:
NumPy arrays in give NumPy arrays out; torch tensors in (any device, any float dtype,
with autograd) give torch tensors out on the same device.  The dispatch goes through
the Array API standard, as wrapped by ``array-api-compat``: ``namespace(x, ...)``
returns an object ``xp`` with ``xp.exp``, ``xp.sum``, ``xp.where`` ... that works on
whichever library the arrays came from.

The checks here turn the errors a reader would otherwise meet deep inside a matmul
into a message that names the argument and the shapes it saw.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np

def _kind(x: Any) -> str:
    if array_api_compat.is_numpy_array(x):
        return "NumPy array"
    if array_api_compat.is_torch_array(x):
        return "torch tensor"
    return type(x).__name__


def check_array(x: Any, name: str, *, min_ndim: int = 0, shape_hint: str = "") -> None:
    """Raise ``TypeError`` unless ``x`` is a NumPy array or a torch tensor with at
    least ``min_ndim`` dimensions (``ValueError`` for too few dimensions)."""
    if not (array_api_compat.is_numpy_array(x) or array_api_compat.is_torch_array(x)):
        raise TypeError(
            f"{name} must be a NumPy array or a torch tensor; got {type(x).__name__}. "
            f"Wrap it with np.asarray(...) or torch.as_tensor(...)."
        )
    if x.ndim < min_ndim:
        hint = f" {shape_hint}" if shape_hint else ""
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions{hint}; "
            f"got shape {tuple(x.shape)}"
        )


def namespace(**arrays: Any):
    """Return the array namespace shared by the named arrays (``None`` values skipped).

    Mixing NumPy arrays and torch tensors, or torch tensors on two devices, raises
    ``TypeError`` naming each argument and what it is.
    """
    present = {n: a for n, a in arrays.items() if a is not None}
    for n, a in present.items():
        check_array(a, n)
    kinds = {n: _kind(a) for n, a in present.items()}
    if len(set(kinds.values())) > 1:
        seen = ", ".join(f"{n} is a {k}" for n, k in kinds.items())
        raise TypeError(f"cannot mix NumPy arrays and torch tensors: {seen}")
    devices = {n: str(device_of(a)) for n, a in present.items()}
    if len(set(devices.values())) > 1:
        seen = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise TypeError(f"all arrays must be on one device: {seen}")
    return array_api_compat.array_namespace(*present.values())


def device_of(x: Any):
    """The device of an array (``"cpu"`` for NumPy)."""
    return array_api_compat.device(x)


def _is_float(xp, x) -> bool:
    return xp.isdtype(x.dtype, "real floating")


def check_float(xp, name: str, x: Any) -> None:
    """Raise ``TypeError`` unless ``x`` has a real floating dtype."""
    if not _is_float(xp, x):
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got {x.dtype} with shape {tuple(x.shape)}. Convert it first, e.g. "
            f"{name}.astype(np.float32) or {name}.float()."
        )


def same_dtype(named: dict[str, Any]) -> None:
    """Raise ``TypeError`` unless all named arrays share one dtype."""
    dtypes = {n: str(a.dtype) for n, a in named.items() if a is not None}
    if len(set(dtypes.values())) > 1:
        seen = ", ".join(f"{n} is {d}" for n, d in dtypes.items())
        raise TypeError(f"arrays must share one dtype: {seen}")


def broadcast_shapes(named: dict[str, tuple[int, ...]], what: str) -> tuple[int, ...]:
    """``np.broadcast_shapes`` with an error that names every argument and shape."""
    try:
        return tuple(np.broadcast_shapes(*named.values()))
    except ValueError:
        seen = ", ".join(f"{n} {tuple(s)}" for n, s in named.items())
        raise ValueError(f"{what} do not broadcast: {seen}") from None


def check_mask(xp, mask: Any, target: tuple[int, ...], like: Any, name: str = "mask"):
    """Validate an attention mask against the score shape ``target`` = (..., L, S).

    A boolean mask (True = may attend) is returned as is; a float mask (added to the
    scores) is cast to the dtype of ``like``.  Integer masks are refused, since 0/1
    could mean either "attend" or "add zero".  The mask must broadcast *to* ``target``:
    it may not enlarge the output.
    """
    if xp.isdtype(mask.dtype, "integral") or not (
        xp.isdtype(mask.dtype, "bool") or _is_float(xp, mask)
    ):
        raise TypeError(
            f"{name} must be boolean (True = may attend) or floating (added to the "
            f"scores); got {mask.dtype} with shape {tuple(mask.shape)}"
        )
    try:
        out = tuple(np.broadcast_shapes(tuple(mask.shape), target))
    except ValueError:
        out = None
    if out != tuple(target):
        raise ValueError(
            f"{name} of shape {tuple(mask.shape)} does not broadcast to the attention "
            f"scores' shape {tuple(target)} = (..., L, S)"
        )
    if xp.isdtype(mask.dtype, "bool"):
        return mask
    return xp.astype(mask, like.dtype)


def default_scale(d_k: int) -> float:
    """1/sqrt(d_k), the scale of scaled dot-product attention."""
    return 1.0 / math.sqrt(d_k)
