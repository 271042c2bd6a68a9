#!/usr/bin/env python3
"""GPU benchmark of get_mla_metadata alone: the schedule kernel a decode step runs once (shared by
every layer) before the attention.

Rows: batch {1, 32, 128, 512, 4096, 16384} x query rows per KV head {16, 128} (132 / 66 workers on an H100 or
H200) x lengths {fixed 4096, varlen by FlashMLA's rule (benchmarks/common.py)}. Each row times
get_mla_metadata two ways: CUDA-graph replay (median of --iters per-replay CUDA-event times: what a
captured decode step pays, launch included) and the kernel alone (torch.profiler, mean over 20 eager
calls). The metadata's values are the tests' concern (tests/test_cuda.py checks them against the CPU
schedule).

  python benchmarks/bench_metadata.py --out out/metadata    # writes results.json and results.md

To time another build of the package with this script, put that build first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C


def main() -> None:
    import flashmla_ops

    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--out", default="out/metadata")
    args = ap.parse_args()

    rows = []
    for batch in (1, 32, 128, 512, 4096, 16384):
        for rows_per_head_k in (16, 128):
            for varlen in (False, True):
                lens = torch.tensor(C.make_seqlens(batch, 4096, 1, varlen), dtype=torch.int32, device="cuda")

                def fn(lens=lens, rows_per_head_k=rows_per_head_k):
                    return flashmla_ops.get_mla_metadata(lens, rows_per_head_k, 1)

                graph_us, _, (md, _), graph = C.time_cuda_graph(fn, args.iters)
                del graph
                row = dict(batch=batch, rows=rows_per_head_k, varlen=varlen, workers=md.shape[0],
                           graph_us=graph_us, kernel_us=C.profiled_kernel_us(fn, "schedule"))  # fmt: skip
                rows.append(row)
                print(row, flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1)
    )
    lines = [
        f"get_mla_metadata on {torch.cuda.get_device_name()} (fixed lengths 4096 or FlashMLA's varlen rule)",
        "",
        "| batch | rows per KV head | lengths | workers | graph replay us | kernel us |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lengths = "varlen" if r["varlen"] else "fixed"
        lines.append(f"| {r['batch']} | {r['rows']} | {lengths} | {r['workers']} | {r['graph_us']:.1f} | "
                     f"{r['kernel_us']:.1f} |")  # fmt: skip
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
