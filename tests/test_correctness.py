"""fwd_kvcache_mla against the float64 reference (flashmla_ops.reference), on every device.

Inputs come from helpers.make_decode_inputs: random lengths including 0 and non-multiples of the
page size, shuffled block ids, junk block-table entries past each sequence's end (in-range ids and
2147480000) and NaN in every cache slot that holds no live token.

Tolerances (helpers.check_against_reference): fp32 to 1e-5 relative; bf16/fp16 FlashAttention-style,
the kernel's error against float64 at most twice the error of the same reference computed in the
low precision, plus one unit of rounding.
"""

import pytest
import torch

import flashmla_ops
from helpers import (
    DEVICES,
    assert_bitwise_equal,
    check_against_reference,
    check_empty_rows,
    check_schedule_invariants,
    device_dtype_params,
    make_decode_inputs,
    max_abs,
    num_threads,
    seed_for,
)

# ----------------------------------------------------------------------------------------------
# DeepSeek shapes: head_dim 576, head_dim_v 512, one KV head, page 64. Lengths stay short (<= 300)
# so the CPU suite is quick; tests/test_cuda.py runs long ones on the GPU.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("num_heads_q", [16, 32, 64, 128])
@pytest.mark.parametrize("seq_len_q,causal", [(1, False), (2, True)])
@pytest.mark.parametrize("workers", ["default", "cpu-16"])
def test_deepseek_shapes(device, dtype, num_heads_q, seq_len_q, causal, workers):
    """workers="cpu-16": metadata of 16 workers from the CPU schedule (moved to the device), so that
    sequences are cut into pieces and merged by LSE whatever the machine's own worker count."""
    inp = make_decode_inputs(
        batch=4,
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        num_heads_k=1,
        head_dim=576,
        head_dim_v=512,
        page_block_size=64,
        dtype=dtype,
        device=device,
        max_seqlen=300,
        causal=causal,
        seed=seed_for("deepseek", device, dtype, num_heads_q, seq_len_q, causal),
    )
    metadata = None
    if workers == "cpu-16":
        with num_threads(16):
            md, splits = flashmla_ops.get_mla_metadata(inp.cache_seqlens.cpu(), inp.num_heads_per_head_k, 1)
        assert int(splits[-1]) > inp.batch, "expected sequences cut into several pieces"
        metadata = (md.to(device), splits.to(device))
    out, lse = inp.run(metadata)
    check_against_reference(inp, out, lse)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_deepseek_shapes_speculative_noncausal(device, dtype):
    """seq_len_q = 2 without the causal mask: both queries see the whole sequence."""
    inp = make_decode_inputs(
        batch=3,
        seq_len_q=2,
        num_heads_q=128,
        dtype=dtype,
        device=device,
        max_seqlen=257,
        causal=False,
        seed=seed_for("deepseek-nc", device, dtype),
    )
    out, lse = inp.run()
    check_against_reference(inp, out, lse)


# ----------------------------------------------------------------------------------------------
# Small odd shapes: head_dim 40 / head_dim_v 32, 1 or 2 KV heads, pages of 1, 16 and 64 tokens,
# seq_len_q 1, 2, 5, causal on and off.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("num_heads_k,num_heads_q", [(1, 3), (2, 6)])
@pytest.mark.parametrize("page_block_size", [1, 16, 64])
@pytest.mark.parametrize("seq_len_q", [1, 2, 5])
@pytest.mark.parametrize("causal", [False, True])
def test_small_shapes(device, dtype, num_heads_k, num_heads_q, page_block_size, seq_len_q, causal):
    inp = make_decode_inputs(
        batch=5,
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        num_heads_k=num_heads_k,
        head_dim=40,
        head_dim_v=32,
        page_block_size=page_block_size,
        dtype=dtype,
        device=device,
        max_seqlen=83,
        causal=causal,
        seed=seed_for("small", device, dtype, num_heads_k, page_block_size, seq_len_q, causal),
    )
    assert 0 in inp.lengths()
    assert any(n % page_block_size for n in inp.lengths()) or page_block_size == 1
    out, lse = inp.run()
    check_against_reference(inp, out, lse)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("page_block_size", [1, 16])
