#!/usr/bin/env python3
"""Measures the two ceilings the benchmarks are judged against, on the GPU this runs on.

- copy: a device-to-device copy of 2 GiB, bytes read + written over the median event time;
- matmul: a bf16 8192^3 product of random N(0, 1) operands (never zeros), 2*n^3 over the median time.
Median of 20 timed runs after 5 warm-ups. Prints one JSON line (device name, GB/s, TFLOP/s).
"""

import json

import torch


def median_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    n_bytes = 2 << 30
    src = torch.randint(0, 255, (n_bytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    n = 8192
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    mm_ms = median_ms(lambda: torch.mm(a, b))
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(),
                "copy_GBps": round(2 * n_bytes / copy_ms / 1e6, 1),
                "matmul_bf16_TFLOPs": round(2 * n**3 / mm_ms / 1e9, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
