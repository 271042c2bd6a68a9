"""Shared pieces of the benchmarks: inputs, the FLOP/byte formulas, anchors, correctness checks, timers.

Everything here follows DESIGN.md §6 so that our numbers line up row by row with the FlashMLA and
Triton anchors measured on the same machine kind (benchmarks/anchors/*.csv):

* Inputs (``build_inputs``): q and the paged cache are random (standard normal, never zeros) in the
  benchmark dtype; the block table is a random permutation of the cache's blocks; cache slots past a
  sequence's length are NaN (they must never be read: a kernel that does posts NaN and fails the
  check). Lengths are given by ``make_seqlens`` (the FlashMLA test's rule, see there).
* Formulas (``flops``, ``bytes_moved``): those of FlashMLA's test, quoted in DESIGN §6.
* Timers: ``time_cuda_graph`` (the default: the whole decode step, get_mla_metadata +
  flash_mla_with_kvcache, captured once in a CUDA graph and replayed) and ``time_cuda_events`` (the
  fallback when capture fails: plain calls), both the median of per-call CUDA-event times after a
  warm-up; ``time_cpu`` (time.perf_counter, median) for the CPU benchmark.
"""

from __future__ import annotations

import csv
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# DeepSeek MLA shapes (DESIGN §1)
HEAD_DIM = 576  # d: 512 latent + 64 rope
HEAD_DIM_V = 512  # dv
NUM_HEADS_K = 1  # h_kv

# Measured ceilings per card: device copy (GB/s, read + write) and bf16 matmul 8192^3 (TFLOP/s).
# H100 80GB HBM3: DESIGN §6 / GPU.md (2026-11); H200: scripts/ceilings.py on the device machine
# (benchmarks/results/h200_2026-12-01_ceilings.json).
CEILINGS = {"H200": (4224.9, 791.1), "H100": (3004.0, 792.0)}


def ceilings_for(device_name: str) -> Dict[str, object]:
    """The ceilings of the card named `device_name` (matched by CEILINGS key), else the H100's, saying so."""
    for card, (gbs, tflops) in CEILINGS.items():
        if card in device_name:
            return {"card": card, "gbs": gbs, "tflops": tflops}
    gbs, tflops = CEILINGS["H100"]
    return {"card": "H100 (no figures for this card)", "gbs": gbs, "tflops": tflops}


# DESIGN §6 targets
TARGET_MEMBOUND_GBS = 2700.0  # rows with h_q * s_q <= 64
TARGET_COMPUTEBOUND_TFLOPS = 560.0  # rows with h_q * s_q >= 128

FLASHMLA_ANCHOR = "flashmla_h100_2026-11-25.csv"
TRITON_ANCHOR = "triton_mla_h100_2026-11-25.csv"


# --------------------------------------------------------------------------------------------------
# Lengths and inputs
# --------------------------------------------------------------------------------------------------


def make_seqlens(
    b: int, s_k: int, s_q: int, varlen: bool, seed: int = 0, clip_max: Optional[int] = None
) -> List[int]:
    """The cache lengths of one benchmark case, as plain ints.

    Fixed: every sequence has ``s_k`` tokens.

    Varlen (FlashMLA's tests/test_flash_mla.py rule, reseeded per case as in the anchor CSV headers)::

        random.seed(seed)                                   # seed=0, once per case
        for i in range(b):
            x = max(random.normalvariate(s_k, s_k / 2), s_q)
            if clip_max is not None: x = min(x, clip_max)   # off by default
            seqlens[i] = int(x)                              # truncation, as FlashMLA's int32 tensor store

    i.e. lengths ~ max(N(s_k, s_k/2), s_q). There is deliberately no upper clip by default: the anchor
    figures (flashmla_us with their tflops/gbs columns) are reproduced only without one (checked by
    ``check_anchor_consistency``; an upper clip at 2*s_k moves sum(seqlens) by ~0.2% and every varlen
    GB/s figure off the anchor). Pass ``clip_max=2*s_k`` to clip to [s_q, 2*s_k] instead. Uses its
    own ``random.Random`` so it does not disturb the global generator.
    """
    if not varlen:
        return [s_k] * b
    rng = random.Random(seed)
    lengths = []
    for _ in range(b):
        x = max(rng.normalvariate(s_k, s_k / 2), s_q)
        if clip_max is not None:
            x = min(x, clip_max)
        lengths.append(int(x))
    return lengths


@dataclass
class Inputs:
    q: torch.Tensor  # (b, s_q, h_q, d)
    k_cache: torch.Tensor  # (num_blocks, page, h_kv, d)
    block_table: torch.Tensor  # (b, max_blocks) int32
    cache_seqlens: torch.Tensor  # (b,) int32
    seqlens: List[int]  # the same lengths on the host
    head_dim_v: int
    causal: bool

    @property
    def batch(self) -> int:
        return self.q.shape[0]


