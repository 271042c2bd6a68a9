"""Bad input gets a clear error naming the argument, never a crash or silent garbage (DESIGN.md §7).

Shape, dtype, rank, stride and device errors raise on every device, in the kernels and in the fakes
(so torch.compile / torch.export report them at trace time). Value errors (negative lengths, lengths
beyond the block table's capacity, live block ids outside [0, num_blocks), stale metadata) raise on
CPU; CUDA cannot check them without a host sync and masks them on the device instead, as the
docstring of flash_mla_with_kvcache documents. The CUDA tests here check that masked result.
"""

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flashmla_ops
from helpers import (
    DEVICES,
    JUNK_BLOCK_ID,
    check_against_reference,
    make_decode_inputs,
    requires_cuda,
    seed_for,
)

FWD = torch.ops.flashmla.fwd_kvcache_mla.default
METADATA = torch.ops.flashmla.get_mla_metadata.default
ARG_NAMES = [
    "q",
    "k_cache",
    "v_cache",
    "head_dim_v",
    "cache_seqlens",
    "block_table",
    "softmax_scale",
    "causal",
    "tile_scheduler_metadata",
    "num_splits",
]


def valid_args(device, dtype=torch.bfloat16, **kwargs) -> dict:
    """A valid call of fwd_kvcache_mla (batch 3, 2 KV heads, page 16), as a dict of named arguments."""
    params = dict(
        batch=3,
        seq_len_q=2,
        num_heads_q=4,
        num_heads_k=2,
        head_dim=40,
        head_dim_v=32,
        page_block_size=16,
        dtype=dtype,
        device=device,
        max_seqlen=40,
        lengths=[0, 17, 40],
        causal=True,
        seed=seed_for("bad", device, dtype),
    )
    params.update(kwargs)
    inp = make_decode_inputs(**params)
    return dict(zip(ARG_NAMES, inp.op_args()))


def call(args: dict):
    return FWD(*[args[name] for name in ARG_NAMES])


def call_fake(args: dict):
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        return call(fake)


def replace(**changes):
    """A case that replaces arguments; callables get the current args and the device."""

    def apply(args, device):
        for name, value in changes.items():
            args[name] = value(args, device) if callable(value) else value
        return args

    return apply


