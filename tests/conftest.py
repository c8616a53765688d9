"""Shared helpers: backends, dtypes and an independent float64 reference."""

import os

import numpy as np
import pytest
import torch

# Triton kernels run on the CPU through Triton's interpreter, which must be chosen before
# anything imports triton (torch's flex_attention does, for one); on a GPU they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from offline.no_network import install as _block_network

_block_network()  # the tests must not need the network: any connection fails

BACKENDS = ["numpy", "torch"]


def to_backend(x, backend, dtype=None, requires_grad=False):
    """A NumPy array converted to the backend under test, in the given dtype name."""
    x = np.asarray(x)
    if dtype is not None:
        x = x.astype(dtype)
    if backend == "numpy":
        return x
    t = torch.from_numpy(np.array(x, order="C", copy=True))  # keeps 0-d arrays 0-d
    return t.requires_grad_(requires_grad) if requires_grad else t


def to_numpy(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def reference_attention(q, k, v, allowed=None, scale=None):
    """Float64 attention written from the definition, one query row at a time.

    ``allowed`` is a boolean array broadcastable to (..., L, S); a row with no allowed
    key gives zeros.  Independent of attnlib: no shared code path.
    """
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    L, S = q.shape[-2], k.shape[-2]
    scale = 1.0 / np.sqrt(q.shape[-1]) if scale is None else scale
    q = np.broadcast_to(q, batch + q.shape[-2:])
    k = np.broadcast_to(k, batch + k.shape[-2:])
    v = np.broadcast_to(v, batch + v.shape[-2:])
    if allowed is None:
        allowed = np.ones((L, S), bool)
    allowed = np.broadcast_to(allowed, batch + (L, S))
    out = np.zeros(batch + (L, v.shape[-1]))
    for idx in np.ndindex(*batch):
        for i in range(L):
            keep = allowed[idx][i]
            if not keep.any():
                continue
            s = np.array([q[idx][i] @ k[idx][j] for j in range(S)]) * scale
            w = np.exp(s[keep] - s[keep].max())
            out[idx][i] = (w / w.sum()) @ v[idx][keep]
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