def build_inputs(
    b: int,
    s_q: int,
    h_q: int,
    seqlens: Sequence[int],
    page: int = 64,
    d: int = HEAD_DIM,
    dv: int = HEAD_DIM_V,
    h_kv: int = NUM_HEADS_K,
    dtype: torch.dtype = torch.bfloat16,
    device="cuda",
    causal: bool = True,
    seed: int = 0,
    nan_tail: bool = True,
) -> Inputs:
    """Random inputs for one decode step.

    q ~ N(0, 1) of shape (b, s_q, h_q, d); the cache holds b * ceil(max(seqlens) / page) blocks of
    N(0, 1) values; block_table is a random permutation of all block ids, viewed (b, max_blocks), so
    sequences' pages are scattered over the cache. With ``nan_tail`` every slot of a sequence past its
    length (the tail of its last live block and its unused blocks) is NaN. Seeded (torch generator
    on ``device``): the same arguments give the same tensors.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    max_len = max(max(seqlens), 1)
    max_blocks = math.ceil(max_len / page)
    num_blocks = b * max_blocks
    q = torch.randn(b, s_q, h_q, d, generator=gen, device=device, dtype=torch.float32).to(dtype)
    k_cache = torch.randn(num_blocks, page, h_kv, d, generator=gen, device=device, dtype=torch.float32).to(
        dtype
    )
    perm = torch.randperm(num_blocks, generator=gen, device=device)
    block_table = perm.to(torch.int32).view(b, max_blocks).contiguous()
    cache_seqlens = torch.tensor(list(seqlens), dtype=torch.int32, device=device)
    if nan_tail:
        t = torch.arange(max_blocks * page, device=device)
        slots = block_table.long()[:, t // page] * page + (t % page)  # (b, max_blocks * page)
        dead = t[None, :] >= cache_seqlens.long()[:, None]
        k_cache.view(num_blocks * page, h_kv, d)[slots[dead]] = float("nan")
    return Inputs(q, k_cache, block_table, cache_seqlens, list(seqlens), dv, causal)


# --------------------------------------------------------------------------------------------------
# Formulas (DESIGN §6, FlashMLA's test)
# --------------------------------------------------------------------------------------------------


def flops(
    b: int, s_q: int, h_q: int, seqlens: Sequence[int], d: int = HEAD_DIM, dv: int = HEAD_DIM_V
) -> float:
    """FLOPs = 2 * s_q * sum(seqlens) * h_q * (d + dv). (b enters through seqlens.)"""
    del b
    return 2.0 * s_q * sum(seqlens) * h_q * (d + dv)


def bytes_moved(
    b: int,
    s_q: int,
    h_q: int,
    seqlens: Sequence[int],
    d: int = HEAD_DIM,
    dv: int = HEAD_DIM_V,
    h_kv: int = NUM_HEADS_K,
    elem_size: int = 2,
) -> float:
    """bytes = elem_size * (sum(seqlens) * h_kv * d + b * s_q * h_q * (d + dv)); elem_size 2 (bf16) in §6."""
    return float(elem_size) * (sum(seqlens) * h_kv * d + b * s_q * h_q * (d + dv))


def rates(us: float, n_flops: float, n_bytes: float) -> Tuple[float, float]:
    """(TFLOP/s, GB/s) of a step taking `us` microseconds."""
    return n_flops / (us * 1e-6) / 1e12, n_bytes / (us * 1e-6) / 1e9


def bound_kind(h_q: int, s_q: int) -> str:
    """DESIGN §6's split: 'memory' when h_q*s_q <= 64, 'compute' when >= 128 (else 'mixed')."""
    rows = h_q * s_q
    return "memory" if rows <= 64 else ("compute" if rows >= 128 else "mixed")


# --------------------------------------------------------------------------------------------------
# Anchors
# --------------------------------------------------------------------------------------------------


def anchor_dirs() -> List[Path]:
    """Where anchor CSVs are looked for, in order.

    <repo>/shared/anchors (the GPU machine copies shared/ into the repo root), <repo>/../shared/anchors
    (the dev machine), then the copy kept in the repo, <repo>/benchmarks/anchors, so the benchmark never
    depends on shared/ being present.
    """
    return [
        REPO_ROOT / "shared" / "anchors",
        REPO_ROOT.parent / "shared" / "anchors",
        REPO_ROOT / "benchmarks" / "anchors",
    ]


def find_anchor(name: str, override_dir: Optional[str] = None) -> Optional[Path]:
    dirs = [Path(override_dir)] if override_dir else anchor_dirs()
    for directory in dirs:
        path = directory / name
        if path.is_file():
            return path
    return None


