"""fp32 against bf16 on this CPU: the matrix products of one BERT layer's FFN, one thread, side by side.

    python benchmarks/bench_cpu_precision.py            # prints ms per product, GFLOP/s and the ratio

Why it exists: the shipped DeepSpeed JSONs ask for fp16, which a CPU cannot train in; ds-kd falls back to bf16
only where the CPU computes it natively (``ds_kd.train.engine.cpu_bf16_native``), because emulated bf16 is tens of
times slower than fp32. This measures that ratio on the machine at hand.
"""
from __future__ import annotations

import argparse
import time

import torch


def time_matmul(dtype: torch.dtype, rows: int, width: int, ffn: int, repeats: int) -> float:
    """Seconds per [rows, width] x [width, ffn] product in ``dtype`` (median of ``repeats``, after 2 warm-ups)."""
    x, w = torch.randn(rows, width).to(dtype), torch.randn(width, ffn).to(dtype)
    for _ in range(2):
        x @ w
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1024, help="tokens per product (default: %(default)s)")
    p.add_argument("--width", type=int, default=384, help="hidden width (default: %(default)s, e5-small's)")
    p.add_argument("--ffn", type=int, default=1536, help="FFN width (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed products per dtype (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from ds_kd.train.engine import cpu_bf16_native

    flops = 2 * a.rows * a.width * a.ffn
    seconds = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        seconds[name] = time_matmul(dtype, a.rows, a.width, a.ffn, a.repeats)
        print(f"{name}: {seconds[name] * 1e3:.2f} ms per product, {flops / seconds[name] / 1e9:.1f} GFLOP/s")
    print(f"bf16 / fp32 time: {seconds['bf16'] / seconds['fp32']:.1f}x; native bf16 detected: {cpu_bf16_native()} "
          f"(torch CPU capability {torch.backends.cpu.get_cpu_capability()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
