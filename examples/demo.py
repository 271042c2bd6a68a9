#!/usr/bin/env python3
"""One DeepSeek-shaped MLA decode step with flashmla_ops, checked and timed (`make demo`).

Picks the best device present (CUDA when a GPU is visible and the library was built with its CUDA
kernels, else CPU), builds a paged bf16 KV cache (d=576 = 512 latent + 64 rope, dv=512, one KV head,
page 64, random page order, varied lengths) and a query (s_q=1), runs

    metadata, num_splits = flashmla_ops.get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    out, lse = flashmla_ops.flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                                    metadata, num_splits, causal=True)

checks it against the float64 reference (flashmla_ops.reference.mla_decode_reference), prints the
device, the median time and the KV read bandwidth, and exits non-zero on a mismatch.
Options: --device cpu|cuda, --batch, --s-k, --h-q, --iters.
"""

import argparse
import math
import statistics
import sys
import time

import torch

import flashmla_ops
from flashmla_ops.reference import mla_decode_reference

D, DV, H_KV, PAGE = 576, 512, 1, 64
# bf16 output vs the float64 reference: |out - ref| <= ATOL + RTOL * |ref| elementwise, and the
# log-sum-exp (accumulated in fp32 by every kernel) within LSE_ATOL; bf16 keeps 8 significant bits
# (2^-8 = 0.4% relative)
RTOL, ATOL, LSE_ATOL = 2e-2, 2e-3, 1e-3


def pick_device(requested):
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available() and flashmla_ops.build_info()["cuda"]:
        return torch.device("cuda")
    return torch.device("cpu")


def make_inputs(batch, s_k, h_q, s_q, device, dtype=torch.bfloat16, seed=0):
    """Random q and paged cache; lengths spread over [s_k/2, 3*s_k/2]; slots past each length are NaN."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(s_k // 2, 3 * s_k // 2 + 1, (batch,), generator=gen)
    max_blocks = math.ceil(int(lengths.max()) / PAGE)
    num_blocks = batch * max_blocks
    q = torch.randn(batch, s_q, h_q, D, generator=gen).to(dtype)
    k_cache = torch.randn(num_blocks, PAGE, H_KV, D, generator=gen).to(dtype)
    block_table = torch.randperm(num_blocks, generator=gen).to(torch.int32).view(batch, max_blocks)
    for i, n in enumerate(lengths.tolist()):  # the unused tail must never be read
        for j in range(n // PAGE, max_blocks):
            k_cache[block_table[i, j], max(0, n - j * PAGE) :] = float("nan")
    to = dict(device=device)
    return q.to(**to), k_cache.to(**to), block_table.to(**to), lengths.to(torch.int32).to(**to)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--s-k", type=int, default=None)
    p.add_argument("--h-q", type=int, default=None)
    p.add_argument("--s-q", type=int, default=1)
    p.add_argument("--iters", type=int, default=None)
    args = p.parse_args()

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 4)
    s_k = args.s_k or (4096 if cuda else 1024)
    h_q = args.h_q or (128 if cuda else 16)
    s_q = args.s_q
    iters = args.iters or (50 if cuda else 10)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"flashmla_ops on {name}; build {flashmla_ops.build_info()}")

    q, k_cache, block_table, cache_seqlens = make_inputs(batch, s_k, h_q, s_q, device)

    def step():
        metadata, num_splits = flashmla_ops.get_mla_metadata(cache_seqlens, s_q * h_q // H_KV, H_KV)
        return flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, DV, metadata, num_splits, causal=True
        )

    out, lse = step()

    # Check against the float64 reference (every sequence on CPU; 8 of them on CUDA, for speed).
    idx = torch.arange(batch) if not cuda else torch.linspace(0, batch - 1, min(batch, 8)).long()
    idx = idx.to(device)
    ref_out, ref_lse = mla_decode_reference(
        q[idx], k_cache, block_table[idx], cache_seqlens[idx], DV, causal=True, compute_dtype=torch.float64
    )
    got = out[idx].double()
    bad = ~((got - ref_out).abs() <= ATOL + RTOL * ref_out.abs())
    out_err = (got - ref_out).abs().max().item()
    lse_err = (lse[idx].double() - ref_lse.double()).abs().max().item()
    finite = bool(torch.isfinite(out).all()) and bool(torch.isfinite(lse).all())
    ok = finite and not bool(bad.any()) and lse_err <= LSE_ATOL
    print(
        f"check vs float64 reference on {len(idx)}/{batch} sequences: max |out - ref| {out_err:.2e} "
        f"(tolerance {ATOL:g} + {RTOL:g}*|ref|), max |lse - ref| {lse_err:.2e} (tolerance {LSE_ATOL:g}), "
        f"all finite: {finite} -> {'OK' if ok else 'MISMATCH'}"
    )

    # Time the decode step: median of `iters` calls after warm-up.
    for _ in range(3):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) * 1e-3 for start, end in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    total = int(cache_seqlens.sum())
    kv_bytes = total * H_KV * D * k_cache.element_size()
    print(
        f"decode step b={batch} s_q={s_q} h_q={h_q} d={D} dv={DV} page={PAGE} bf16, {total} cached tokens "
        f"(mean {total / batch:.0f}): median {median * 1e3:.3f} ms over {iters} calls, "
        f"KV read {kv_bytes / median / 1e9:.1f} GB/s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
