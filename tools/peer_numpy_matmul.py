#!/usr/bin/env python3
"""numpy's f32 square matmul, the peer of vqclip's `matmul NxNxN` bench item: min and
median of 20 timed runs after one untimed run, and GFLOP/s at the median.

Usage: python tools/peer_numpy_matmul.py [--size 1024]
"""
import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    n, runs = args.size, args.runs
    a = np.random.rand(n, n).astype(np.float32)
    b = np.random.rand(n, n).astype(np.float32)
    a @ b
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        a @ b
        ts.append(time.perf_counter() - t)
    med = statistics.median(ts)
    print(
        f"numpy {n}² matmul: min {min(ts) * 1e3:.2f} ms, median {med * 1e3:.2f} ms, "
        f"{2 * n**3 / med / 1e9:.1f} GFLOP/s (median)"
    )


if __name__ == "__main__":
    main()