def test_causal_lengths_shorter_than_seq_len_q(device, dtype, page_block_size):
    """Causal, seq_len_q 5, lengths 0..7: the first queries of short sequences see nothing."""
    lengths = [0, 1, 2, 3, 4, 5, 7]
    inp = make_decode_inputs(
        batch=len(lengths),
        seq_len_q=5,
        num_heads_q=4,
        num_heads_k=2,
        head_dim=40,
        head_dim_v=32,
        page_block_size=page_block_size,
        dtype=dtype,
        device=device,
        lengths=lengths,
        max_seqlen=7,
        causal=True,
        seed=seed_for("short", device, dtype, page_block_size),
    )
    counts = inp.visible_counts()
    assert (counts == 0).any() and (counts > 0).any()
    # Sequence of length 3: query j sees tokens t <= 3 - 5 + j, i.e. nothing for j < 2.
    assert counts[3, 0].tolist() == [0, 0, 1, 2, 3]
    out, lse = inp.run()
    check_against_reference(inp, out, lse)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_all_lengths_zero(device, dtype):
    inp = make_decode_inputs(
        batch=3,
        seq_len_q=2,
        num_heads_q=4,
        num_heads_k=1,
        head_dim=40,
        head_dim_v=32,
        page_block_size=16,
        dtype=dtype,
        device=device,
        lengths=[0, 0, 0],
        max_seqlen=20,
        seed=seed_for("zeros", device, dtype),
    )
    out, lse = inp.run()
    assert (out == 0).all()
    assert (lse == float("inf")).all()


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_batch_of_one_full_table(device, dtype):
    """One sequence filling its block table exactly (no junk column): length = capacity."""
    inp = make_decode_inputs(
        batch=1,
        seq_len_q=1,
        num_heads_q=16,
        head_dim=576,
        head_dim_v=512,
        page_block_size=64,
        dtype=dtype,
        device=device,
        lengths=[192],
        max_seqlen=192,
        extra_table_columns=0,
        seed=seed_for("one", device, dtype),
    )
    assert inp.block_table.shape == (1, 3)
    out, lse = inp.run()
    check_against_reference(inp, out, lse)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("softmax_scale", [0.01, 0.3])
def test_softmax_scale(device, dtype, softmax_scale):
    inp = make_decode_inputs(
        batch=3,
        seq_len_q=2,
        num_heads_q=4,
        num_heads_k=2,
        head_dim=40,
        head_dim_v=32,
        page_block_size=16,
        dtype=dtype,
        device=device,
        max_seqlen=70,
        causal=True,
        softmax_scale=softmax_scale,
        seed=seed_for("scale", device, dtype, softmax_scale),
    )
    out, lse = inp.run()
    check_against_reference(inp, out, lse)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_head_dim_v_equals_head_dim(device, dtype):
    inp = make_decode_inputs(
        batch=3,
        seq_len_q=1,
        num_heads_q=4,
        num_heads_k=1,
        head_dim=40,
        head_dim_v=40,
        page_block_size=16,
        dtype=dtype,
        device=device,
        max_seqlen=50,
        seed=seed_for("dv=d", device, dtype),
    )
    out, lse = inp.run()
    check_against_reference(inp, out, lse)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_strided_q_and_cache(device, dtype):
    """q and k_cache that are views (unit stride only in the last dimension) give the same result."""
    inp = make_decode_inputs(
        batch=4,
        seq_len_q=2,
        num_heads_q=4,
        num_heads_k=2,
        head_dim=40,
        head_dim_v=32,
        page_block_size=16,
        dtype=dtype,
        device=device,
        max_seqlen=60,
        causal=True,
        seed=seed_for("strided", device, dtype),
    )
    ref = inp.reference()
    # q: every other head of a wider tensor, and a transposed (seq_len_q, batch) storage order.
    q_big = torch.zeros(2, 4, 8, 40, dtype=dtype, device=device)
    q_big[:, :, ::2] = inp.q.transpose(0, 1)
    q_view = q_big.transpose(0, 1)[:, :, ::2]
    # k_cache: head_dim 40 inside rows of 48 channels, i.e. a token stride that is not head_dim.
    k_big = torch.full((*inp.k_cache.shape[:3], 48), float("nan"), dtype=dtype, device=device)
    k_big[..., :40] = inp.k_cache
    k_view = k_big[..., :40]
    assert not q_view.is_contiguous() and not k_view.is_contiguous()
    md, splits = inp.metadata()
    out, lse = flashmla_ops.flash_mla_with_kvcache(
        q_view, k_view, inp.block_table, inp.cache_seqlens, 32, md, splits, causal=True
    )
    check_against_reference(inp, out, lse, ref=ref)
    out_c, lse_c = inp.run((md, splits))
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse_c, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Metadata with other numbers of workers. On CPU num_sm_parts is the intra-op thread count when
# get_mla_metadata runs, so changing the thread count exercises the C++ schedule with other
# worker counts, including far more workers than pieces of work.
# ----------------------------------------------------------------------------------------------

