"""A/B of one FLASHMLA_* environment switch on a few benchmark rows (GPU machine).

For each row and kernel, every value of the variable is timed the way bench_decode.py times the
attention (CUDA-graph replay of flash_mla_with_kvcache, median), in ABAB... order over --rounds so
drift hits every value alike; the decode kernel's GPU time comes from torch.profiler on eager calls
(the combine kernel's is not reported: with programmatic dependent launch its span starts while the
decode runs and includes its wait). Outputs are checked against the fp32 reference for every value
in every round.

python scripts/env_ab.py --var FLASHMLA_KV_EVICT_FIRST --values 1,0 --kernels auto,portable --out out/ab

A row is "h_q,s_q,s_k,varlen[,page]" (page_block_size, default 64). The variable may be FLASHMLA_KERNEL
itself (--var FLASHMLA_KERNEL --values sm90,portable --kernels auto): it is set after the kernel's.
"""

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common as C

# (h_q, s_q, s_k, varlen[, page]): the memory-bound rows where the split pieces' partial results matter most
DEFAULT_ROWS = "16,1,4096,1;64,1,4096,0;64,1,4096,1;32,2,4096,1;64,1,8192,1;128,1,4096,1"


def parse_row(text):
    """'h_q,s_q,s_k,varlen[,page]' -> (h_q, s_q, s_k, varlen, page); page defaults to 64."""
    fields = [int(x) for x in text.split(",")]
    if len(fields) not in (4, 5):
        raise ValueError(f"a row is 'h_q,s_q,s_k,varlen[,page]', got {text!r}")
    return tuple(fields) if len(fields) == 5 else (*fields, 64)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--var", required=True)
    ap.add_argument("--values", required=True, help="comma-separated; the first is the baseline")
    ap.add_argument("--kernels", default="auto,portable")
    ap.add_argument("--rows", default=DEFAULT_ROWS, help="h_q,s_q,s_k,varlen[,page];...")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="out/ab")
    args = ap.parse_args()

    values = args.values.split(",")
    rows = [parse_row(r) for r in args.rows.split(";")]
    results = []
    for h_q, s_q, s_k, varlen, page in rows:
        seqlens = C.make_seqlens(128, s_k, s_q, bool(varlen))
        inp = C.build_inputs(128, s_q, h_q, seqlens, page=page)
        n_bytes = C.bytes_moved(128, s_q, h_q, seqlens)
        step = C.decode_step(inp, include_metadata=False)
        for kernel in args.kernels.split(","):
            os.environ["FLASHMLA_KERNEL"] = kernel
            us = {v: [] for v in values}
            decode_us, ok = {}, {v: True for v in values}
            for _ in range(args.rounds):
                for v in values:
                    os.environ[args.var] = v
                    t, _, (out, lse), graph = C.time_cuda_graph(step, args.iters)
                    us[v].append(t)
                    ok[v] = ok[v] and C.spot_check(inp, out, lse)["ok"]
                    del graph
            for v in values:
                os.environ[args.var] = v
                decode_us[v] = C.profiled_kernel_us(step, "decode")
            for v in values:
                rec = dict(kernel=kernel, h_q=h_q, s_q=s_q, s_k=s_k, varlen=bool(varlen), page=page, var=args.var, value=v,
                           us=statistics.median(us[v]), rounds=us[v], gbs=n_bytes / statistics.median(us[v]) / 1e3,
                           decode_us=decode_us[v], ok=ok[v])  # fmt: skip
                results.append(rec)
                print(rec, flush=True)
        del inp
        torch.cuda.empty_cache()
    os.environ.pop(args.var, None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ab.json").write_text(json.dumps(results, indent=1))

    def row_key(r):  # a row and kernel, whatever the variable's value
        return r["kernel"], r["h_q"], r["s_q"], r["s_k"], r["varlen"], r["page"]

    base = {row_key(r): r["us"] for r in results if r["value"] == values[0]}
    print(
        f"\n| kernel | h_q | s_q | s_k | varlen | page | {args.var} | us | vs {values[0]} | GB/s | decode us | ok |"
    )
    print("|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        b = base[row_key(r)]
        print(f"| {r['kernel']} | {r['h_q']} | {r['s_q']} | {r['s_k']} | {r['varlen']} | {r['page']} | {r['value']} | {r['us']:.1f} | "
              f"{b / r['us']:.3f}x | {r['gbs']:.0f} | {r['decode_us']:.1f} | {r['ok']} |")  # fmt: skip


if __name__ == "__main__":
    main()
