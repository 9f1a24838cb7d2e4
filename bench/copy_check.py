"""The server's copy of a pushed gradient out of shared memory with its NaN/Inf check: variants against
today's, one process, one run.

    python bench/copy_check.py [--mbytes 40] [--rounds 15] [--runs 3]

The source is a mapped memfd (the client's region, as the server maps it), the destination a reused
aligned buffer (core/gradient_buffers.py). Variants, each a whole pass over `--mbytes` MB of float32:

- memcpy: the copy alone, no check (the floor).
- today: core/receiving.py's `GradientAssembler.copy`: blocks of CHECK_BLOCK_BYTES (1 MiB), each
  copied, then `np.isfinite(block).all()` while it is in cache.
- block-256k: the same with 256 KiB blocks.
- sum-check: blocks of 1 MiB, each checked by its sum (finite exactly when every value is, unless
  finite values overflow; then the exact check decides), with no boolean temporary.
- isfinite-out: today's, the boolean result written into one reused buffer (no temporary).
- two-threads: today's loop over the two halves in two threads (numpy releases the GIL).

Variants alternate (the order rotating), medians per run, ratios against today in the same run.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, ratio_range, table

from optserve.wire.assembler import aligned_empty

BLOCK = 1 << 20


def blocks(src: np.ndarray, dst: np.ndarray, block: int, check: Callable[[np.ndarray], bool]) -> None:
    for a in range(0, len(src), block):
        b = dst[a : a + block]
        b[:] = src[a : a + block]
        if not check(b.view(np.float32)):
            raise ValueError("not finite")


def isfinite_all(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all())


def sum_finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(np.add.reduce(x))) or isfinite_all(x)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mbytes", type=int, default=40, help="gradient size in MB (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=15, help="timed passes per variant and run (default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs, each a median (default: %(default)s)")
    args = p.parse_args(argv)
    n = args.mbytes * 1_000_000 // 4 * 4
    fd = os.memfd_create("copy-check")
    os.ftruncate(fd, n)
    region = mmap.mmap(fd, n)
    os.close(fd)
    src = np.frombuffer(region, np.uint8)
    src.view(np.float32)[:] = np.random.default_rng(0).normal(size=n // 4).astype(np.float32)
    dst = aligned_empty(n)
    dst[:] = 0
    pool = ThreadPoolExecutor(2)
    half = n // 2 // BLOCK * BLOCK

    def two_threads() -> None:
        parts = [(src[:half], dst[:half]), (src[half:], dst[half:])]
        for f in [pool.submit(blocks, s, d, BLOCK, isfinite_all) for s, d in parts]:
            f.result()

    flags = np.empty(BLOCK // 4, bool)

    def isfinite_into(x: np.ndarray) -> bool:
        out = flags[: len(x)]
        np.isfinite(x, out=out)
        return bool(out.all())

    variants: dict[str, Callable[[], None]] = {
        "today": lambda: blocks(src, dst, BLOCK, isfinite_all),
        "memcpy": lambda: np.copyto(dst, src),
        "block-256k": lambda: blocks(src, dst, 256 << 10, isfinite_all),
        "sum-check": lambda: blocks(src, dst, BLOCK, sum_finite),
        "isfinite-out": lambda: blocks(src, dst, BLOCK, isfinite_into),
        "two-threads": two_threads,
    }
    names = list(variants)
    for f in variants.values():
        f()
    medians: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(args.runs):
        times: dict[str, list[float]] = {k: [] for k in names}
        for r in range(args.rounds):
            for i in range(len(names)):
                name = names[(r + i) % len(names)]
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
        for k in names:
            medians[k].append(statistics.median(times[k]))
    rows = []
    for name, runs in medians.items():
        rows.append(
            {
                "variant": name,
                "ms (runs)": ", ".join(f"{t * 1e3:.2f}" for t in runs),
                "GB/s (last run)": f"{n / runs[-1] / 1e9:.1f}",
                "vs today": ratio_range(runs, medians["today"]),
            }
        )
    print(f"# copy + NaN/Inf check of {n / 1e6:.0f} MB float32 out of a mapped memfd; {machine()}")
    print(f"# median of {args.rounds} alternating passes per run, {args.runs} runs")
    print(table(rows, ["variant", "ms (runs)", "GB/s (last run)", "vs today"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
