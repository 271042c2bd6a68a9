"""CUDA kernels: against the float64 reference and the CPU kernel, long DeepSeek sequences, other
worker counts, CUDA graphs (by hand and via torch.compile(mode="reduce-overhead")), export,
determinism, streams, opcheck. Skipped without a GPU or without the CUDA build.

The CPU suite's tests (test_correctness, test_opcheck, test_shapes, test_bad_inputs,
test_compile_export) are parametrized over devices and run on CUDA as well; this file adds what
only makes sense on the GPU.
"""

import dataclasses

import pytest
import torch

import flashmla_ops
import flashmla_ops.fake
from helpers import (
    LOW_PRECISION,
    assert_bitwise_equal,
    check_against_reference,
    check_pair_against_reference,
    check_schedule_invariants,
    dtype_name,
    make_decode_inputs,
    max_abs,
    num_threads,
    requires_cuda,
    seed_for,
)

pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = "cuda"  # the device under test; the CPU kernel serves as a second reference

DTYPES = pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_name)


def run_on_cpu(inp):
    """The CPU kernel on a copy of the inputs (its own metadata); results moved back to the GPU."""
    cpu = inp.to("cpu")
    out, lse = cpu.run()
    return out.to(inp.q.device), lse.to(inp.q.device)


def check_cuda_vs_cpu_and_reference(inp):
    out, lse = inp.run()
    torch.cuda.synchronize()
    # Both against the reference, and kernel against kernel with the same FlashAttention-style bound
    # (the CPU kernel as reference).
    check_pair_against_reference(inp, (out, lse), run_on_cpu(inp))
    return out, lse


# ----------------------------------------------------------------------------------------------
# Correctness: the CPU suite's shapes and long DeepSeek sequences
# ----------------------------------------------------------------------------------------------


