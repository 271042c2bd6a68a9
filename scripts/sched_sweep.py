"""Schedule experiment (GPU machine): how the split-KV schedule's fixed cost per piece changes the
attention time.

csrc/schedule.h charges each (sequence, worker) piece fixed_cost_blocks(rows) extra blocks of work. This
script rebuilds that schedule in Python for other fixed costs, passes the metadata to
flash_mla_with_kvcache (the kernels accept any schedule of the right shape), checks the outputs
against the fp32 reference and times the attention (CUDA-graph replay, median). The library's own
metadata must equal the Python schedule at the library's fixed cost (checked first).

python scripts/sched_sweep.py [--kernel auto|portable] [--costs 0,1,2,3,5] --out out/sched
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common as C


def library_fixed_cost(rows: int) -> int:
    """csrc/schedule.h fixed_cost_blocks."""
    return 3 if rows <= 64 else 5


BLOCK_N = 64  # csrc/schedule.h kSchedBlockN
ROWS = [(16, 1, 4096, True), (16, 1, 4096, False), (64, 1, 4096, True), (128, 1, 4096, True), (128, 1, 4096, False),
        (16, 1, 8192, True), (32, 2, 8192, True), (128, 2, 4096, True)]  # fmt: skip


def schedule(lens, parts, fixed):
    """csrc/schedule.h build_schedule with the fixed cost as a parameter."""
    blocks = [(n + BLOCK_N - 1) // BLOCK_N if n > 0 else 0 for n in lens]
    total = sum(b + fixed for b in blocks)
    payload = -(-total // parts) + fixed
    md = [[0] * 8 for _ in range(parts)]
    splits = [0] * (len(lens) + 1)
    cur, cur_block, cur_split, cum = 0, 0, 0, 0
    for part in range(parts):
        m = md[part]
        m[0], m[1], m[4] = cur, cur_block * BLOCK_N, cur_split
        budget = payload
        while cur < len(lens):
            rem = blocks[cur] - cur_block
            if part == parts - 1 or budget >= rem + fixed:
                cum += cur_split + 1
                splits[cur + 1] = cum
                budget -= rem + fixed
                cur, cur_block, cur_split = cur + 1, 0, 0
            else:
                take = budget - fixed
                if take > 0:
                    cur_block += take
                    cur_split += 1
                break
        if cur_block > 0:
            m[2], m[3] = cur, cur_block * BLOCK_N
        else:
            m[2] = cur - 1
            m[3] = max(lens[cur - 1], 0) if cur > 0 else 0
    return md, splits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--costs", default="0,1,2,3,5")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="out/sched")
    args = ap.parse_args()
    os.environ["FLASHMLA_KERNEL"] = args.kernel
    import flashmla_ops

    costs = [int(c) for c in args.costs.split(",")]
    results = []
    for h_q, s_q, s_k, varlen in ROWS:
        seqlens = C.make_seqlens(128, s_k, s_q, varlen)
        inp = C.build_inputs(128, s_q, h_q, seqlens)
        lib_md, lib_splits = flashmla_ops.get_mla_metadata(inp.cache_seqlens, s_q * h_q, 1)
        parts = lib_md.shape[0]
        md, splits = schedule(seqlens, parts, library_fixed_cost(s_q * h_q))
        assert lib_md.cpu().tolist() == md and lib_splits.cpu().tolist() == splits, (
            "Python schedule != library's"
        )
        for fixed in costs:
            md, splits = schedule(seqlens, parts, fixed)
            md_t = torch.tensor(md, dtype=torch.int32, device="cuda")
            splits_t = torch.tensor(splits, dtype=torch.int32, device="cuda")

            def step(md_t=md_t, splits_t=splits_t):
                return flashmla_ops.flash_mla_with_kvcache(
                    inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, inp.head_dim_v, md_t, splits_t,
                    causal=inp.causal,
                )  # fmt: skip

            us, _, (out, lse), _graph = C.time_cuda_graph(step, args.iters)
            check = C.spot_check(inp, out, lse)
            pieces = splits[-1]
            rec = dict(h_q=h_q, s_q=s_q, s_k=s_k, varlen=varlen, kernel=args.kernel, fixed_cost=fixed, us=us,
                       gbs=C.bytes_moved(128, s_q, h_q, seqlens) / us / 1e3, pieces=pieces, ok=check["ok"],
                       err=check["out_err"])  # fmt: skip
            results.append(rec)
            print(rec, flush=True)
        del inp
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sched_{args.kernel}.json").write_text(json.dumps(results, indent=1))
    print(f"\n| kernel | h_q | s_q | s_k | varlen | fixed cost | pieces | us | GB/s | ok |")
    for r in results:
        print(f"| {r['kernel']} | {r['h_q']} | {r['s_q']} | {r['s_k']} | {r['varlen']} | {r['fixed_cost']} | "
              f"{r['pieces']} | {r['us']:.1f} | {r['gbs']:.0f} | {r['ok']} |")  # fmt: skip


if __name__ == "__main__":
    main()
