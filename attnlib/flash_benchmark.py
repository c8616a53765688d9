"""Peak memory and time of plain attention against the tiled forward, in NumPy (chapter 15).

Run it from the repository root::

    python -m attnlib.flash_benchmark                     # n = 1024 ... 16384, d = 64
    python -m attnlib.flash_benchmark --n 2048 4096 --block 512

For each length n it builds float32 queries, keys and values of shape (n, d) and runs

* **plain**: the leanest NumPy version of ``softmax(Q K^T / sqrt(d)) V``, which works in
  place on a single (n, n) array of scores (so its extra memory is one n x n array plus
  the output: the least any implementation that forms the scores can use);
* **tiled**: :func:`attnlib.flash.flash_attention_forward` with ``block x block`` tiles.

The *peak extra memory* of a call is the largest amount of memory it held at once beyond
what existed before the call, measured with :mod:`tracemalloc` (NumPy reports its array
allocations to it).  Time is the best of ``repeat`` calls with tracing off.  Both
functions' outputs are compared, so a fast wrong answer cannot pass.  By default the
matrix products use one BLAS thread (through ``threadpoolctl`` when it is installed):
a per-core comparison, and a steadier one on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from .flash import flash_attention_forward

try:  # limits the BLAS threads of NumPy's matrix products (optional)
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None

__all__ = [
    "best_time",
    "format_table",
    "peak_extra_bytes",
    "plain_attention",
    "run_benchmark",
]

DEFAULT_N = (1024, 2048, 4096, 8192, 16384)


def plain_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``softmax(q k^T / sqrt(d_k)) v`` for q (L, d_k), k (S, d_k), v (S, d_v), NumPy only,
    in place on one (L, S) array of scores: the lean baseline of the benchmark."""
    s = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.T  # (L, S): the only big array
    s -= s.max(axis=-1, keepdims=True)
    np.exp(s, out=s)
    out = s @ v  # (L, d_v)
    out /= s.sum(axis=-1, keepdims=True)
    return out


def peak_extra_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Largest number of bytes ``fn(*args, **kwargs)`` allocated beyond what existed
    before the call (its result included), traced by :mod:`tracemalloc`."""
    return _traced(fn, *args, **kwargs)[0]


def _traced(fn, *args, **kwargs):
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn(*args, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak - before, result


def best_time(fn: Callable[..., Any], *args: Any, repeat: int = 3, **kwargs: Any) -> float:
    """Fastest of ``repeat`` calls, in seconds (tracing off)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def blas_threads(threads: int | None):
    """A context in which NumPy's BLAS uses ``threads`` threads (no limit for None, or
    when ``threadpoolctl`` is not installed)."""
    if threads is None or threadpool_limits is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def run_benchmark(ns=DEFAULT_N, d: int = 64, block: int = 256, repeat: int = 3,
                  seed: int = 0, threads: int | None = 1,
                  verbose: bool = True) -> list[dict]:
    """Measure plain and tiled attention at each length in ``ns``.

    Args:
        ns: sequence lengths n (L = S = n).
        d: head dimension (d_k = d_v = d).
        block: tile size of the tiled forward (block_q = block_k = block).
        repeat: timed calls per function; the fastest counts.
        seed: seed of the random inputs.
        threads: BLAS threads for both functions (default 1, a fair per-core
            comparison that is also steadier on a busy machine; None = library default).
        verbose: print each row as it is measured.

    Returns:
        One dict per n with keys ``n, d, block, plain_bytes, tiled_bytes, memory_ratio``
        (tiled / plain), ``plain_s, tiled_s, time_ratio`` (tiled / plain) and
        ``max_abs_diff`` (between the two outputs).
    """
    with blas_threads(threads):
        return _run(ns, d, block, repeat, seed, verbose)


def _run(ns, d, block, repeat, seed, verbose):
    rng = np.random.default_rng(seed)
    tiled = lambda q, k, v: flash_attention_forward(q, k, v, block_q=block, block_k=block)[0]
    warm = rng.standard_normal((min(ns), d), dtype=np.float32)
    plain_attention(warm, warm, warm)  # first calls import modules lazily: not traced
    tiled(warm, warm, warm)
    rows = []
    if verbose:
        print(format_table([]).splitlines()[0])
    for n in ns:
        q, k, v = (rng.standard_normal((n, d), dtype=np.float32) for _ in range(3))
        plain_bytes, plain_out = _traced(plain_attention, q, k, v)
        tiled_bytes, tiled_out = _traced(tiled, q, k, v)
        diff = float(np.abs(plain_out - tiled_out).max())
        del plain_out, tiled_out
        row = {"n": n, "d": d, "block": block,
               "plain_bytes": plain_bytes, "tiled_bytes": tiled_bytes,
               "plain_s": best_time(plain_attention, q, k, v, repeat=repeat),
               "tiled_s": best_time(tiled, q, k, v, repeat=repeat),
               "max_abs_diff": diff}
        row["memory_ratio"] = row["tiled_bytes"] / row["plain_bytes"]
        row["time_ratio"] = row["tiled_s"] / row["plain_s"]
        rows.append(row)
        if verbose:
            print(format_table([row]).splitlines()[-1], flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of :func:`run_benchmark` as a fixed-width text table."""
    header = (f"{'n':>6} {'plain MiB':>10} {'tiled MiB':>10} {'mem ratio':>10} "
              f"{'plain s':>8} {'tiled s':>8} {'time ratio':>10} {'max |diff|':>10}")
    lines = [header]
    for r in rows:
        lines.append(f"{r['n']:6d} {r['plain_bytes'] / 2**20:10.2f} "
                     f"{r['tiled_bytes'] / 2**20:10.2f} {r['memory_ratio']:10.4f} "
                     f"{r['plain_s']:8.3f} {r['tiled_s']:8.3f} {r['time_ratio']:10.2f} "
                     f"{r['max_abs_diff']:10.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=list(DEFAULT_N),
                        help="sequence lengths (default: %(default)s)")
    parser.add_argument("--d", type=int, default=64, help="head dimension (default: 64)")
    parser.add_argument("--block", type=int, default=256, help="tile size (default: 256)")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls (default: 3)")
    parser.add_argument("--threads", type=int, default=1,
                        help="BLAS threads, 0 = library default (default: 1)")
    args = parser.parse_args(argv)
    threads = args.threads or None
    print(f"float32, d = {args.d}, tiles of {args.block} x {args.block}, BLAS threads: "
          f"{threads or 'default'}; ratios are tiled / plain")
    rows = run_benchmark(args.n, d=args.d, block=args.block, repeat=args.repeat,
                         threads=threads)
    last = rows[-1]
    print(f"\nat n = {last['n']}: tiled peak memory = {last['memory_ratio']:.4f} x plain "
          f"(goal <= 1/20 = 0.05), time = {last['time_ratio']:.2f} x plain (goal <= 1.5)")
    return rows


if __name__ == "__main__":
    main()
