"""Matmul throughput by dtype on this device: why train.py computes in bf16 on AMX CPUs and on CUDA.

    python bench/bench_matmul.py            # CPU
    python bench/bench_matmul.py --device cuda
"""

import argparse
import statistics
import time

import torch
from common import sync  # puts clo on sys.path

from clo.runtime import bf16_is_fast


def gflops(m: int, k: int, n: int, dtype: torch.dtype, device: str, repeats: int = 20) -> float:
    """GFLOP/s of an [m, k] @ [k, n] matmul in `dtype`: the median of `repeats` timed runs after 3 warm-up runs."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype)
    times = []
    for i in range(repeats + 3):
        sync(a.device)
        t0 = time.perf_counter()
        a @ b.T
        sync(a.device)
        if i >= 3:  # warm-up: kernel selection / JIT
            times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="3200,576,1536", help="M,K,N: tokens x hidden x output (default: a SmolLM2 MLP matmul)")
    args = p.parse_args()
    m, k, n = map(int, args.shape.split(","))
    print(f"device {args.device}, threads {torch.get_num_threads()}, bf16_is_fast {bf16_is_fast(args.device)}, shape {m}x{k} @ {k}x{n}")
    rates = {dt: gflops(m, k, n, dt, args.device) for dt in (torch.float32, torch.bfloat16)}
    for dt, rate in rates.items():
        print(f"{str(dt):16s} {rate:8.0f} GFLOP/s")
    print(f"bf16 / fp32: {rates[torch.bfloat16] / rates[torch.float32]:.1f}x")


if __name__ == "__main__":
    main()