NUM_SM_PARTS = [1, 2, 3, 5, 8, 33, 97]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["deepseek", "small"])
def test_cpu_metadata_worker_counts(dtype, shape):
    if shape == "deepseek":
        inp = make_decode_inputs(
            batch=4,
            seq_len_q=2,
            num_heads_q=32,
            dtype=dtype,
            max_seqlen=300,
            causal=True,
            seed=seed_for("parts", dtype, shape),
        )
    else:
        inp = make_decode_inputs(
            batch=6,
            seq_len_q=5,
            num_heads_q=4,
            num_heads_k=2,
            head_dim=40,
            head_dim_v=32,
            page_block_size=1,
            dtype=dtype,
            max_seqlen=150,
            causal=True,
            seed=seed_for("parts", dtype, shape),
        )
    ref = inp.reference()
    ref_low = inp.reference(compute_dtype=None) if dtype != torch.float32 else None
    results = []
    split_counts = set()
    for parts in NUM_SM_PARTS:
        with num_threads(parts):
            md, splits = inp.metadata()
        assert md.shape == (parts, 8) and splits.shape == (inp.batch + 1,)
        check_schedule_invariants(md, splits, inp.lengths())
        split_counts.add(int(splits[-1]))
        out, lse = inp.run((md, splits))  # runs with the default thread count
        check_against_reference(inp, out, lse, ref=ref, ref_low=ref_low)
        results.append((out, lse))
    assert len(split_counts) > 1, (
        "the worker counts should cut the sequences into different numbers of pieces"
    )
    out0, lse0 = results[0]
    seen = inp.visible_counts() > 0
    tol_out = 1e-6 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    for out, lse in results[1:]:
        # Same result up to rounding: only the order of the fp32 sums and the final rounding differ.
        assert max_abs(out, out0) <= tol_out * max(1.0, out0.abs().max().item())
        assert max_abs(lse[seen], lse0[seen]) <= 1e-5 * (lse0[seen].abs().max().item() + 1)
        assert torch.equal(lse[~seen], lse0[~seen])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_thread_count(dtype):
    """Same inputs and metadata, kernel run under 1, 2 and 5 threads: deterministic under each
    thread count, and equal across thread counts up to rounding.

    (Not bitwise across thread counts: the kernel's at::mm calls pick their MKL code path by the
    intra-op thread count, e.g. a 19-token tile's Q K^T rounds differently under 1-2 and >= 3
    threads. Repeated calls under one thread count are bitwise equal.)
    """
    inp = make_decode_inputs(
        batch=4,
        seq_len_q=2,
        num_heads_q=16,
        dtype=dtype,
        max_seqlen=300,
        causal=True,
        seed=seed_for("threads", dtype),
    )
    with num_threads(3):
        metadata = inp.metadata()
    outs = []
    for threads in (1, 2, 5):
        with num_threads(threads):
            out, lse = inp.run(metadata)
            out2, lse2 = inp.run(metadata)
        assert_bitwise_equal(out, out2)
        assert_bitwise_equal(lse, lse2)
        outs.append((out, lse))
    seen = inp.visible_counts() > 0
    for out, lse in outs[1:]:
        assert max_abs(out, outs[0][0]) <= 2 * torch.finfo(dtype).eps * outs[0][0].abs().max().item()
        assert max_abs(lse[seen], outs[0][1][seen]) <= 1e-5 * (outs[0][1][seen].abs().max().item() + 1)
        assert torch.equal(lse[~seen], outs[0][1][~seen])


@pytest.mark.parametrize("device", DEVICES)
def test_metadata_values_do_not_depend_on_stale_state(device):
    """get_mla_metadata is a pure function of the lengths (and the worker count)."""
    lens = torch.tensor([0, 70, 1, 300, 64], dtype=torch.int32, device=device)
    md1, sp1 = flashmla_ops.get_mla_metadata(lens, 16, 1)
    other = torch.tensor([5, 5000, 0, 1, 2], dtype=torch.int32, device=device)
    flashmla_ops.get_mla_metadata(other, 16, 1)
    md2, sp2 = flashmla_ops.get_mla_metadata(lens.clone(), 16, 1)
    assert torch.equal(md1, md2) and torch.equal(sp1, sp2)
    assert md1.dtype == sp1.dtype == torch.int32
    assert md1.device == sp1.device == lens.device
    check_schedule_invariants(md1.cpu(), sp1.cpu(), lens.tolist())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("count", [3, 200])