def _metadata_for(lengths, args, device=None):
    q, k = args["q"], args["k_cache"]
    lens = torch.tensor(lengths, dtype=torch.int32, device=device or q.device)
    return METADATA(lens, q.shape[1] * q.shape[2] // k.shape[2], k.shape[2])


# Errors that every device raises, and so does the fake. (id, change, regex the message must match)
SHAPE_CASES = [
    (
        "q-dtype-float64",
        replace(q=lambda a, d: a["q"].double(), k_cache=lambda a, d: a["k_cache"].double()),
        r"q must be bfloat16",
    ),  # "..., float16 or float32" on CPU; CUDA has no float32
    ("q-dtype-int", replace(q=lambda a, d: a["q"].to(torch.int32)), r"q must be"),
    ("k_cache-dtype-differs", replace(k_cache=lambda a, d: a["k_cache"].half()), r"k_cache dtype"),
    ("v_cache-given", replace(v_cache=lambda a, d: a["k_cache"]), r"v_cache must be None"),
    ("q-rank-3", replace(q=lambda a, d: a["q"][:, 0]), r"q must have 4 dimensions"),
    (
        "k_cache-rank-3",
        replace(k_cache=lambda a, d: a["k_cache"][:, :, 0]),
        r"k_cache must have 4 dimensions",
    ),
    (
        "block_table-rank-1",
        replace(block_table=lambda a, d: a["block_table"].flatten()),
        r"block_table must have 2 dimensions",
    ),
    (
        "cache_seqlens-rank-2",
        replace(cache_seqlens=lambda a, d: a["cache_seqlens"][:, None]),
        r"cache_seqlens must have 1 dimension",
    ),
    (
        "metadata-rank-1",
        replace(tile_scheduler_metadata=lambda a, d: a["tile_scheduler_metadata"].flatten()),
        r"tile_scheduler_metadata must have 2 dimensions",
    ),
    (
        "num_splits-rank-2",
        replace(num_splits=lambda a, d: a["num_splits"][None]),
        r"num_splits must have 1 dimension",
    ),
    (
        "block_table-int64",
        replace(block_table=lambda a, d: a["block_table"].long()),
        r"block_table must be int32",
    ),
    (
        "cache_seqlens-int64",
        replace(cache_seqlens=lambda a, d: a["cache_seqlens"].long()),
        r"cache_seqlens must be int32",
    ),
    (
        "metadata-int64",
        replace(tile_scheduler_metadata=lambda a, d: a["tile_scheduler_metadata"].long()),
        r"tile_scheduler_metadata must be int32",
    ),
    (
        "num_splits-int64",
        replace(num_splits=lambda a, d: a["num_splits"].long()),
        r"num_splits must be int32",
    ),
    (
        "head_dim-differs",
        replace(k_cache=lambda a, d: torch.nn.functional.pad(a["k_cache"], (0, 8))),
        r"k_cache head_dim",
    ),
    ("head_dim_v-above-head_dim", replace(head_dim_v=41), r"head_dim_v"),
    ("head_dim_v-zero", replace(head_dim_v=0), r"head_dim_v"),
    (
        "num_heads_q-not-multiple",
        replace(q=lambda a, d: a["q"][:, :, :3]),
        r"num_heads_q .*multiple of num_heads_k",
    ),
    (
        "block_table-batch",
        replace(block_table=lambda a, d: torch.cat([a["block_table"]] * 2)),
        r"block_table batch size",
    ),
    (
        "cache_seqlens-batch",
        replace(cache_seqlens=lambda a, d: a["cache_seqlens"][:2]),
        r"cache_seqlens size",
    ),
    ("num_splits-batch", replace(num_splits=lambda a, d: _metadata_for([0, 17, 40, 3], a)[1]), r"num_splits"),
    (
        "metadata-width-7",
        replace(tile_scheduler_metadata=lambda a, d: a["tile_scheduler_metadata"][:, :7]),
        r"tile_scheduler_metadata must have shape",
    ),
    (
        "metadata-width-9",
        replace(
            tile_scheduler_metadata=lambda a, d: torch.nn.functional.pad(a["tile_scheduler_metadata"], (0, 1))
        ),
        r"tile_scheduler_metadata must have shape",
    ),
    # Rules the fake must repeat too, though they need a closer look at the tensors.
    (
        "q-last-dim-stride",
        replace(q=lambda a, d: torch.repeat_interleave(a["q"], 2, dim=-1)[..., ::2]),
        r"q must have stride 1 in its last dimension",
    ),
    (
        "k_cache-last-dim-stride",
        replace(k_cache=lambda a, d: torch.repeat_interleave(a["k_cache"], 2, dim=-1)[..., ::2]),
        r"k_cache must have stride 1 in its last dimension",
    ),
    (
        "empty-batch",
        replace(
            q=lambda a, d: a["q"][:0],
            block_table=lambda a, d: a["block_table"][:0],
            cache_seqlens=lambda a, d: a["cache_seqlens"][:0],
            num_splits=lambda a, d: a["num_splits"][:1],
        ),
        r"batch",
    ),
    (
        "metadata-zero-workers",
        replace(tile_scheduler_metadata=lambda a, d: a["tile_scheduler_metadata"][:0]),
        r"tile_scheduler_metadata must have shape \(num_sm_parts >= 1",
    ),
    (
        "block_table-no-columns",
        replace(
            block_table=lambda a, d: a["block_table"][:, :0],
            cache_seqlens=lambda a, d: torch.zeros_like(a["cache_seqlens"]),
        ),
        r"block_table must have at least one column",
    ),
    ("softmax_scale-zero", replace(softmax_scale=0.0), r"softmax_scale"),
    ("softmax_scale-nan", replace(softmax_scale=float("nan")), r"softmax_scale"),
    ("softmax_scale-negative", replace(softmax_scale=-0.1), r"softmax_scale"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,change,match", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_fwd_bad_shapes_raise(device, case, change, match):
    args = change(valid_args(device), device)
    with pytest.raises(RuntimeError, match=match):
        call(args)
    if device == "cuda":
        torch.cuda.synchronize()  # nothing was launched that fails later


@pytest.mark.parametrize("case,change,match", SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_fwd_bad_shapes_raise_in_fake(case, change, match):
    """The fake refuses the same inputs (torch.compile/export then fail at trace time, not run time)."""
    args = change(valid_args("cpu"), "cpu")
    with pytest.raises(RuntimeError, match=match):
        call_fake(args)


def test_valid_args_pass():
    """The base case of this file is valid, so each failure above comes from its one change."""
    args = valid_args("cpu")
    out, lse = call(args)
    assert out.shape == (3, 2, 4, 32)
    fake_out, _ = call_fake(args)
    assert fake_out.shape == out.shape


# ----------------------------------------------------------------------------------------------
# get_mla_metadata
# ----------------------------------------------------------------------------------------------

METADATA_CASES = [
    (
        "cache_seqlens-rank-2",
        torch.zeros(2, 2, dtype=torch.int32),
        16,
        1,
        r"cache_seqlens must have 1 dimension",
    ),
    ("cache_seqlens-int64", torch.zeros(2, dtype=torch.int64), 16, 1, r"cache_seqlens must be int32"),
    ("cache_seqlens-float", torch.zeros(2, dtype=torch.float32), 16, 1, r"cache_seqlens must be int32"),
    ("empty-batch", torch.zeros(0, dtype=torch.int32), 16, 1, r"cache_seqlens is empty"),
    (
        "num_heads_per_head_k-zero",
        torch.zeros(2, dtype=torch.int32),
        0,
        1,
        r"num_heads_per_head_k must be >= 1",
    ),
    ("num_heads_k-zero", torch.zeros(2, dtype=torch.int32), 16, 0, r"num_heads_k must be >= 1"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "case,lens,per_head_k,heads_k,match", METADATA_CASES, ids=[c[0] for c in METADATA_CASES]
)
def test_metadata_bad_args_raise(device, case, lens, per_head_k, heads_k, match):
    with pytest.raises(RuntimeError, match=match):
        METADATA(lens.to(device), per_head_k, heads_k)


@pytest.mark.parametrize(
    "case,lens,per_head_k,heads_k,match", METADATA_CASES, ids=[c[0] for c in METADATA_CASES]
)
def test_metadata_bad_args_raise_in_fake(case, lens, per_head_k, heads_k, match):
    with FakeTensorMode() as mode:
        with pytest.raises(RuntimeError, match=match):
            METADATA(mode.from_tensor(lens), per_head_k, heads_k)


def test_metadata_negative_length_raises_on_cpu():
    with pytest.raises(RuntimeError, match=r"cache_seqlens\[1\] = -3 is negative"):
        METADATA(torch.tensor([4, -3], dtype=torch.int32), 16, 1)


# ----------------------------------------------------------------------------------------------
# Value errors: raise on CPU
# ----------------------------------------------------------------------------------------------


def cpu_args_with(lengths=None, table_changes=(), metadata_lengths=None):
    """Valid CPU args, then cache_seqlens := lengths (metadata built for metadata_lengths, default the
    valid ones) and block_table[i, j] := id for each (i, j, id) in table_changes."""
    args = valid_args("cpu")
    if lengths is not None:
        args["cache_seqlens"] = torch.tensor(lengths, dtype=torch.int32)
    if metadata_lengths is not None:
        args["tile_scheduler_metadata"], args["num_splits"] = _metadata_for(metadata_lengths, args)
    for i, j, block in table_changes:
        args["block_table"][i, j] = block
    return args


CPU_VALUE_CASES = [
    ("negative-length", dict(lengths=[0, -1, 40]), r"cache_seqlens\[1\] = -1 is negative"),
    (
        "length-beyond-capacity",
        dict(lengths=[0, 17, 65]),  # capacity = 4 columns x 16
        r"cache_seqlens\[2\] = 65 exceeds the block_table capacity .* = 64",
    ),
    (
        "live-block-id-too-large",
        dict(table_changes=[(1, 1, "num_blocks")]),
        r"block_table\[1, 1\] = \d+ holds live tokens of sequence 1 but is outside \[0, num_blocks = \d+\)",
    ),
    ("live-block-id-negative", dict(table_changes=[(2, 0, -1)]), r"block_table\[2, 0\] = -1 .*outside"),
    (
        "live-block-id-junk",
        dict(table_changes=[(2, 2, JUNK_BLOCK_ID)]),
        rf"block_table\[2, 2\] = {JUNK_BLOCK_ID}",
    ),
    (
        "stale-metadata-other-lengths",
        dict(metadata_lengths=[5, 17, 300]),
        r"tile_scheduler_metadata / num_splits do not match cache_seqlens",
    ),
    (
        "stale-metadata-after-lengths-change",
        dict(lengths=[0, 16, 39], metadata_lengths=[0, 17, 40]),
        r"do not match cache_seqlens",
    ),
]


@pytest.mark.parametrize("case,kwargs,match", CPU_VALUE_CASES, ids=[c[0] for c in CPU_VALUE_CASES])
def test_cpu_bad_values_raise(case, kwargs, match):
    kwargs = dict(kwargs)
    changes = []
    for i, j, block in kwargs.pop("table_changes", ()):
        changes.append((i, j, valid_args("cpu")["k_cache"].shape[0] if block == "num_blocks" else block))
    args = cpu_args_with(table_changes=changes, **kwargs)
    with pytest.raises(RuntimeError, match=match):
        call(args)


def test_cpu_stale_metadata_with_matching_lengths_is_fine():
    """Counter-check of the stale cases: metadata rebuilt for the new lengths is accepted."""
    args = cpu_args_with(lengths=[0, 16, 39], metadata_lengths=[0, 16, 39])
    out, lse = call(args)
    assert torch.isfinite(lse[1:]).all() and (lse[0] == float("inf")).all()


def test_cpu_junk_past_end_is_not_an_error():
    """Block ids past a sequence's live blocks may be anything (§2), on every row."""
    args = valid_args("cpu")
    table = args["block_table"]  # lengths [0, 17, 40], page 16: live blocks 0, 2 and 3
    table[0, :] = -5
    table[1, 2:] = JUNK_BLOCK_ID
    out, lse = call(args)
    assert (lse[0] == float("inf")).all() and (out[0] == 0).all()
    assert torch.isfinite(lse[1:]).all()


# ----------------------------------------------------------------------------------------------
# CUDA: device errors raise; value errors are masked (documented in interface.py)
# ----------------------------------------------------------------------------------------------

DEVICE_ARGS = ["k_cache", "block_table", "cache_seqlens", "tile_scheduler_metadata", "num_splits"]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("name", DEVICE_ARGS)
def test_cuda_argument_on_wrong_device_raises(name):
    args = valid_args("cuda")
    args[name] = args[name].cpu()
    with pytest.raises(RuntimeError, match=rf"{name} must be on cuda"):
        call(args)


@requires_cuda
@pytest.mark.cuda
def test_cuda_q_on_cpu_raises():
    args = valid_args("cuda")
    args["q"] = args["q"].cpu()
    with pytest.raises(RuntimeError, match=r"must be on cpu|must be on .*the device of q|q"):
        call(args)


@requires_cuda
@pytest.mark.cuda
def test_cuda_float32_raises():
    """The CUDA kernels support bf16 and fp16 only; fp32 is refused with an error naming q."""
    args = valid_args("cuda", dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"\bq\b"):
        call(args)


def _masked_case_inputs(device):
    """Finite junk (poison=False) and full tables, so that a length clamped to the capacity reads
    only real tokens and every check below has one exact expected answer."""
    return make_decode_inputs(
        batch=4,
        seq_len_q=2,
        num_heads_q=4,
        num_heads_k=2,
        head_dim=40,
        head_dim_v=32,
        page_block_size=16,
        dtype=torch.bfloat16,
        device=device,
        lengths=[48, 20, 33, 48],
        max_seqlen=48,
        extra_table_columns=0,
        causal=True,
        poison=False,
        seed=seed_for("masked", device),
    )


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize(
    "case",
    [
        "negative-length",
        "length-beyond-capacity",
        "block-id-out-of-range",
        "block-id-negative",
        "block-id-junk",
        "first-block-out-of-range",
    ],
)
def test_cuda_bad_values_are_masked(case):
    """CUDA masks invalid values on the device: a negative length counts as 0, a length beyond
    capacity as the capacity, and tokens of an out-of-range block are skipped."""
    inp = _masked_case_inputs("cuda")
    lens = inp.lengths()
    table = inp.block_table.clone()
    page = inp.page_block_size
    capacity = table.shape[1] * page
    num_blocks = inp.k_cache.shape[0]
    expect_lens = list(lens)
    if case == "negative-length":
        lens[1] = -5
        expect_lens[1] = 0
    elif case == "length-beyond-capacity":
        lens[3] = capacity + 1000
        expect_lens[3] = capacity
    else:
        # Break the last live block of sequence 2 (length 33: tokens 32 are in block 2): its tokens are
        # skipped, which is the same as the sequence ending at 32. For "first-block-...", break block 0
        # of sequence 1 (length 20): the tokens 0..15 are skipped; token 16..19 remain.
        bad = {
            "block-id-out-of-range": num_blocks,
            "block-id-negative": -1,
            "block-id-junk": JUNK_BLOCK_ID,
            "first-block-out-of-range": num_blocks + 3,
        }[case]
        if case == "first-block-out-of-range":
            table[1, 0] = bad
        else:
            table[2, 2] = bad
            expect_lens[2] = 32
    # Skipping sequence 2's last token equals ending it at 32 only without the causal mask (with it,
    # query 0 of length 33 sees token 31, of length 32 not).
    causal = case not in ("block-id-out-of-range", "block-id-negative", "block-id-junk")
    inp = dataclasses.replace(inp, causal=causal)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    md, splits = flashmla_ops.get_mla_metadata(cache_seqlens, inp.num_heads_per_head_k, inp.num_heads_k)
    out, lse = flashmla_ops.flash_mla_with_kvcache(
        inp.q, inp.k_cache, table, cache_seqlens, inp.head_dim_v, md, splits, causal=causal
    )
    torch.cuda.synchronize()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    if case == "first-block-out-of-range":
        # Sequence 1 without its first page: compare with a table whose first page is a block of zeros
        # is not the same (zeros still count in the softmax), so check the other sequences exactly
        # against the reference and sequence 1 against a reference over tokens 16..19 only.
        rows = [0, 2, 3]
        ref = inp.reference()
        check_rows(inp, out, lse, ref, rows)
        sub = make_sub_sequence(inp, 1, first_token=16, length=20)
        sub_ref = sub.reference()
        check_against_reference(sub, out[1:2], lse[1:2], ref=sub_ref)
        return
    expect = dataclasses.replace(
        inp, cache_seqlens=torch.tensor(expect_lens, dtype=torch.int32, device="cuda")
    )
    check_against_reference(expect, out, lse)


def check_rows(inp, out, lse, ref, rows):
    sub = dataclasses.replace(
        inp, q=inp.q[rows], block_table=inp.block_table[rows], cache_seqlens=inp.cache_seqlens[rows]
    )
    check_against_reference(sub, out[rows], lse[rows], ref=(ref[0][rows], ref[1][rows]))


def make_sub_sequence(inp, i, first_token, length):
    """Sequence i restricted to tokens [first_token, length) as a 1-sequence input of its own whose
    causal mask is unchanged (query j sees tokens t <= length - s_q + j of the original)."""
    page = inp.page_block_size
    assert first_token % page == 0
    table = inp.block_table[i : i + 1, first_token // page :].clone()
    n = length - first_token
    # The causal limit length - s_q + j is relative to the original; shifted by first_token it is
    # n - s_q + j, i.e. the same rule for the shorter sequence.
    return dataclasses.replace(
        inp,
        q=inp.q[i : i + 1],
        block_table=table,
        cache_seqlens=torch.tensor([n], dtype=torch.int32, device=inp.q.device),
    )


@requires_cuda
@pytest.mark.cuda
def test_cuda_stale_metadata_does_not_crash():
    """Metadata built for other lengths: unspecified results, but no illegal memory access (the
    device stays usable and a correct call afterwards is right)."""
    inp = make_decode_inputs(
        batch=4,
        seq_len_q=1,
        num_heads_q=64,
        dtype=torch.bfloat16,
        device="cuda",
        max_seqlen=300,
        seed=seed_for("stale-cuda"),
    )
    for stale_lengths in ([0, 0, 0, 0], [300, 300, 300, 300], [1, 2, 3, 4], [5000, 1, 0, 7000]):
        stale = flashmla_ops.get_mla_metadata(
            torch.tensor(stale_lengths, dtype=torch.int32, device="cuda"),
            inp.num_heads_per_head_k,
            inp.num_heads_k,
        )
        out, lse = inp.run(stale)
        torch.cuda.synchronize()
        assert out.shape == (4, 1, 64, 512) and lse.shape == (4, 64, 1)
    out, lse = inp.run()
    check_against_reference(inp, out, lse)


@requires_cuda
@pytest.mark.cuda
def test_cuda_metadata_negative_length_is_masked():
    """get_mla_metadata on CUDA cannot raise for a negative length (no host sync): it schedules it
    as an empty sequence, and the attention gives that sequence out 0, lse +inf."""
    inp = _masked_case_inputs("cuda")
    lens = torch.tensor([48, -7, 33, 48], dtype=torch.int32, device="cuda")
    md, splits = flashmla_ops.get_mla_metadata(lens, inp.num_heads_per_head_k, inp.num_heads_k)
    out, lse = flashmla_ops.flash_mla_with_kvcache(
        inp.q, inp.k_cache, inp.block_table, lens, 32, md, splits, causal=True
    )
    torch.cuda.synchronize()
    assert (out[1] == 0).all() and (lse[1] == float("inf")).all()
    expect = dataclasses.replace(
        inp, cache_seqlens=torch.tensor([48, 0, 33, 48], dtype=torch.int32, device="cuda")
    )
    check_against_reference(expect, out, lse)