def read_anchor_csv(path: Path) -> Tuple[List[str], List[Dict[str, str]]]:
    """(comment lines without '# ', rows as dicts) of an anchor CSV."""
    comments, body = [], []
    with open(path, newline="") as f:
        for line in f:
            if line.startswith("#"):
                comments.append(line[1:].strip())
            elif line.strip():
                body.append(line)
    return comments, list(csv.DictReader(body))


AnchorKey = Tuple[int, int, int, int, int]  # (b, s_q, s_k, h_q, varlen); page 64 implied


def load_anchors(override_dir: Optional[str] = None) -> Dict[str, object]:
    """FlashMLA and Triton figures keyed by (b, s_q, s_k, h_q, varlen), plus where they came from."""
    result: Dict[str, object] = {"flashmla": {}, "triton": {}, "paths": {}, "comments": {}}
    for kind, name in (("flashmla", FLASHMLA_ANCHOR), ("triton", TRITON_ANCHOR)):
        path = find_anchor(name, override_dir)
        if path is None:
            result["paths"][kind] = None
            continue
        comments, rows = read_anchor_csv(path)
        result["paths"][kind] = str(path)
        result["comments"][kind] = comments
        table = result[kind]
        for row in rows:
            key = (int(row["b"]), int(row["s_q"]), int(row["s_k"]), int(row["h_q"]), int(row["varlen"]))
            table[key] = {
                k: float(v) for k, v in row.items() if k not in ("b", "s_q", "s_k", "h_q", "varlen")
            }
    return result


def check_anchor_consistency(anchors: Dict[str, object], tol_rel: float = 1.5e-3) -> List[str]:
    """Recomputes each FlashMLA anchor row's TFLOP/s and GB/s from our lengths and formulas.

    The anchor rounds to whole units, so a row agrees when within 0.5 unit + tol_rel. Returns the
    rows that disagree (empty: our inputs are the anchor's workload).
    """
    problems = []
    for (b, s_q, s_k, h_q, varlen), fig in anchors["flashmla"].items():
        lengths = make_seqlens(b, s_k, s_q, bool(varlen))
        tf, gb = rates(fig["flashmla_us"], flops(b, s_q, h_q, lengths), bytes_moved(b, s_q, h_q, lengths))
        for name, ours, theirs in (("tflops", tf, fig.get("tflops")), ("gbs", gb, fig.get("gbs"))):
            if theirs is not None and abs(ours - theirs) > 0.5 + tol_rel * theirs:
                problems.append(
                    f"b={b} s_q={s_q} s_k={s_k} h_q={h_q} varlen={varlen}: {name} "
                    f"recomputed {ours:.1f} vs anchor {theirs:.0f}"
                )
    return problems


# --------------------------------------------------------------------------------------------------
# Correctness spot check
# --------------------------------------------------------------------------------------------------


def check_indices(seqlens: Sequence[int]) -> List[int]:
    """A couple of batch entries worth checking: the first, the longest and the shortest."""
    idx = [
        0,
        max(range(len(seqlens)), key=lambda i: seqlens[i]),
        min(range(len(seqlens)), key=lambda i: seqlens[i]),
    ]
    return sorted(set(idx))


def spot_check(
    inp: Inputs,
    out: torch.Tensor,
    lse: torch.Tensor,
    indices: Optional[Sequence[int]] = None,
    compute_dtype: torch.dtype = torch.float32,
    max_rel_err: Optional[float] = None,
    lse_atol: Optional[float] = None,
) -> Dict[str, object]:
    """Compares a kernel's (out, lse) with flashmla_ops.reference on a few batch entries.

    Errors: ``out_err`` = max|out - ref| / max|ref| over the checked entries, ``lse_err`` = max|lse - ref|,
    ``cos_diff`` = 1 - 2<x,y>/(<x,x>+<y,y>) (FlashMLA's test metric). Passing needs out_err <= max_rel_err
    (default 2e-2 for 16-bit dtypes: a few bf16 ulps of the largest entry; 1e-4 for fp32),
    lse_err <= lse_atol (1e-3 / 1e-4: lse is accumulated in fp32 either way), cos_diff <= 1e-5, and the *whole* out/lse finite (NaN cache tails
    must not leak anywhere in the batch).
    """
    from flashmla_ops.reference import mla_decode_reference

    low_precision = inp.q.dtype in (torch.bfloat16, torch.float16)
    if max_rel_err is None:
        max_rel_err = 2e-2 if low_precision else 1e-4
    if lse_atol is None:
        lse_atol = 1e-3 if low_precision else 1e-4
    finite = bool(torch.isfinite(out).all().item()) and bool(torch.isfinite(lse).all().item())
    if indices is None:
        indices = check_indices(inp.seqlens)
    idx = torch.tensor(list(indices), device=inp.q.device, dtype=torch.long)
    ref_out, ref_lse = mla_decode_reference(
        inp.q[idx],
        inp.k_cache,
        inp.block_table[idx],
        inp.cache_seqlens[idx],
        inp.head_dim_v,
        causal=inp.causal,
        compute_dtype=compute_dtype,
    )
    x, y = out[idx].double(), ref_out.double()
    out_err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
    lse_err = (lse[idx].double() - ref_lse.double()).abs().max().item()
    cos_diff = (1 - 2 * (x * y).sum() / (x * x + y * y).sum().clamp_min(1e-30)).item()
    ok = finite and out_err <= max_rel_err and lse_err <= lse_atol and cos_diff <= 1e-5
    return {
        "ok": bool(ok),
        "finite": finite,
        "out_err": out_err,
        "lse_err": lse_err,
        "cos_diff": cos_diff,
        "indices": list(indices),
        "tol": {"out_rel": max_rel_err, "lse_abs": lse_atol, "cos_diff": 1e-5},
    }


