"""Schedule experiment (GPU machine): how the split-KV schedule's two knobs change the attention time.

csrc/schedule.h charges each (sequence, worker) piece fixed_cost_blocks(rows) extra blocks of work. The second
knob is an experiment's (the library has none, i.e. 0): a cut tolerance lets a worker finish a sequence that
overruns its budget by at most that many blocks rather than cut it. This script rebuilds the schedule in Python
for (fixed cost, tolerance) pairs, passes the metadata to flash_mla_with_kvcache (the kernels accept any
schedule of the right shape), checks the outputs against the fp32 reference and times the attention (CUDA-graph
replay, median), the variants of a row interleaved over several rounds. The library's own metadata must equal
the Python schedule at the library's knobs (checked first; tests/test_bench_tools.py checks it on the CPU).

python scripts/sched_sweep.py [--kernel auto|portable] [--variants 5:0,3:0,3:3] [--rows compute|memory|all]
                              [--rounds 3] --out out/sched
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


def library_knobs(rows: int):
    """The library's (fixed cost, tolerance): csrc/schedule.h fixed_cost_blocks, and no tolerance."""
    return (3, 0) if rows <= 64 else (5, 0)


BLOCK_N = 64  # csrc/schedule.h kSchedBlockN
# (h_q, s_q, s_k, varlen): FlashMLA's compute-bound grid rows, and its varlen memory-bound ones plus one fixed.
COMPUTE_ROWS = [
    (h, s, s_k, v) for s_k in (4096, 8192) for h, s in ((64, 2), (128, 1), (128, 2)) for v in (False, True)
]
MEMORY_ROWS = [(16, 1, 4096, True), (16, 1, 4096, False), (64, 1, 4096, True), (32, 2, 4096, True),
               (16, 1, 8192, True), (32, 2, 8192, True), (64, 1, 8192, True)]  # fmt: skip


def schedule(lens, parts, fixed, tolerance=0):
    """csrc/schedule.h build_schedule with the fixed cost as a parameter, plus the experiment's tolerance."""
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
            if part == parts - 1 or budget + tolerance >= rem + fixed:
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


def parse_variants(text):
    return [tuple(int(x) for x in v.split(":")) for v in text.split(",")]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--variants", default="5:0,3:0,3:1,3:3,2:2", help="fixed_cost:tolerance pairs")
    ap.add_argument("--rows", default="all", choices=["compute", "memory", "all"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="out/sched")
    args = ap.parse_args()
    os.environ["FLASHMLA_KERNEL"] = args.kernel
    import flashmla_ops

    variants = parse_variants(args.variants)
    rows = {"compute": COMPUTE_ROWS, "memory": MEMORY_ROWS, "all": COMPUTE_ROWS + MEMORY_ROWS}[args.rows]
    results = []
    for h_q, s_q, s_k, varlen in rows:
        seqlens = C.make_seqlens(128, s_k, s_q, varlen)
        inp = C.build_inputs(128, s_q, h_q, seqlens)
        lib_md, lib_splits = flashmla_ops.get_mla_metadata(inp.cache_seqlens, s_q * h_q, 1)
        parts = lib_md.shape[0]
        md, splits = schedule(seqlens, parts, *library_knobs(s_q * h_q))
        assert lib_md.cpu().tolist() == md and lib_splits.cpu().tolist() == splits, (
            "Python schedule != library's"
        )
        steps = {}
        for fixed, tol in variants:
            md, splits = schedule(seqlens, parts, fixed, tol)
            md_t = torch.tensor(md, dtype=torch.int32, device="cuda")
            splits_t = torch.tensor(splits, dtype=torch.int32, device="cuda")

            def step(md_t=md_t, splits_t=splits_t):
                return flashmla_ops.flash_mla_with_kvcache(
                    inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, inp.head_dim_v, md_t, splits_t,
                    causal=inp.causal,
                )  # fmt: skip

            cut = sum(1 for i in range(len(seqlens)) if splits[i + 1] - splits[i] > 1)
            steps[(fixed, tol)] = (step, splits[-1], cut)
        times = {v: [] for v in variants}
        checks = {}
        for _ in range(args.rounds):
            for v in variants:
                us, _, (out, lse), _graph = C.time_cuda_graph(steps[v][0], args.iters)
                times[v].append(us)
                checks[v] = C.spot_check(inp, out, lse)
                del out, lse, _graph
        base = statistics.median(times[variants[0]])
        for fixed, tol in variants:
            us = statistics.median(times[(fixed, tol)])
            check = checks[(fixed, tol)]
            rec = dict(h_q=h_q, s_q=s_q, s_k=s_k, varlen=varlen, kernel=args.kernel, fixed_cost=fixed, tolerance=tol,
                       us=us, rounds_us=times[(fixed, tol)], speedup=base / us,
                       gbs=C.bytes_moved(128, s_q, h_q, seqlens) / us / 1e3,
                       pieces=steps[(fixed, tol)][1], cut=steps[(fixed, tol)][2], ok=check["ok"],
                       err=check["out_err"])  # fmt: skip
            results.append(rec)
            print(rec, flush=True)
        del inp, steps
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sched_{args.kernel}.json").write_text(json.dumps(results, indent=1))
    first = "%d:%d" % variants[0]
    print(f"\n| kernel | h_q | s_q | s_k | varlen | fixed:tol | pieces | cut | us | vs {first} | GB/s | ok |")
    print("|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(f"| {r['kernel']} | {r['h_q']} | {r['s_q']} | {r['s_k']} | {r['varlen']} | "
              f"{r['fixed_cost']}:{r['tolerance']} | {r['pieces']} | {r['cut']} | {r['us']:.1f} | "
              f"{r['speedup']:.3f}x | {r['gbs']:.0f} | {r['ok']} |")  # fmt: skip


if __name__ == "__main__":
    main()
