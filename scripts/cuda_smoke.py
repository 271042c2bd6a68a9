"""Quick CUDA check: a few shapes against the float64 reference, then DeepSeek-shaped timings.

python scripts/cuda_smoke.py          correctness on odd + DeepSeek shapes, then a few timed rows
python scripts/cuda_smoke.py --small  small shapes only (for compute-sanitizer)
"""

import os
import sys

import torch

import flashmla_ops
from flashmla_ops.reference import mla_decode_reference


def make_inputs(b, s_q, h_q, h_k, d, page, max_len, dtype, fixed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    if fixed:
        lens = torch.full((b,), max_len, dtype=torch.int32)
    else:
        lens = torch.randint(0, max_len + 1, (b,), generator=g, dtype=torch.int32)
        lens[0] = 0
    max_blocks = (max_len + page - 1) // page
    num_blocks = b * max_blocks + 1
    table = torch.randperm(num_blocks, generator=g)[: b * max_blocks].view(b, max_blocks).int()
    k = torch.randn(num_blocks, page, h_k, d, generator=g).to(dtype)
    for i in range(b):  # poison every slot past the live tokens, and junk table entries
        live_blocks = (int(lens[i]) + page - 1) // page
        if live_blocks < max_blocks:
            table[i, live_blocks:] = 2147480000
        if live_blocks and int(lens[i]) % page:
            k[table[i, live_blocks - 1], int(lens[i]) % page :] = float("nan")
    used = set(table[table < num_blocks].tolist())
    for blk in range(num_blocks):
        if blk not in used:
            k[blk] = float("nan")
    q = torch.randn(b, s_q, h_q, d, generator=g).to(dtype)
    return q, k, table, lens


def check(b, s_q, h_q, h_k, d, dv, page, max_len, causal, dtype=torch.bfloat16):
    ok = True
    for kernel in ("portable", "auto"):
        os.environ["FLASHMLA_KERNEL"] = kernel
        ok &= check_one(b, s_q, h_q, h_k, d, dv, page, max_len, causal, dtype)
    os.environ["FLASHMLA_KERNEL"] = "auto"
    return ok


def check_one(b, s_q, h_q, h_k, d, dv, page, max_len, causal, dtype):
    q, k, table, lens = make_inputs(b, s_q, h_q, h_k, d, page, max_len, dtype)
    dev = "cuda"
    md, ns = flashmla_ops.get_mla_metadata(lens.to(dev), s_q * h_q // h_k, h_k)
    out, lse = flashmla_ops.flash_mla_with_kvcache(
        q.to(dev), k.to(dev), table.to(dev), lens.to(dev), dv, md, ns, causal=causal
    )
    ref, ref_lse = mla_decode_reference(q, k, table, lens, dv, causal=causal)
    low, _ = mla_decode_reference(q, k, table, lens, dv, causal=causal, compute_dtype=None)
    err = ((out.cpu().double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    base = ((low.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    lse_c = lse.cpu()
    same_inf = torch.equal(torch.isinf(lse_c), torch.isinf(ref_lse))
    lse_err = (lse_c - ref_lse).nan_to_num(0, 0, 0).abs().max().item()
    ok = torch.isfinite(out).all().item() and same_inf and err <= 2 * base + 1e-4 and lse_err < 1e-2
    print(
        f"{'OK ' if ok else 'BAD'} [{os.environ['FLASHMLA_KERNEL']:8s}] b={b} s_q={s_q} h_q={h_q} h_k={h_k} d={d} dv={dv} page={page} len<={max_len} "
        f"causal={causal} {dtype}: err {err:.2e} (same-precision torch {base:.2e}) lse err {lse_err:.1e} "
        f"parts={md.shape[0]}"
    )
    return ok


def bench(b, s_q, h_q, s_k, varlen=False, dtype=torch.bfloat16, d=576, dv=512, page=64):
    import random

    dev = "cuda"
    if varlen:
        random.seed(0)
        lens = [max(int(random.normalvariate(s_k, s_k / 2)), s_q) for _ in range(b)]
    else:
        lens = [s_k] * b
    lens_t = torch.tensor(lens, dtype=torch.int32, device=dev)
    max_blocks = (max(lens) + page - 1) // page
    table = torch.randperm(b * max_blocks, device=dev).view(b, max_blocks).int()
    k = torch.randn(b * max_blocks, page, 1, d, device=dev, dtype=dtype)
    q = torch.randn(b, s_q, h_q, d, device=dev, dtype=dtype)

    def step():
        md, ns = flashmla_ops.get_mla_metadata(lens_t, s_q * h_q, 1)
        return flashmla_ops.flash_mla_with_kvcache(q, k, table, lens_t, dv, md, ns, causal=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(30):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3)
    us = sorted(times)[len(times) // 2]
    total = sum(lens)
    flops = 2 * s_q * total * h_q * (d + dv)
    nbytes = 2 * (total * d + b * s_q * h_q * (d + dv))
    print(
        f"[{os.environ.get('FLASHMLA_KERNEL', 'auto'):8s}] b={b} s_q={s_q} h_q={h_q} s_k={s_k} varlen={varlen}: {us:8.1f} us  {flops / us / 1e6:6.0f} TFLOP/s  "
        f"{nbytes / us / 1e3:6.0f} GB/s"
    )


def main():
    small = "--small" in sys.argv
    print(flashmla_ops.build_info())
    ok = True
    ok &= check(3, 1, 8, 1, 64, 32, 16, 70, False)
    ok &= check(4, 2, 6, 2, 40, 24, 1, 33, True, torch.float16)
    ok &= check(3, 5, 4, 2, 72, 72, 16, 90, True)
    ok &= check(2, 1, 16, 1, 576, 512, 64, 200, False)
    ok &= check(2, 1, 128, 1, 576, 512, 64, 300, True)  # two row tiles: the Hopper kernel's seesaw schedule
    ok &= check(2, 1, 16, 1, 576, 512, 16, 200, False)  # the Hopper kernel's cp.async gather (page % 64 != 0)
    ok &= check(2, 2, 64, 1, 576, 512, 100, 300, True)  # gather, tiles crossing page ends
    if not small:
        ok &= check(4, 1, 16, 1, 576, 512, 64, 3000, False)
        ok &= check(4, 2, 64, 1, 576, 512, 64, 2000, True)
        ok &= check(3, 1, 128, 1, 576, 512, 64, 1500, False, torch.float16)
        ok &= check(2, 3, 128, 1, 576, 512, 64, 700, True)
        ok &= check(3, 1, 20, 4, 1000, 700, 32, 300, True)
        ok &= check(2, 1, 4, 1, 40, 1, 7, 50, False)
        ok &= check(4, 2, 128, 1, 512, 512, 64, 1000, True)
        ok &= check(3, 1, 16, 1, 576, 512, 16, 500, False, torch.float16)
        for kernel in ("portable", "auto"):
            os.environ["FLASHMLA_KERNEL"] = kernel
            for h_q, s_q in ((16, 1), (32, 1), (64, 1), (32, 2), (64, 2), (128, 1), (128, 2)):
                bench(128, s_q, h_q, 4096)
            bench(128, 1, 64, 8192, varlen=True)
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
