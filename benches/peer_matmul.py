#!/usr/bin/env python3
"""Peer baseline for benches/matmul.rs: NumPy float32 matmul GFLOP/s on this machine's CPU
(whatever BLAS NumPy links, with its default threads). Run by hand, not by CI:

    python3 benches/peer_matmul.py [--sizes 512 1024 2048] [--seconds 2] [--json]

GFLOP/s = 2 N^3 / median seconds per product, the same count `vqclip bench matmul` uses.
"""
import argparse
import json
import platform
import time

import numpy as np


def bench(n: int, seconds: float) -> dict:
    rng = np.random.default_rng(0)
    a = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    b = rng.uniform(-1, 1, (n, n)).astype(np.float32)
    a @ b  # warm-up (thread pool start, page faults)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < seconds and len(times) < 50):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    return {"size": n, "ms": med * 1e3, "gflops": 2 * n**3 / med / 1e9, "runs": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [bench(n, args.seconds) for n in args.sizes]
    if args.json:
        print(json.dumps({"numpy": np.__version__, "machine": platform.machine(),
                          "results": results}, indent=2))
        return
    print(f"numpy {np.__version__} float32 matmul on {platform.processor() or platform.machine()}")
    for r in results:
        print(f"  {r['size']:>5}  {r['ms']:9.2f} ms  {r['gflops']:8.2f} GFLOP/s  ({r['runs']} runs)")


if __name__ == "__main__":
    main()
