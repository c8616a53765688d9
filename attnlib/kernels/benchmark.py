"""Benchmark attnlib's Triton FlashAttention against PyTorch's fused attention (chapter 16).

Run on a machine with a CUDA GPU::

    python -m attnlib.kernels.benchmark                 # the full table (a few minutes)
    python -m attnlib.kernels.benchmark --quick         # N = 1k and 4k only
    python -m attnlib.kernels.benchmark --markdown      # the table as Markdown

For B = 4, H = 32, d in {64, 128}, N in {1k, 2k, 4k, 8k, 16k}, causal and not, float16
and bfloat16, it times the forward and the backward pass of
:func:`attnlib.kernels.flash_attention` and of ``F.scaled_dot_product_attention`` forced
onto its FlashAttention backend (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), with
``triton.testing.do_bench`` (median time), and prints TFLOP/s, the ratio
attnlib / PyTorch, and the largest absolute differences of the output and of dq between
the two (max Δo, max Δdq: a sanity check of the compiled kernels).  FLOPs follow the FlashAttention papers' convention: forward
4 * B * H * N^2 * d (two matrix products), halved when causal; backward 2.5 times the
forward (five matrix products), whatever a kernel actually recomputes.

Without a CUDA GPU (or without Triton, or with ``TRITON_INTERPRET=1`` set) it exits with
a message saying why, and status 1.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["attention_flops", "format_table", "main"]

SEQLENS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)


def attention_flops(B: int, H: int, N: int, d: int, causal: bool, mode: str = "fwd") -> float:
    """Floating-point operations of attention on (B, H, N, d) inputs, by convention.

    ``mode`` is ``"fwd"`` (Q K^T and P V: 2 products of 2 * N^2 * d flops each, per head)
    or ``"bwd"`` (2.5 times the forward: dV, dP, dQ, dK and the recomputed Q K^T).
    Causal attention does half the work.
    """
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode must be 'fwd' or 'bwd'; got {mode!r}")
    flops = 4.0 * B * H * N * N * d / (2 if causal else 1)
    return flops * (2.5 if mode == "bwd" else 1.0)


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The benchmark rows as a text (or Markdown) table, with ratios attnlib / torch."""
    head = ["dtype", "causal", "d", "N", "fwd attnlib", "fwd torch", "fwd ratio",
            "bwd attnlib", "bwd torch", "bwd ratio", "max Δo", "max Δdq"]

    def fmt(r):
        def num(x, spec):
            return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
        ratio_f = r["fwd_ours"] / r["fwd_torch"] if r.get("fwd_ours") and r.get("fwd_torch") else None
        ratio_b = r["bwd_ours"] / r["bwd_torch"] if r.get("bwd_ours") and r.get("bwd_torch") else None
        return [r["dtype"], str(r["causal"]), str(r["d"]), str(r["N"]),
                num(r.get("fwd_ours"), ".1f"), num(r.get("fwd_torch"), ".1f"), num(ratio_f, ".2f"),
                num(r.get("bwd_ours"), ".1f"), num(r.get("bwd_torch"), ".1f"), num(ratio_b, ".2f"),
                num(r.get("err_o"), ".1e"), num(r.get("err_dq"), ".1e")]

    body = [fmt(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def _why_not_runnable() -> str | None:
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed."
    from . import flash_triton

    if not flash_triton.HAS_TRITON:
        return "Triton is not installed (Linux only): pip install triton."
    if not torch.cuda.is_available():
        return ("No CUDA GPU found: this benchmark times compiled kernels and needs a GPU. "
                "On a CPU, the kernels run (slowly) through the Triton interpreter: see "
                "chapter 16 and tests/test_flash_triton.py.")
    if flash_triton.INTERPRETED:
        return "TRITON_INTERPRET=1 is set: unset it to time compiled kernels."
    return None


def _bench_case(B, H, N, d, causal, dtype, rep):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from .flash_triton import flash_attention

    def ref(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def ours(q, k, v):
        return flash_attention(q, k, v, causal=causal)

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=dtype, generator=gen).requires_grad_()
               for _ in range(3))
    do = torch.randn(B, H, N, d, device="cuda", dtype=dtype, generator=gen)
    row = {"dtype": str(dtype).replace("torch.", ""), "causal": causal, "d": d, "N": N}
    flops_f = attention_flops(B, H, N, d, causal, "fwd")
    flops_b = attention_flops(B, H, N, d, causal, "bwd")
    grads = {}
    for name, fn in (("ours", ours), ("torch", ref)):
        fn(q, k, v).backward(do)  # warm-up: compiles and autotunes outside the timing
        q.grad = k.grad = v.grad = None
        with torch.no_grad():
            ms = do_bench(lambda fn=fn: fn(q, k, v), rep=rep)
        row[f"fwd_{name}"] = flops_f / (ms * 1e-3) / 1e12
        o = fn(q, k, v)
        ms = do_bench(lambda o=o: o.backward(do, retain_graph=True), grad_to_none=[q, k, v], rep=rep)
        row[f"bwd_{name}"] = flops_b / (ms * 1e-3) / 1e12
        q.grad = None
        o.backward(do)
        grads[name] = (o.detach(), q.grad.detach().clone())
        q.grad = k.grad = v.grad = None
        del o
    row["err_o"] = (grads["ours"][0].float() - grads["torch"][0].float()).abs().max().item()
    row["err_dq"] = (grads["ours"][1].float() - grads["torch"][1].float()).abs().max().item()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(HEAD_DIMS))
    parser.add_argument("--seqlens", type=int, nargs="+", default=list(SEQLENS))
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"],
                        choices=["float16", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="N = 1024 and 4096 only")
    parser.add_argument("--rep", type=int, default=100, help="ms of timing per measurement")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)

    why = _why_not_runnable()
    if why is not None:
        sys.exit(f"attnlib.kernels.benchmark: {why}")

    import torch
    import triton

    seqlens = [1024, 4096] if args.quick else args.seqlens
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}  B = {args.batch}, H = {args.heads}; TFLOP/s "
          f"(median of do_bench); ratio = attnlib / torch flash backend", flush=True)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for causal in (False, True):
            for d in args.head_dims:
                for N in seqlens:
                    try:
                        row = _bench_case(args.batch, args.heads, N, d, causal, dtype, args.rep)
                    except torch.cuda.OutOfMemoryError:
                        row = {"dtype": dtype_name, "causal": causal, "d": d, "N": N}
                        print(f"  out of memory at {row}", flush=True)
                    rows.append(row)
                    torch.cuda.empty_cache()
                    print(format_table([row]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows, markdown=args.markdown))
    for mode, goal in (("fwd", 0.9), ("bwd", 0.7)):
        ratios = [r[f"{mode}_ours"] / r[f"{mode}_torch"] for r in rows
                  if r.get(f"{mode}_ours") and r.get(f"{mode}_torch")]
        if ratios:
            ratios.sort()
            print(f"{mode}: ratio min {ratios[0]:.2f}, median {ratios[len(ratios) // 2]:.2f}, "
                  f"max {ratios[-1]:.2f} (goal on an H100: >= {goal})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