def test_metadata_lengths_near_int_max(device, count):
    """Lengths up to INT_MAX (a bad input the decode masks, docs: bad inputs) still give a schedule that
    covers every token once: no int overflow in the block counts (csrc/schedule.h sched_blocks). 200 of
    them cost more than 2^31 blocks in all, past the INT_MAX / 2 that the CUDA walk's 32-bit positions
    allow, so there it takes its sequential path; 3 stay on the walk. CUDA gives the CPU's values."""
    int_max = 2**31 - 1
    pattern = [int_max, int_max - 1, 5, int_max - 63, 0, 1, 2**30, 64]
    lens = torch.tensor([pattern[i % len(pattern)] for i in range(count)], dtype=torch.int32, device=device)
    md, splits = flashmla_ops.get_mla_metadata(lens, 16, 1)
    check_schedule_invariants(md.cpu(), splits.cpu(), lens.tolist())
    if device != "cpu":
        with num_threads(md.shape[0]):
            md_cpu, splits_cpu = flashmla_ops.get_mla_metadata(lens.cpu(), 16, 1)
        assert torch.equal(md.cpu(), md_cpu) and torch.equal(splits.cpu(), splits_cpu)


@pytest.mark.parametrize(
    "rows,parts,blocks", [(16, 132, 64), (64, 132, 128), (128, 66, 64)], ids=lambda v: str(v)
)
def test_schedule_keeps_equal_sequences_whole(rows, parts, blocks):
    """The fixed cost per piece (csrc/schedule.h fixed_cost_blocks) leaves 128 equal sequences uncut
    on the H100's worker counts (132 workers up to 64 rows per KV head, 66 above): the grid's
    fixed-length rows pay no partial results and no merge. A cost of 3 at 128 rows cut every
    sequence and was measured 3% slower (docs/KERNEL_NOTES.md)."""
    lens = torch.full((128,), blocks * 64, dtype=torch.int32)
    with num_threads(parts):
        md, splits = flashmla_ops.get_mla_metadata(lens, rows, 1)
    assert md.shape == (parts, 8)
    check_schedule_invariants(md, splits, lens.tolist())
    assert int(splits[-1]) == 128, "every sequence should be one piece"


# ----------------------------------------------------------------------------------------------
# Determinism and poison
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", ["deepseek", "small"])
def test_deterministic(device, dtype, shape):
    if shape == "deepseek":
        inp = make_decode_inputs(
            batch=4,
            seq_len_q=2,
            num_heads_q=64,
            dtype=dtype,
            device=device,
            max_seqlen=300,
            causal=True,
            seed=seed_for("det", device, dtype, shape),
        )
    else:
        inp = make_decode_inputs(
            batch=5,
            seq_len_q=5,
            num_heads_q=6,
            num_heads_k=2,
            head_dim=40,
            head_dim_v=32,
            page_block_size=16,
            dtype=dtype,
            device=device,
            max_seqlen=90,
            causal=True,
            seed=seed_for("det", device, dtype, shape),
        )
    out1, lse1 = inp.run()
    out2, lse2 = inp.run()
    assert_bitwise_equal(out1, out2)
    assert_bitwise_equal(lse1, lse2)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_junk_never_read(device, dtype):
    """Changing what sits in dead cache slots and junk table entries does not change a single bit."""
    inp = make_decode_inputs(
        batch=5,
        seq_len_q=2,
        num_heads_q=4,
        num_heads_k=2,
        head_dim=40,
        head_dim_v=32,
        page_block_size=16,
        dtype=dtype,
        device=device,
        max_seqlen=90,
        causal=True,
        seed=seed_for("junk", device, dtype),
    )
    out1, lse1 = inp.run()
    check_empty_rows(inp, out1, lse1)
    # Replace every NaN (dead slot) by a huge finite value and every junk table entry by another junk.
    k2 = torch.nan_to_num(inp.k_cache, nan=1e4)
    table2 = inp.block_table.clone()
    page = inp.page_block_size
    for i, n in enumerate(inp.lengths()):
        live = -(-n // page)
        table2[i, live:] = -7 if i % 2 else inp.k_cache.shape[0]
    md = inp.metadata()
    out2, lse2 = flashmla_ops.flash_mla_with_kvcache(
        inp.q, k2, table2, inp.cache_seqlens, inp.head_dim_v, *md, causal=True
    )
    assert_bitwise_equal(out1, out2)
    assert_bitwise_equal(lse1, lse2)


@pytest.mark.parametrize("device,dtype", device_dtype_params())
def test_outputs_do_not_alias_inputs(device, dtype):
    inp = make_decode_inputs(
        batch=2,
        seq_len_q=1,
        num_heads_q=4,
        num_heads_k=1,
        head_dim=40,
        head_dim_v=40,
        page_block_size=16,
        dtype=dtype,
        device=device,
        max_seqlen=20,
        seed=seed_for("alias", device, dtype),
    )
    q_before, k_before = inp.q.clone(), inp.k_cache.clone()
    out, lse = inp.run()
    assert out.is_contiguous() and lse.is_contiguous()
    for t in (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens):
        assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        assert lse.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
    assert_bitwise_equal(inp.q, q_before)
    assert_bitwise_equal(inp.k_cache, k_before)