@DTYPES
@pytest.mark.parametrize("num_heads_k,num_heads_q", [(1, 3), (2, 6), (1, 64), (1, 128)])
@pytest.mark.parametrize("page_block_size", [1, 16, 64])
@pytest.mark.parametrize("seq_len_q", [1, 2, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_small_shapes_vs_cpu(dtype, num_heads_k, num_heads_q, page_block_size, seq_len_q, causal):
    inp = make_decode_inputs(
        batch=5,
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        num_heads_k=num_heads_k,
        head_dim=40,
        head_dim_v=32,
        page_block_size=page_block_size,
        dtype=dtype,
        device=DEVICE,
        max_seqlen=300,
        causal=causal,
        seed=seed_for("cuda-small", dtype, num_heads_k, num_heads_q, page_block_size, seq_len_q, causal),
    )
    check_cuda_vs_cpu_and_reference(inp)


# (batch, max_seqlen, num_heads_q, seq_len_q, causal)
DEEPSEEK_LONG = [
    (4, 4096, 16, 1, False),
    (3, 4096, 32, 2, True),
    (4, 8192, 64, 1, False),
    (2, 8192, 64, 2, True),
    (2, 16384, 128, 1, False),
    (2, 16384, 128, 2, True),
    (3, 16384, 16, 2, True),
    (1, 16384, 64, 1, False),  # one sequence cut into many pieces: the combine path
]


@DTYPES
@pytest.mark.parametrize(
    "shape", DEEPSEEK_LONG, ids=lambda s: "b{}-sk{}-hq{}-sq{}-{}".format(*s[:4], "causal" if s[4] else "full")
)
def test_deepseek_long_vs_cpu(dtype, shape):
    batch, max_seqlen, num_heads_q, seq_len_q, causal = shape
    inp = make_decode_inputs(
        batch=batch,
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        dtype=dtype,
        device=DEVICE,
        max_seqlen=max_seqlen,
        causal=causal,
        include_zero_length=batch > 2,
        seed=seed_for("cuda-long", dtype, shape),
    )
    check_cuda_vs_cpu_and_reference(inp)


@DTYPES
def test_deepseek_fixed_lengths(dtype):
    """All sequences of the same length (FlashMLA's 'fixed' benchmark rows)."""
    inp = make_decode_inputs(
        batch=4,
        seq_len_q=2,
        num_heads_q=64,
        dtype=dtype,
        device=DEVICE,
        max_seqlen=4096,
        lengths=[4096] * 4,
        causal=True,
        seed=seed_for("cuda-fixed", dtype),
    )
    check_cuda_vs_cpu_and_reference(inp)


@DTYPES
def test_many_sequences(dtype):
    """More sequences than SMs, many of them empty or tiny."""
    lengths = [(i * 97) % 700 if i % 5 else 0 for i in range(300)]
    inp = make_decode_inputs(
        batch=300,
        seq_len_q=1,
        num_heads_q=16,
        dtype=dtype,
        device=DEVICE,
        lengths=lengths,
        max_seqlen=700,
        seed=seed_for("cuda-many", dtype),
    )
    out, lse = inp.run()
    check_against_reference(inp, out, lse)


@DTYPES
@pytest.mark.parametrize("num_heads_q", [128, 16])
def test_combine_grid_by_worker_and_by_sequence(dtype, num_heads_q):
    """More sequences than workers, most of them cut: the combine kernel's grid then runs over the workers
    (csrc/cuda/combine.cu combine_by_worker), each merging the sequence whose split 1 it holds. The same
    inputs with metadata of 300 workers (more than the batch: the grid over the sequences) and of 7 agree
    with the float64 reference; stale metadata (built for other lengths) stays in bounds."""
    batch = 150
    gen = torch.Generator().manual_seed(seed_for("combine-grid", dtype, num_heads_q))
    lengths = torch.randint(1, 1500, (batch,), generator=gen)
    lengths[torch.rand(batch, generator=gen) < 0.1] = 0
    inp = make_decode_inputs(
        batch=batch,
        seq_len_q=1,
        num_heads_q=num_heads_q,
        dtype=dtype,
        device=DEVICE,
        lengths=lengths.tolist(),
        max_seqlen=1500,
        seed=seed_for("combine-grid-inputs", dtype, num_heads_q),
    )
    ref = inp.reference()
    ref_low = inp.reference(compute_dtype=None)
    md, splits = inp.metadata()
    assert md.shape[0] < batch  # the grid over the workers
    assert (splits[1:] - splits[:-1] > 1).sum().item() >= md.shape[0] // 2  # most workers cut a sequence
    out, lse = inp.run((md, splits))
    check_against_reference(inp, out, lse, ref=ref, ref_low=ref_low)
    for parts in (300, 7):
        with num_threads(parts):
            md_p, splits_p = flashmla_ops.get_mla_metadata(
                inp.cache_seqlens.cpu(), inp.num_heads_per_head_k, inp.num_heads_k
            )
        out_p, lse_p = inp.run((md_p.to(DEVICE), splits_p.to(DEVICE)))
        check_against_reference(inp, out_p, lse_p, ref=ref, ref_low=ref_low)
    stale = flashmla_ops.get_mla_metadata(
        torch.full((batch,), 1400, dtype=torch.int32, device=DEVICE),
        inp.num_heads_per_head_k,
        inp.num_heads_k,
    )
    inp.run(stale)
    torch.cuda.synchronize()
    out2, lse2 = inp.run((md, splits))
    assert torch.equal(out2, out) and torch.equal(lse2, lse)


# ----------------------------------------------------------------------------------------------
# Metadata: CUDA's own, and other worker counts
# ----------------------------------------------------------------------------------------------


def assert_metadata_equals_cpu(lens, md, splits, num_heads_per_head_k, num_heads_k):
    """md, splits (the GPU's metadata for lens) are the CPU schedule's values for the same worker count."""
    with num_threads(md.shape[0]):
        md_cpu, splits_cpu = flashmla_ops.get_mla_metadata(lens.cpu(), num_heads_per_head_k, num_heads_k)
    assert torch.equal(md.cpu(), md_cpu)
    assert torch.equal(splits.cpu(), splits_cpu)


@pytest.mark.parametrize("num_heads_per_head_k,num_heads_k", [(16, 1), (64, 1), (128, 1), (256, 1), (6, 2)])
def test_cuda_metadata_matches_schedule(num_heads_per_head_k, num_heads_k):
    """CUDA metadata: shape from flashmla_ops.fake.num_sm_parts, the layout of csrc/schedule.h (every
    token covered once), and the same values as the CPU's schedule for the same worker count (both
    run build_schedule from csrc/schedule.h)."""
    lengths = [0, 1, 63, 64, 65, 4096, 16384, 3, 8191, 0]
    lens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    md, splits = flashmla_ops.get_mla_metadata(lens, num_heads_per_head_k, num_heads_k)
    parts = flashmla_ops.fake.num_sm_parts(lens.device, num_heads_per_head_k, num_heads_k)
    assert md.shape == (parts, 8) and splits.shape == (len(lengths) + 1,)
    assert md.device == lens.device and md.dtype == torch.int32
    check_schedule_invariants(md.cpu(), splits.cpu(), lengths)
    assert_metadata_equals_cpu(lens, md, splits, num_heads_per_head_k, num_heads_k)


@pytest.mark.parametrize("lengths_kind", ["random", "equal"])
@pytest.mark.parametrize("batch", [1, 2, 7, 128, 300, 4096, 4097, 20000, 40000])
@pytest.mark.parametrize(
    "num_heads_per_head_k,num_heads_k", [(16, 1), (128, 1), (256, 1), (64, 3), (64, 200)]
)
def test_cuda_metadata_equals_cpu_schedule(lengths_kind, batch, num_heads_per_head_k, num_heads_k):
    """The CUDA metadata kernel must give build_schedule's values exactly (csrc/schedule.h), here the
    CPU's for the same worker count: random lengths (empty, short, up to 72000 tokens) and equal ones
    (the grid's fixed rows), 1 to 132 workers, 1 to 40000 sequences: the walk kernel (mla_cuda.cu
    schedule_walk_kernel; its register window slides 625 times at 20000) wherever its lengths and cost line
    fit in shared memory (walk_fits: up to about 28,000 sequences on an H100 or H200), the sequential one
    at 40000. It holds any rewrite of the kernel to build_schedule's values."""
    gen = torch.Generator().manual_seed(seed_for("cuda-metadata", lengths_kind, batch, num_heads_per_head_k))
    if lengths_kind == "equal":
        lens = torch.full((batch,), 64 * int(torch.randint(1, 128, (1,), generator=gen)), dtype=torch.int32)
    else:
        lens = torch.randint(0, 9000, (batch,), generator=gen, dtype=torch.int32)
        lens[torch.rand(batch, generator=gen) < 0.2] = 0
        lens[torch.rand(batch, generator=gen) < 0.2] %= 70
        lens[torch.rand(batch, generator=gen) < 0.02] *= 8
    md, splits = flashmla_ops.get_mla_metadata(lens.to(DEVICE), num_heads_per_head_k, num_heads_k)
    assert_metadata_equals_cpu(lens, md, splits, num_heads_per_head_k, num_heads_k)


@DTYPES
@pytest.mark.parametrize("shape", ["deepseek", "small", "small_odd_dv"])
def test_other_num_sm_parts(dtype, shape):
    """The CUDA kernel accepts metadata of any worker count (an exported program may run on a GPU
    with another SM count). Metadata of 1..300 workers, built by the CPU schedule and moved to the
    GPU, gives the same result up to rounding as the GPU's own."""
    if shape == "deepseek":
        inp = make_decode_inputs(
            batch=4,
            seq_len_q=2,
            num_heads_q=64,
            dtype=dtype,
            device=DEVICE,
            max_seqlen=5000,
            causal=True,
            seed=seed_for("cuda-parts", dtype, shape),
        )
    else:
        inp = make_decode_inputs(
            batch=6,
            seq_len_q=5,
            num_heads_q=6,
            num_heads_k=2,
            head_dim=40,
            head_dim_v=33 if shape == "small_odd_dv" else 32,  # 33: the combine's scalar path
            page_block_size=16,
            dtype=dtype,
            device=DEVICE,
            max_seqlen=700,
            causal=True,
            seed=seed_for("cuda-parts", dtype, shape),
        )
    ref = inp.reference()
    ref_low = inp.reference(compute_dtype=None)
    out0, lse0 = inp.run()
    check_against_reference(inp, out0, lse0, ref=ref, ref_low=ref_low)
    seen = inp.visible_counts().to(DEVICE) > 0
    for parts in (1, 2, 7, 33, 132, 300):
        with num_threads(parts):
            md, splits = flashmla_ops.get_mla_metadata(
                inp.cache_seqlens.cpu(), inp.num_heads_per_head_k, inp.num_heads_k
            )
        out, lse = inp.run((md.to(DEVICE), splits.to(DEVICE)))
        check_against_reference(inp, out, lse, ref=ref, ref_low=ref_low)
        # lse is fp32 throughout: other cuts of the sequences change it only by fp32 rounding.
        assert max_abs(lse[seen], lse0[seen]) <= 1e-5 * (lse0[seen].abs().max().item() + 1)
        assert torch.equal(lse[~seen], lse0[~seen])


# ----------------------------------------------------------------------------------------------
# CUDA graphs
# ----------------------------------------------------------------------------------------------


def growing_sequences(dtype, steps, batch=4, num_heads_q=64, seq_len_q=1, causal=False, seed=0):
    """Inputs for `steps` decode steps: the cache holds every token of the final lengths; each step's
    new token is written into its slot just before that step (earlier it is NaN), like a real decode."""
    g = torch.Generator().manual_seed(seed)
    final_lens = torch.randint(steps, 1000, (batch,), generator=g, dtype=torch.int32)
    final = make_decode_inputs(
        batch=batch,
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        dtype=dtype,
        device=DEVICE,
        lengths=final_lens.tolist(),
        max_seqlen=1000,
        causal=causal,
        seed=seed,
    )
    full_cache = final.k_cache.clone()
    cache = final.k_cache  # tokens at positions >= the step's length are NaN until written
    page = final.page_block_size
    start = final_lens - steps
    for i in range(batch):
        for t in range(int(start[i]), int(final_lens[i])):
            cache[final.block_table[i, t // page], t % page] = float("nan")

    def step_inputs(k, q_seed):
        lens = start + k + 1  # step k appends token start + k
        for i in range(batch):
            t = int(lens[i]) - 1
            block = final.block_table[i, t // page]
            cache[block, t % page] = full_cache[block, t % page]
        g = torch.Generator().manual_seed(q_seed)
        q = torch.randn(final.q.shape, generator=g).to(device=DEVICE, dtype=dtype)
        return dataclasses.replace(final, q=q, cache_seqlens=lens.to(device=DEVICE, dtype=torch.int32))

    return final, step_inputs


@DTYPES
@pytest.mark.parametrize("seq_len_q,causal", [(1, False), (2, True)])
def test_cuda_graph_capture_by_hand(dtype, seq_len_q, causal):
    """Metadata + attention captured in one CUDA graph (so neither op synchronises with the host),
    replayed with new lengths and q copied into the captured tensors: correct at every step."""
    steps = 5
    final, step_inputs = growing_sequences(
        dtype, steps, seq_len_q=seq_len_q, causal=causal, seed=seed_for("graph", dtype, seq_len_q)
    )
    first = step_inputs(0, 100)
    static_q = first.q.clone()
    static_lens = first.cache_seqlens.clone()

    def step():
        md, splits = flashmla_ops.get_mla_metadata(static_lens, final.num_heads_per_head_k, final.num_heads_k)
        return flashmla_ops.flash_mla_with_kvcache(
            static_q,
            final.k_cache,
            final.block_table,
            static_lens,
            final.head_dim_v,
            md,
            splits,
            causal=causal,
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_lse = step()
    for k in range(steps):
        inp = step_inputs(k, 100 + k)
        static_q.copy_(inp.q)
        static_lens.copy_(inp.cache_seqlens)
        graph.replay()
        torch.cuda.synchronize()
        check_against_reference(inp, static_out, static_lse)


@DTYPES
@pytest.mark.parametrize("seq_len_q,causal", [(1, False), (2, True)])
def test_compile_reduce_overhead(dtype, seq_len_q, causal, fresh_dynamo):
    """torch.compile(mode="reduce-overhead"): the cache marked static, metadata recomputed inside the
    graph, lengths changing between replays; correct at every step, no cudagraph skip, one compile."""
    steps = 6
    final, step_inputs = growing_sequences(
        dtype, steps, seq_len_q=seq_len_q, causal=causal, seed=seed_for("reduce-overhead", dtype, seq_len_q)
    )
    torch._dynamo.mark_static_address(final.k_cache)
    h_k, rows = final.num_heads_k, final.num_heads_per_head_k

    def decode_step(q, k_cache, block_table, cache_seqlens):
        md, splits = flashmla_ops.get_mla_metadata(cache_seqlens, rows, h_k)
        return flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, 512, md, splits, causal=causal
        )

    compiled = torch.compile(decode_step, fullgraph=True, mode="reduce-overhead")
    for k in range(steps):  # step 0 warms up, step 1 records the graph, the others replay it
        inp = step_inputs(k, 200 + k)
        out, lse = compiled(inp.q, final.k_cache, final.block_table, inp.cache_seqlens)
        out, lse = out.clone(), lse.clone()  # the next replay overwrites the graph's outputs
        check_against_reference(inp, out, lse)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1, "recompiled"
    assert counters["inductor"]["cudagraph_skips"] == 0, "cudagraphs were skipped"


@DTYPES
def test_compile_reduce_overhead_eager_equal(dtype, fresh_dynamo):
    """Graph replay gives bitwise the eager result (the same kernels, the same metadata)."""
    inp = make_decode_inputs(
        batch=4,
        seq_len_q=2,
        num_heads_q=128,
        dtype=dtype,
        device=DEVICE,
        max_seqlen=3000,
        causal=True,
        seed=seed_for("ro-eager", dtype),
    )
    torch._dynamo.mark_static_address(inp.k_cache)

    def decode_step(q, k_cache, block_table, cache_seqlens):
        md, splits = flashmla_ops.get_mla_metadata(cache_seqlens, 256, 1)
        return flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, 512, md, splits, causal=True
        )

    compiled = torch.compile(decode_step, fullgraph=True, mode="reduce-overhead")
    want = decode_step(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens)
    for _ in range(4):  # warm-up, record, replays
        got = compiled(inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens)
        assert_bitwise_equal(got[0], want[0])
        assert_bitwise_equal(got[1], want[1])


# ----------------------------------------------------------------------------------------------
# Export, determinism, streams, opcheck
# ----------------------------------------------------------------------------------------------


class DeepSeekDecode(torch.nn.Module):
    def __init__(self, hidden=256, num_heads_q=16, dtype=torch.bfloat16):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.num_heads_q = num_heads_q
        self.w_q = torch.nn.Parameter(
            (torch.randn(hidden, num_heads_q * 576, generator=g) * hidden**-0.5).to(dtype),
            requires_grad=False,
        )

    def forward(self, x, k_cache, block_table, cache_seqlens):
        q = (x @ self.w_q).unflatten(-1, (self.num_heads_q, 576))
        md, splits = flashmla_ops.get_mla_metadata(cache_seqlens, q.shape[1] * self.num_heads_q, 1)
        return flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, 512, md, splits, causal=True
        )


@DTYPES
def test_export_deepseek_dynamic_batch(dtype):
    model = DeepSeekDecode(dtype=dtype).to(DEVICE)

    def inputs(batch, seed):
        inp = make_decode_inputs(
            batch=batch,
            seq_len_q=2,
            num_heads_q=16,
            dtype=dtype,
            device=DEVICE,
            max_seqlen=2000,
            causal=True,
            spare_blocks=40,
            seed=seed,
        )
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 2, 256, generator=g).to(device=DEVICE, dtype=dtype)
        return (x, inp.k_cache, inp.block_table, inp.cache_seqlens)

    args = inputs(3, seed_for("export-cuda", dtype))
    batch = torch.export.Dim("batch", min=2, max=1024)
    ep = torch.export.export(
        model,
        args,
        dynamic_shapes={
            "x": {0: batch},
            "k_cache": {0: torch.export.Dim("num_blocks", min=2)},
            "block_table": {0: batch},
            "cache_seqlens": {0: batch},
        },
    )
    runner = ep.module()
    for b in (3, 5, 16):
        args_b = inputs(b, seed_for("export-cuda", dtype, b))
        got, want = runner(*args_b), model(*args_b)
        assert_bitwise_equal(got[0], want[0])
        assert_bitwise_equal(got[1], want[1])


@DTYPES
@pytest.mark.parametrize(
    "shape",
    [(4, 16384, 128, 2, True), (2, 8192, 16, 1, False), (1, 16384, 64, 1, False)],
    ids=lambda s: "b{}-sk{}-hq{}-sq{}".format(*s[:4]),
)
def test_deterministic_long(dtype, shape):
    batch, max_seqlen, num_heads_q, seq_len_q, causal = shape
    inp = make_decode_inputs(
        batch=batch,
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        dtype=dtype,
        device=DEVICE,
        max_seqlen=max_seqlen,
        causal=causal,
        seed=seed_for("cuda-det", dtype, shape),
    )
    md = inp.metadata()
    assert int(md[1][-1].item()) > batch, "expected some sequences to be split (the combine path)"
    first = inp.run(md)
    for _ in range(5):
        out, lse = inp.run(md)
        assert_bitwise_equal(out, first[0])
        assert_bitwise_equal(lse, first[1])
    # Metadata recomputed each time: the same too.
    out, lse = inp.run()
    assert_bitwise_equal(out, first[0])


@DTYPES
def test_runs_on_current_stream(dtype):
    """Both ops launch on the current stream: on a side stream whose q and lengths are written after a
    long sleep, the results are right (a launch on another stream would read them too early)."""
    inp = make_decode_inputs(
        batch=4,
        seq_len_q=2,
        num_heads_q=64,
        dtype=dtype,
        device=DEVICE,
        max_seqlen=3000,
        causal=True,
        seed=seed_for("stream", dtype),
    )
    ref = inp.reference()
    q = torch.zeros_like(inp.q)
    lens = torch.zeros_like(inp.cache_seqlens)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s at H100 clocks
        q.copy_(inp.q)
        lens.copy_(inp.cache_seqlens)
        md, splits = flashmla_ops.get_mla_metadata(lens, inp.num_heads_per_head_k, inp.num_heads_k)
        out, lse = flashmla_ops.flash_mla_with_kvcache(
            q, inp.k_cache, inp.block_table, lens, 512, md, splits, causal=True
        )
    side.synchronize()
    check_against_reference(inp, out, lse, ref=ref)


@DTYPES
def test_opcheck_deepseek_long(dtype):
    inp = make_decode_inputs(
        batch=2,
        seq_len_q=2,
        num_heads_q=128,
        dtype=dtype,
        device=DEVICE,
        max_seqlen=8192,
        causal=True,
        seed=seed_for("opcheck-long", dtype),
    )
    torch.library.opcheck(torch.ops.flashmla.fwd_kvcache_mla.default, inp.op_args())
    torch.library.opcheck(torch.ops.flashmla.get_mla_metadata.default, (inp.cache_seqlens, 256, 1))