# --------------------------------------------------------------------------------------------------
# The decode step and timers
# --------------------------------------------------------------------------------------------------


def decode_step(
    inp: Inputs, kwargs: Optional[dict] = None, include_metadata: bool = True
) -> Callable[[], Tuple[torch.Tensor, torch.Tensor]]:
    """A closure running one decode step: get_mla_metadata then flash_mla_with_kvcache.

    With include_metadata=False the metadata is built once, here, and the closure runs only
    flash_mla_with_kvcache: what FlashMLA's own test times (its tests/test_flash_mla.py builds the
    metadata outside the timed call), so that is the figure compared with the FlashMLA anchor.
    """
    import flashmla_ops

    s_q, h_q = inp.q.shape[1], inp.q.shape[2]
    h_kv = inp.k_cache.shape[2]
    kwargs = dict(kwargs or {})

    def metadata():
        return flashmla_ops.get_mla_metadata(inp.cache_seqlens, s_q * h_q // h_kv, h_kv)

    fixed = None if include_metadata else metadata()

    def step():
        tile_md, num_splits = metadata() if fixed is None else fixed
        return flashmla_ops.flash_mla_with_kvcache(
            inp.q,
            inp.k_cache,
            inp.block_table,
            inp.cache_seqlens,
            inp.head_dim_v,
            tile_md,
            num_splits,
            causal=inp.causal,
            **kwargs,
        )

    return step


def _median_event_times(run_once: Callable[[], None], iters: int) -> List[float]:
    """Per-call GPU times (us) of `iters` back-to-back calls, each between its own pair of CUDA events."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        run_once()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]


def time_cuda_graph(fn: Callable[[], object], iters: int = 50, warmup: int = 10):
    """Captures fn() in a CUDA graph and times its replays.

    Warm-up: `warmup` eager calls on a side stream (lazy init, allocator), capture, then `warmup`
    replays. Timing: `iters` replays back to back, each bracketed by CUDA events; returns
    (median us, per-replay us list, the graph's outputs, the graph). The caller keeps the graph alive
    while using the outputs (they live in its memory pool).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(max(warmup, 1)):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = _median_event_times(graph.replay, iters)
    return statistics.median(times), times, outputs, graph


def time_cuda_events(fn: Callable[[], object], iters: int = 50, warmup: int = 10):
    """Plain calls timed with CUDA events (fallback when capture fails): (median us, times, outputs, None)."""
    outputs = None
    for _ in range(max(warmup, 1)):
        outputs = fn()
    torch.cuda.synchronize()
    holder = {}

    def once():
        holder["out"] = fn()

    times = _median_event_times(once, iters)
    return statistics.median(times), times, holder.get("out", outputs), None


def profiled_kernel_us(fn: Callable[[], object], name_part: str, calls: int = 20) -> float:
    """Mean GPU time (us) per call of fn() spent in the kernels whose names contain `name_part`
    (torch.profiler over `calls` eager calls after one warm-up call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if name_part in e.key) / calls


def time_cpu(fn: Callable[[], object], iters: int = 10, warmup: int = 2) -> Tuple[float, List[float], object]:
    """Median wall time (us) of fn() over `iters` calls after `warmup`, with time.perf_counter."""
    outputs = None
    for _ in range(warmup):
        outputs = fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        outputs = fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times), times, outputs


# --------------------------------------------------------------------------------------------------
# Misc
# --------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else platform.processor()."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def set_kernel_env(kernel: Optional[str]) -> None:
    """Exports FLASHMLA_KERNEL (auto | portable | sm90), which the CUDA op reads on every call."""
    if kernel:
        os.environ["FLASHMLA_KERNEL"] = kernel
