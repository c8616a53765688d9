"""Benchmark attnlib's Triton FlashAttention against PyTorch's fused attention (chapter 16).

Run on a machine with a CUDA GPU::

    python -m attnlib.kernels.benchmark                 # the full table (a few minutes)
    python -m attnlib.kernels.benchmark --quick         # N = 1k and 4k only
    python -m attnlib.kernels.benchmark --markdown      # the table as Markdown

For B = 4, H = 32, d in {64, 128}, N in {1k, 2k, 4k, 8k, 16k}, causal and not, float16
and bfloat16, it times the forward and the backward pass of
:func:`attnlib.kernels.flash_attention` and of ``F.scaled_dot_product_attention`` forced
onto its FlashAttention backend (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), with
``triton.testing.do_bench(..., return_mode="median")`` (the median of the timed runs),
and prints TFLOP/s and the ratio attnlib / PyTorch.  FLOPs follow the FlashAttention
papers' convention: forward 4 * B * H * N^2 * d (two matrix products), halved when
causal; backward 2.5 times the forward (five matrix products), whatever a kernel
actually recomputes.

It also checks every configuration with the tolerance rule of the flash-attention
repository's tests (:func:`accuracy_report`): for the output o and the gradients dq,
dk and dv, restricted to the first ``--ref-heads`` heads of the first sequence, the
kernel's largest error against plain attention computed in float32 from the same inputs
must be at most twice the error of PyTorch's own low-precision attention (the flash
backend) against that reference, plus twice the rounding of the reference to the
inputs' dtype.  The table shows the worst ratio error / bound (at most 1 passes); a
failure raises ``AssertionError`` after the whole table is printed.

Without a CUDA GPU (or without Triton, or with ``TRITON_INTERPRET=1`` set) it exits with
a message saying why, and status 1.  The accuracy functions work on any device, so their
logic is tested on a CPU (``tests/test_flash.py``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

__all__ = ["ACCURACY_FACTOR", "SPEED_GOALS", "accuracy_report", "attention_flops",
           "check_accuracy", "format_table", "main", "outputs_and_grads", "reference_outputs"]

SEQLENS = (1024, 2048, 4096, 8192, 16384)
HEAD_DIMS = (64, 128)
OUTPUTS = ("o", "dq", "dk", "dv")
ACCURACY_FACTOR = 2.0  # the kernel's error may be at most this multiple of PyTorch's
SPEED_GOALS = {"fwd": 0.9, "bwd": 0.7}  # throughput goals, attnlib / PyTorch, on an H100


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


# ----------------------------------------------------------------------------- accuracy

def outputs_and_grads(fn, q, k, v, do) -> tuple:
    """``(o, dq, dk, dv)``: ``o = fn(q, k, v)`` and the gradients that ``do`` sends back.

    q: (B, H, L, d), k and v: (B, H, S, d), do: (B, H, L, d), any device and dtype.  The
    inputs are copied, so their own ``.grad`` is left alone; the results are detached.
    """
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return tuple(x.detach() for x in (o, q.grad, k.grad, v.grad))


def reference_outputs(q, k, v, do, causal: bool, dtype=None) -> tuple:
    """``(o, dq, dk, dv)`` of plain attention on the inputs upcast to ``dtype``.

    Plain means the textbook algorithm: scores ``q k^T / sqrt(d)``, the causal mask
    (bottom-right aligned, as in attnlib; the same as PyTorch's ``is_causal`` when
    L = S), a softmax, and the product with v.  ``dtype`` defaults to float32.  One
    (batch, head) pair at a time, so that only one (L, S) matrix exists at once.
    """
    import torch

    dtype = torch.float32 if dtype is None else dtype
    L, S = q.shape[-2], k.shape[-2]
    allowed = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(S - L)

    def plain(q, k, v):
        z = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (L, S)
        if causal:
            z = z.masked_fill(~allowed, float("-inf"))
        return torch.softmax(z, dim=-1).nan_to_num(0.0) @ v  # a row with no key gives 0

    parts = [[[] for _ in range(q.shape[1])] for _ in range(q.shape[0])]
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            parts[b][h] = outputs_and_grads(plain, *(x[b, h].to(dtype) for x in (q, k, v)),
                                            do[b, h].to(dtype))
    return tuple(torch.stack([torch.stack([parts[b][h][i] for h in range(q.shape[1])])
                              for b in range(q.shape[0])]) for i in range(4))


def accuracy_report(ours, baseline, reference, *, factor: float = ACCURACY_FACTOR) -> dict:
    """The flash-attention tolerance rule, for each of o, dq, dk and dv.

    Args:
        ours: ``(o, dq, dk, dv)`` of the kernel under test, in a low precision.
        baseline: the same four from PyTorch's own attention in that precision.
        reference: the same four computed in float32 (or float64) from the same inputs,
            e.g. by :func:`reference_outputs`.
        factor: how many times the baseline's error the kernel may make.

    Returns:
        ``{name: {"ours", "baseline", "slack", "bound", "ok"}}`` for name in o, dq, dk,
        dv: the largest absolute errors of the kernel and of the baseline against the
        reference, the slack ``2 * max|round(ref) - ref|`` (the reference rounded to the
        kernel's dtype, at the scale of numbers near 0.3), the bound
        ``factor * baseline + slack``, and whether ``ours <= bound``.
    """
    report = {}
    for name, a, p, r in zip(OUTPUTS, ours, baseline, reference):
        r = r.double()
        low = a.dtype
        err = (a.double() - r).abs().max().item()
        err_base = (p.double() - r).abs().max().item()
        slack = 2 * (((r.to(low) + 0.3) - 0.3).double() - r).abs().max().item()
        bound = factor * err_base + slack
        report[name] = {"ours": err, "baseline": err_base, "slack": slack, "bound": bound,
                        "ok": err <= bound}
    return report


def check_accuracy(report: dict, what: str = "the kernel") -> None:
    """Raise ``AssertionError`` naming every output of ``report`` that breaks the rule."""
    bad = [f"{name}: error {r['ours']:.2e} > bound {r['bound']:.2e} (= {ACCURACY_FACTOR:g} "
           f"x PyTorch's {r['baseline']:.2e} + {r['slack']:.2e})"
           for name, r in report.items() if not r["ok"]]
    if bad:
        raise AssertionError(f"{what} is less accurate than the flash-attention rule "
                             f"allows: " + "; ".join(bad))


def _worst_ratio(report: dict) -> float:
    """max over the outputs of error / bound (at most 1 passes)."""
    return max(r["ours"] / r["bound"] if r["bound"] > 0 else (math.inf if r["ours"] else 0.0)
               for r in report.values())


def format_table(rows: list[dict], markdown: bool = False) -> str:
    """The benchmark rows as a text (or Markdown) table, with ratios attnlib / torch."""
    head = ["dtype", "causal", "d", "N", "fwd attnlib", "fwd torch", "fwd ratio",
            "bwd attnlib", "bwd torch", "bwd ratio", "err/bound", "accuracy"]

    def fmt(r):
        def num(x, spec):
            return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)
        ratio_f = r["fwd_ours"] / r["fwd_torch"] if r.get("fwd_ours") and r.get("fwd_torch") else None
        ratio_b = r["bwd_ours"] / r["bwd_torch"] if r.get("bwd_ours") and r.get("bwd_torch") else None
        return [r["dtype"], str(r["causal"]), str(r["d"]), str(r["N"]),
                num(r.get("fwd_ours"), ".1f"), num(r.get("fwd_torch"), ".1f"), num(ratio_f, ".2f"),
                num(r.get("bwd_ours"), ".1f"), num(r.get("bwd_torch"), ".1f"), num(ratio_b, ".2f"),
                num(r.get("err_ratio"), ".2f"), r.get("accuracy", "—")]

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


def _bench_case(B, H, N, d, causal, dtype, rep, ref_heads=2):
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
    few = (slice(0, 1), slice(0, ref_heads))  # heads are independent: check a few
    results = {}
    for name, fn in (("ours", ours), ("torch", ref)):
        fn(q, k, v).backward(do)  # warm-up: compiles and autotunes outside the timing
        q.grad = k.grad = v.grad = None
        with torch.no_grad():
            ms = do_bench(lambda fn=fn: fn(q, k, v), rep=rep, return_mode="median")
        row[f"fwd_{name}"] = flops_f / (ms * 1e-3) / 1e12
        o = fn(q, k, v)
        ms = do_bench(lambda o=o: o.backward(do, retain_graph=True), grad_to_none=[q, k, v],
                      rep=rep, return_mode="median")
        row[f"bwd_{name}"] = flops_b / (ms * 1e-3) / 1e12
        q.grad = k.grad = v.grad = None
        del o
        results[name] = [x[few].clone() for x in outputs_and_grads(fn, q, k, v, do)]
    reference = reference_outputs(*(x.detach()[few] for x in (q, k, v, do)), causal=causal)
    report = accuracy_report(results["ours"], results["torch"], reference)
    row["report"] = report
    row["err_ratio"] = _worst_ratio(report)
    failed = [name for name, r in report.items() if not r["ok"]]
    row["accuracy"] = "ok" if not failed else "FAIL " + ",".join(failed)
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
    parser.add_argument("--ref-heads", type=int, default=2,
                        help="heads of the first sequence checked against the float32 "
                             "reference (each needs one N x N float32 matrix)")
    args = parser.parse_args(argv)

    why = _why_not_runnable()
    if why is not None:
        sys.exit(f"attnlib.kernels.benchmark: {why}")

    import torch
    import triton

    seqlens = [1024, 4096] if args.quick else args.seqlens
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"triton {triton.__version__}  B = {args.batch}, H = {args.heads}; TFLOP/s "
          f"(median of do_bench); ratio = attnlib / torch flash backend; err/bound: the "
          f"kernel's worst error against a float32 reference over {ACCURACY_FACTOR:g} x "
          f"PyTorch's + slack (<= 1 passes)", flush=True)
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for causal in (False, True):
            for d in args.head_dims:
                for N in seqlens:
                    try:
                        row = _bench_case(args.batch, args.heads, N, d, causal, dtype,
                                          args.rep, args.ref_heads)
                    except torch.cuda.OutOfMemoryError:
                        row = {"dtype": dtype_name, "causal": causal, "d": d, "N": N}
                        print(f"  out of memory at {row}", flush=True)
                    rows.append(row)
                    torch.cuda.empty_cache()
                    print(format_table([row]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows, markdown=args.markdown))
    for mode, goal in SPEED_GOALS.items():
        ratios = [r[f"{mode}_ours"] / r[f"{mode}_torch"] for r in rows
                  if r.get(f"{mode}_ours") and r.get(f"{mode}_torch")]
        if ratios:
            ratios.sort()
            print(f"{mode}: ratio min {ratios[0]:.2f}, median {ratios[len(ratios) // 2]:.2f}, "
                  f"max {ratios[-1]:.2f} (goal on an H100: >= {goal})")
    checked = [r for r in rows if "report" in r]
    print(f"accuracy: {sum(r['accuracy'] == 'ok' for r in checked)} of {len(checked)} "
          f"configurations within the flash-attention rule")
    failures = []
    for r in checked:  # every failing configuration is named, then the run fails
        try:
            check_accuracy(r["report"], f"attnlib's kernel ({r['dtype']}, causal="
                                        f"{r['causal']}, d = {r['d']}, N = {r['N']})")
        except AssertionError as err:
            failures.append(str(err))
    if failures:
        raise AssertionError("\n".join(failures))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
