#!/usr/bin/env python3
"""CPU decode benchmark: flashmla_ops' CPU kernel vs eager PyTorch (gather + SDPA), DeepSeek shapes.

Shapes: d=576, dv=512, h_kv=1, page 64, s_q=1, b=8, s_k=2048 (fixed lengths), h_q 16 and 128, in
bfloat16 and float32. Inputs from benchmarks/common.py (random values, random page permutation, NaN
past each sequence's end).

Timed per case (median of --iters calls after --warmup, time.perf_counter; an implementation whose
first call takes long gets fewer, at least 3, so that it spends about 15 s):
* ours: the decode step, get_mla_metadata + flash_mla_with_kvcache (the CPU kernel gathers pages itself).
* eager: what a PyTorch user would write without the op, in the same dtype: gather the live pages by the
  block table into a contiguous (b, L, d) tensor, then torch.nn.functional.scaled_dot_product_attention.
  Two variants: `eager` folds the query heads into the query-length axis (all h_q heads share the one
  KV head: (b, 1, s_q*h_q, d) x (b, 1, L, d)), the stronger baseline and the one speedups are quoted
  against; `eager_gqa` keeps the heads and passes enable_gqa=True, the textbook call (much slower on
  CPU: it reads K once per query head). --baselines picks which run.
GB/s = sum(seqlens) * h_kv * d * elem_size / time (the KV bytes a step must read).
Before timing, each implementation's output is checked: ours against the float64 reference
(flashmla_ops.reference) on a few batch entries, and each eager variant against ours (loose tolerance).

Usage: python benchmarks/bench_cpu.py [--h-q 16 128] [--dtypes bf16 fp32] [--batch 8] [--s-k 2048]
                                      [--iters 10] [--threads N] [--baselines eager eager_gqa] [--out DIR]
Prints a markdown table (with the machine named) and writes DIR/cpu_results.json with --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common as C  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def eager_decode(inp: C.Inputs, fold_heads: bool = True):
    """Gather + SDPA in the inputs' dtype; returns out (b, s_q, h_q, dv).

    Lengths are host ints (an eager caller knows them). Only the live pages are gathered; when lengths
    differ or causal masking applies, a boolean mask is built and dead (possibly NaN) slots are zeroed so
    they cannot poison the softmax-weighted sum.
    """
    q, k_cache, block_table = inp.q, inp.k_cache, inp.block_table
    b, s_q, h_q, d = q.shape
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    dv = inp.head_dim_v
    lengths = inp.seqlens
    max_len = max(lengths)
    nblk = math.ceil(max_len / page)
    kv = k_cache[block_table[:, :nblk].long()]  # (b, nblk, page, h_kv, d): the gather
    kv = kv.reshape(b, nblk * page, h_kv, d)[:, :max_len].transpose(1, 2)  # (b, h_kv, L, d)
    uniform = all(n == max_len for n in lengths)
    mask = None
    if not uniform or (inp.causal and s_q > 1):
        t = torch.arange(max_len)
        lens = torch.tensor(lengths)[:, None, None]  # (b, 1, 1)
        visible = t[None, None, :] < lens  # (b, 1, L)
        if inp.causal and s_q > 1:
            visible = visible & (
                t[None, None, :] <= lens - s_q + torch.arange(s_q)[None, :, None]
            )  # (b, s_q, L)
        if not uniform:
            live = t[None, :] < torch.tensor(lengths)[:, None]  # (b, L)
            kv = torch.where(live[:, None, :, None], kv, torch.zeros((), dtype=kv.dtype))
        mask = visible
    k, v = kv, kv[..., :dv]
    if fold_heads:
        assert h_kv == 1, "fold_heads assumes one KV head"
        qf = q.reshape(b, 1, s_q * h_q, d)  # rows (j, h) in order
        m = None
        if mask is not None:  # (b, s_q|1, L) -> one row per (j, h): (b, 1, s_q*h_q, L)
            m = (
                mask.expand(b, s_q, max_len)[:, :, None, :]
                .expand(b, s_q, h_q, max_len)
                .reshape(b, 1, -1, max_len)
            )
        o = F.scaled_dot_product_attention(qf, k, v, attn_mask=m)  # (b, 1, s_q*h_q, dv)
        return o.reshape(b, s_q, h_q, dv)
    qh = q.transpose(1, 2)  # (b, h_q, s_q, d)
    m = None if mask is None else mask[:, None]  # (b, 1, s_q|1, L)
    o = F.scaled_dot_product_attention(qh, k, v, attn_mask=m, enable_gqa=True)  # (b, h_q, s_q, dv)
    return o.transpose(1, 2)


def machine() -> Dict:
    return {
        "cpu": C.cpu_name(),
        "platform_processor": platform.processor(),
        "machine": platform.machine(),
        "os_cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_case(
    b: int,
    s_k: int,
    h_q: int,
    s_q: int,
    dtype_name: str,
    varlen: bool,
    baselines: List[str],
    iters: int,
    warmup: int,
    budget_s: float = 15.0,
) -> Dict:
    """One case: check, then time ours and each baseline (fewer iterations, at least 3, for a slow one)."""
    dtype = DTYPES[dtype_name]
    seqlens = C.make_seqlens(b, s_k, s_q, varlen)
    inp = C.build_inputs(b, s_q, h_q, seqlens, page=64, dtype=dtype, device="cpu", causal=True, seed=0)
    elem = torch.empty((), dtype=dtype).element_size()
    kv_bytes = sum(seqlens) * C.NUM_HEADS_K * C.HEAD_DIM * elem
    n_flops = C.flops(b, s_q, h_q, seqlens)
    rec = {
        "b": b,
        "s_k": s_k,
        "h_q": h_q,
        "s_q": s_q,
        "dtype": dtype_name,
        "varlen": varlen,
        "sum_seqlens": sum(seqlens),
        "kv_bytes": kv_bytes,
        "flops": n_flops,
        "ok": True,
    }

    step = C.decode_step(inp)
    out, lse = step()
    check = C.spot_check(inp, out, lse, compute_dtype=torch.float64)
    rec["check"] = check
    if not check["ok"]:
        rec["ok"] = False
        return rec
    loose = 3e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-3
    impls = {"ours": step}
    for name in baselines:
        fn = (lambda fold: lambda: eager_decode(inp, fold))(name == "eager")
        err = rel_err(fn(), out)
        rec[f"{name}_err_vs_ours"] = err
        if not err <= loose:
            rec["ok"] = False
            rec["error"] = f"{name} disagrees with ours: {err:.3g} > {loose}"
            return rec
        impls[name] = fn
    for name, fn in impls.items():
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        # slow baselines (eager_gqa at h_q=128 takes seconds a call): keep each case to ~budget_s
        n = max(3, min(iters, int(budget_s / max(first, 1e-9))))
        us, times, _ = C.time_cpu(fn, n, warmup if n == iters else 0)
        rec[f"{name}_iters"] = n
        rec[f"{name}_us"] = us
        rec[f"{name}_gbs"] = kv_bytes / (us * 1e-6) / 1e9
        rec[f"{name}_gflops"] = n_flops / (us * 1e-6) / 1e9
    for name in baselines:
        rec[f"speedup_vs_{name}"] = rec[f"{name}_us"] / rec["ours_us"]
    return rec


def markdown(meta: Dict, records: List[Dict], baselines: List[str]) -> str:
    m = meta["machine"]
    lines = [
        f"### CPU decode: {m['cpu']} ({m['os_cpu_count']} CPUs, {m['affinity']} usable, "
        f"torch threads {m['torch_threads']}), torch {m['torch']}",
        "",
        f"d=576, dv=512, h_kv=1, page 64, causal; median of {meta['iters']} (time.perf_counter; at least 3 "
        "for a slow baseline). "
        "ours = get_mla_metadata + flash_mla_with_kvcache; eager = gather pages + SDPA with the query heads "
        "folded onto the one KV head; eager_gqa = gather + SDPA(enable_gqa=True). "
        "GB/s = KV bytes read (Σlen·d·elem) / time.",
        "",
    ]
    head = "| dtype | b | s_k | h_q | s_q | ours ms | ours GB/s | ours GFLOP/s |"
    sep = "|---|---:|---:|---:|---:|---:|---:|---:|"
    for name in baselines:
        head += f" {name} ms | speedup vs {name} |"
        sep += "---:|---:|"
    lines += [head + " check |", sep + "---|"]
    for r in records:
        row = f"| {r['dtype']} | {r['b']} | {r['s_k']}{' (varlen)' if r['varlen'] else ''} | {r['h_q']} | {r['s_q']} |"
        if not r["ok"]:
            lines.append(
                row + " FAILED |" + " |" * (2 + 2 * len(baselines)) + f" {r.get('error') or r['check']} |"
            )
            continue
        row += f" {r['ours_us'] / 1e3:.2f} | {r['ours_gbs']:.1f} | {r['ours_gflops']:.0f} |"
        for name in baselines:
            row += f" {r[f'{name}_us'] / 1e3:.2f} | {r[f'speedup_vs_{name}']:.2f}x |"
        lines.append(row + f" ok ({r['check']['out_err']:.1e}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--s-k", type=int, default=2048)
    p.add_argument("--h-q", type=int, nargs="+", default=[16, 128])
    p.add_argument("--s-q", type=int, default=1)
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp32"])
    p.add_argument("--varlen", action="store_true", help="varlen lengths (FlashMLA's rule) instead of fixed")
    p.add_argument("--baselines", nargs="*", choices=["eager", "eager_gqa"], default=["eager", "eager_gqa"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--out", default=None, help="directory for cpu_results.json and cpu_results.md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import flashmla_ops

    meta = {
        "machine": machine(),
        "build_info": flashmla_ops.build_info(),
        "iters": args.iters,
        "warmup": args.warmup,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": sys.argv[1:],
    }
    print(f"machine: {meta['machine']}", flush=True)
    records = []
    for dtype_name in args.dtypes:
        for h_q in args.h_q:
            rec = run_case(
                args.batch,
                args.s_k,
                h_q,
                args.s_q,
                dtype_name,
                args.varlen,
                args.baselines,
                args.iters,
                args.warmup,
            )
            records.append(rec)
            if rec["ok"]:
                extra = "".join(
                    f", {n} {rec[f'{n}_us'] / 1e3:.2f} ms ({rec[f'speedup_vs_{n}']:.1f}x)"
                    for n in args.baselines
                )
                print(
                    f"{dtype_name} h_q={h_q}: ours {rec['ours_us'] / 1e3:.2f} ms {rec['ours_gbs']:.1f} GB/s{extra}",
                    flush=True,
                )
            else:
                print(f"{dtype_name} h_q={h_q}: FAILED {rec.get('error') or rec['check']}", flush=True)
    md = markdown(meta, records, args.baselines)
    print()
    print(md)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "cpu_results.json", "w") as f:
            json.dump({"meta": meta, "rows": records}, f, indent=1)
        (out / "cpu_results.md").write_text(md)
        print(f"wrote {out / 'cpu_results.json'}, {out / 'cpu_results.md'}")
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
