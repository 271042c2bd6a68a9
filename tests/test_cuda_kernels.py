"""The CUDA decode kernels against each other: the Hopper kernel (sm_90a) and the portable kernel
on the same inputs, and every configuration of the portable kernel (forced through
FLASHMLA_PORTABLE_CONFIG) on odd shapes. Both are chosen per call from environment variables
(FLASHMLA_KERNEL, FLASHMLA_PORTABLE_CONFIG), so one process runs them all.
Skipped without a GPU; the Hopper cases also without an sm_90 GPU and an sm_90a build.
"""

import dataclasses

import pytest
import torch
from helpers import (
    JUNK_BLOCK_ID,
    LOW_PRECISION,
    assert_bitwise_equal,
    assert_kernels_agree,
    check_against_reference,
    check_pair_against_reference,
    dtype_name,
    make_decode_inputs,
    requires_cuda,
    seed_for,
)

import flashmla_ops

pytestmark = [pytest.mark.cuda, requires_cuda]

DTYPES = pytest.mark.parametrize("dtype", LOW_PRECISION, ids=dtype_name)

# (MG, MW, N, STAGES, WN): every configuration csrc/cuda/decode_portable_launch.cuh can launch.
PORTABLE_CONFIGS = [
    (1, 1, 64, 2, 8), (1, 1, 32, 4, 4), (1, 1, 32, 3, 4), (1, 1, 32, 2, 4),
    (2, 2, 64, 2, 8), (2, 2, 32, 4, 4), (2, 2, 32, 3, 4), (2, 2, 32, 2, 4),
    (4, 2, 64, 2, 4), (4, 2, 32, 2, 4),
]  # fmt: skip


def hopper_available() -> bool:
    return (
        torch.cuda.is_available()
        and flashmla_ops.build_info()["sm90"]
        and torch.cuda.get_device_capability() == (9, 0)
    )


requires_hopper = pytest.mark.skipif(not hopper_available(), reason="needs an sm_90 GPU and the sm_90a build")


def cut_sequences_inputs(**shape):
    """CUDA inputs for the odd-page tests: lengths 0, 1, 777, 5000, 4099 (an empty row, partial last pages,
    NaN in every unused slot), two sequences long enough that the schedule cuts them into pieces that start
    inside a page (asserted)."""
    inp = make_decode_inputs(
        batch=5, device="cuda", lengths=[0, 1, 777, 5000, 4099], max_seqlen=5000, **shape
    )
    _, num_splits = inp.metadata()
    assert int((num_splits[1:] - num_splits[:-1]).max()) > 1, "some sequence must be cut into pieces"
    return inp


def run_with(monkeypatch, inp, **env):
    """One call of the op with the given FLASHMLA_* variables (read by the op on every call)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out, lse = inp.run()
    torch.cuda.synchronize()
    return out, lse


def check_switch_changes_no_bit(monkeypatch, inp, kernel, var):
    """A 0/1 switch `var` that may only change speed: forced on, forced off and the default give the
    same output and LSE bit for bit, on matches the reference, and any other value raises."""
    on = run_with(monkeypatch, inp, FLASHMLA_KERNEL=kernel, **{var: "1"})
    off = run_with(monkeypatch, inp, FLASHMLA_KERNEL=kernel, **{var: "0"})
    default = run_with(monkeypatch, inp, FLASHMLA_KERNEL=kernel, **{var: ""})
    check_against_reference(inp, *on)
    for got in (off, default):
        assert_bitwise_equal(got[0], on[0])
        assert_bitwise_equal(got[1], on[1])
    with pytest.raises(RuntimeError, match=f"{var} must be 0 or 1"):
        run_with(monkeypatch, inp, **{var: "yes"})


@requires_hopper
@DTYPES
@pytest.mark.parametrize(
    "num_heads_q,seq_len_q,page_block_size,causal",
    [(16, 1, 64, False), (16, 2, 64, True), (128, 1, 64, False), (128, 2, 64, True),
     (96, 1, 64, False), (64, 3, 64, True), (32, 8, 64, True), (64, 4, 128, True), (1, 1, 64, False)],
)  # fmt: skip
def test_hopper_and_portable_agree(monkeypatch, dtype, num_heads_q, seq_len_q, page_block_size, causal):
    """DeepSeek head dims (576/512), the shapes the Hopper kernel takes, h_q * s_q from 1 to 256
    (96, 192, 256: not multiples of the 64-row tile), varlen with an empty row, NaN past every
    length, shuffled pages: both kernels match the float64 reference and each other."""
    inp = make_decode_inputs(
        batch=5,
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        page_block_size=page_block_size,
        dtype=dtype,
        device="cuda",
        max_seqlen=1100,
        causal=causal,
        seed=seed_for("hopper-vs-portable", dtype, num_heads_q, seq_len_q, page_block_size, causal),
    )
    hopper = run_with(monkeypatch, inp, FLASHMLA_KERNEL="sm90")
    portable = run_with(monkeypatch, inp, FLASHMLA_KERNEL="portable")
    check_pair_against_reference(inp, hopper, portable)


@requires_hopper
@DTYPES
@pytest.mark.parametrize("page_block_size", [1, 16, 48, 100, 200])
@pytest.mark.parametrize(
    "num_heads_q,seq_len_q,head_dim,causal", [(16, 1, 576, False), (32, 2, 576, True), (128, 1, 512, False)]
)
def test_hopper_gather_pages(monkeypatch, dtype, page_block_size, num_heads_q, seq_len_q, head_dim, causal):
    """The Hopper kernel's cp.async gather (pages that are not a multiple of 64: divisors of its 64-token
    tile and pages that are not, so a tile crosses page ends at every offset), with both consumer
    schedules, against the portable kernel and the float64 reference: varlen lengths with a zero and a
    partial last page, NaN in every unused slot, sequences cut into pieces that start inside a page."""
    inp = cut_sequences_inputs(
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        head_dim=head_dim,
        page_block_size=page_block_size,
        dtype=dtype,
        causal=causal,
        seed=seed_for("hopper-gather-pages", dtype, page_block_size, num_heads_q, seq_len_q, head_dim),
    )
    portable = run_with(monkeypatch, inp, FLASHMLA_KERNEL="portable")
    for seesaw in ("0", "1"):
        hopper = run_with(monkeypatch, inp, FLASHMLA_KERNEL="sm90", FLASHMLA_SM90_SEESAW=seesaw)
        check_pair_against_reference(inp, hopper, portable)


@requires_hopper
@pytest.mark.parametrize(
    "num_heads_q,page_block_size,expected",
    [(16, 1, "portable"), (8, 2, "portable"), (32, 1, "sm90"), (16, 4, "sm90"), (16, 16, "sm90")],
)
def test_auto_kernel_choice_on_gather_pages(monkeypatch, num_heads_q, page_block_size, expected):
    """FLASHMLA_KERNEL=auto on shapes both kernels take: pages of 1-2 tokens with at most 16 query rows per
    KV head go to the portable kernel (mla_cuda.cu auto_prefers_portable), the rest to the Hopper kernel. The
    two kernels round differently, so auto's output equals the expected kernel's bit for bit."""
    inp = make_decode_inputs(
        batch=3,
        num_heads_q=num_heads_q,
        page_block_size=page_block_size,
        dtype=torch.bfloat16,
        device="cuda",
        max_seqlen=700,
        seed=seed_for("auto-choice", num_heads_q, page_block_size),
    )
    auto = run_with(monkeypatch, inp, FLASHMLA_KERNEL="auto")
    chosen = run_with(monkeypatch, inp, FLASHMLA_KERNEL=expected)
    other = run_with(monkeypatch, inp, FLASHMLA_KERNEL="sm90" if expected == "portable" else "portable")
    assert_bitwise_equal(auto[0], chosen[0])
    assert_bitwise_equal(auto[1], chosen[1])
    assert not (torch.equal(auto[0], other[0]) and torch.equal(auto[1], other[1])), (
        "the two kernels gave the same bits: the test cannot tell them apart"
    )


@requires_hopper
def test_hopper_refuses_other_shapes(monkeypatch):
    """FLASHMLA_KERNEL=sm90 on a shape the Hopper kernel does not take raises (auto falls back)."""
    inp = make_decode_inputs(
        batch=2, num_heads_q=4, head_dim=40, head_dim_v=32, page_block_size=16, device="cuda"
    )
    with pytest.raises(RuntimeError, match="FLASHMLA_KERNEL=sm90"):
        run_with(monkeypatch, inp, FLASHMLA_KERNEL="sm90")
    out, lse = run_with(monkeypatch, inp, FLASHMLA_KERNEL="auto")
    check_against_reference(inp, out, lse)


@DTYPES
@pytest.mark.parametrize("config", PORTABLE_CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize(
    "shape",
    [
        # odd: GQA groups, page 16, s_q 3 causal, head dims not multiples of 64 (unswizzled rows)
        {
            "num_heads_q": 6,
            "num_heads_k": 2,
            "seq_len_q": 3,
            "head_dim": 72,
            "head_dim_v": 40,
            "page_block_size": 16,
            "causal": True,
        },
        # DeepSeek dims, 48 rows (more rows than a 16/32-row block holds: several row tiles)
        {"num_heads_q": 24, "seq_len_q": 2, "page_block_size": 64, "causal": True},
    ],
    ids=["odd", "deepseek48"],
)
def test_every_portable_config(monkeypatch, dtype, config, shape):
    """Every configuration of the portable kernel is correct on any rows, not only those it is picked for."""
    inp = make_decode_inputs(
        batch=4,
        dtype=dtype,
        device="cuda",
        max_seqlen=300,
        seed=seed_for("portable-config", dtype, config, sorted(shape.items())),
        **shape,
    )
    out, lse = run_with(
        monkeypatch, inp, FLASHMLA_KERNEL="portable", FLASHMLA_PORTABLE_CONFIG=",".join(map(str, config))
    )
    check_against_reference(inp, out, lse)


@DTYPES
@pytest.mark.parametrize("page_block_size", [3, 48, 100, 128, 200])
@pytest.mark.parametrize(
    "num_heads_q,num_heads_k,head_dim,head_dim_v",
    [(16, 1, 576, 512), (64, 1, 576, 512), (32, 2, 576, 512), (8, 4, 128, 128), (8, 1, 40, 32)],
)
def test_portable_pages_that_do_not_divide_the_tile(
    monkeypatch, dtype, page_block_size, num_heads_q, num_heads_k, head_dim, head_dim_v
):
    """The portable kernel on pages that are not a divisor of its 32/64-token tile (smaller, larger, or
    neither), so a tile's rows start mid-page and cross page ends at every offset: varlen lengths with a
    zero and a partial last page, NaN in every unused slot, two sequences long enough to be cut into
    pieces that start inside a page. Rows of whole 64-channel groups (576, 128: the lean copy path, with
    one and several KV heads) and padded odd ones (40: copy_row)."""
    inp = cut_sequences_inputs(
        num_heads_q=num_heads_q,
        num_heads_k=num_heads_k,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        page_block_size=page_block_size,
        dtype=dtype,
        seed=seed_for("portable-pages", dtype, page_block_size, num_heads_q, num_heads_k, head_dim),
    )
    out, lse = run_with(monkeypatch, inp, FLASHMLA_KERNEL="portable")
    check_against_reference(inp, out, lse)


def test_portable_config_errors(monkeypatch):
    """A malformed or unknown FLASHMLA_PORTABLE_CONFIG raises and names the variable."""
    inp = make_decode_inputs(
        batch=2, num_heads_q=4, head_dim=40, head_dim_v=32, page_block_size=16, device="cuda"
    )
    for bad in ["4,2", "3,1,64,2", "1,1,64,2,6", "1,1,64,2,8,1", "1,1,64,2,8x", "2,1,64,2,4"]:
        with pytest.raises(RuntimeError, match="FLASHMLA_PORTABLE_CONFIG"):
            run_with(monkeypatch, inp, FLASHMLA_KERNEL="portable", FLASHMLA_PORTABLE_CONFIG=bad)


@pytest.mark.parametrize("kernel", ["auto", "portable"])
@pytest.mark.parametrize("num_heads_q", [16, 64, 128, 256])
def test_kv_evict_first_switch(monkeypatch, kernel, num_heads_q):
    """The L2 eviction hint on KV loads (FLASHMLA_KV_EVICT_FIRST; on by default up to 64 rows on the
    portable kernel, 128 on the Hopper kernel; forced on, the Hopper kernel takes it at any number of
    row tiles) changes no bit of the results: forced on and off give the same output and LSE, which
    match the reference. Any value but 0 and 1 raises."""
    inp = make_decode_inputs(
        batch=6,
        seq_len_q=1,
        num_heads_q=num_heads_q,
        dtype=torch.bfloat16,
        device="cuda",
        max_seqlen=3000,
        seed=seed_for("evict-first", kernel, num_heads_q),
    )
    check_switch_changes_no_bit(monkeypatch, inp, kernel, "FLASHMLA_KV_EVICT_FIRST")


@requires_hopper
@DTYPES
@pytest.mark.parametrize("num_heads_q,seq_len_q", [(16, 1), (64, 1), (128, 2)])
@pytest.mark.parametrize("softmax_scale", [None, 1.0], ids=["default-scale", "scale1"])
def test_hopper_lazy_rescale_threshold(monkeypatch, dtype, num_heads_q, seq_len_q, softmax_scale):
    """The Hopper kernel's lazy softmax rescale (FLASHMLA_RESCALE_THRESHOLD, log2 units, default 8): 0
    (rescale whenever a row maximum grows), the default and the largest allowed value (15) all match the
    float64 reference, also with softmax_scale=1 (scores spread over tens of log2 units, so maxima jump
    by more than the threshold mid-sequence and both branches run), in bf16 and fp16 (where P up to 2^15
    must stay finite); each is bitwise deterministic."""
    inp = make_decode_inputs(
        batch=5,
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        dtype=dtype,
        device="cuda",
        max_seqlen=2000,
        causal=seq_len_q > 1,
        softmax_scale=softmax_scale,
        seed=seed_for("lazy-rescale", dtype, num_heads_q, seq_len_q, softmax_scale),
    )
    ref = inp.reference()
    ref_low = inp.reference(compute_dtype=None)
    results = {}
    for threshold in ("0", "", "15"):
        results[threshold] = run_with(
            monkeypatch, inp, FLASHMLA_KERNEL="sm90", FLASHMLA_RESCALE_THRESHOLD=threshold
        )
        check_against_reference(inp, *results[threshold], ref=ref, ref_low=ref_low)
    assert_kernels_agree(inp, results[""], results["0"], ref, ref_low)
    again = run_with(monkeypatch, inp, FLASHMLA_KERNEL="sm90", FLASHMLA_RESCALE_THRESHOLD="")
    assert_bitwise_equal(again[0], results[""][0])
    assert_bitwise_equal(again[1], results[""][1])


def test_rescale_threshold_errors(monkeypatch):
    """A bad FLASHMLA_RESCALE_THRESHOLD raises and names the variable, on any CUDA kernel."""
    inp = make_decode_inputs(
        batch=2, num_heads_q=4, head_dim=40, head_dim_v=32, page_block_size=16, device="cuda"
    )
    for bad in ("-1", "16", "eight", "8x", "nan"):
        with pytest.raises(RuntimeError, match=r"FLASHMLA_RESCALE_THRESHOLD must be a number in \[0, 15\]"):
            run_with(monkeypatch, inp, FLASHMLA_RESCALE_THRESHOLD=bad)


@pytest.mark.parametrize("kernel", ["auto", "portable"])
@pytest.mark.parametrize("num_heads_q,head_dim_v", [(16, 512), (64, 512), (128, 512), (16, 96)])
def test_partials_in_l2_switch(monkeypatch, kernel, num_heads_q, head_dim_v):
    """Partial results kept in L2 (evict-last stores, discarded by the combine kernel once read;
    FLASHMLA_PARTIALS_L2, on by default, Hopper kernel only) change no bit: on and off give the same
    output and LSE, which match the reference, on a batch whose sequences are cut into many pieces, at
    one and two row tiles per KV head (and, where auto picks the portable kernel: head_dim_v 96 or a
    non-Hopper GPU, the switch must not matter either). A bad value raises."""
    inp = make_decode_inputs(
        batch=6,
        seq_len_q=1,
        num_heads_q=num_heads_q,
        head_dim_v=head_dim_v,
        dtype=torch.bfloat16,
        device="cuda",
        max_seqlen=3000,
        seed=seed_for("partials-l2", kernel, num_heads_q, head_dim_v),
    )
    check_switch_changes_no_bit(monkeypatch, inp, kernel, "FLASHMLA_PARTIALS_L2")


@pytest.mark.parametrize("bad", ["num_blocks", "negative", "junk"])
@pytest.mark.parametrize("num_heads_q,page_block_size", [(16, 64), (128, 64), (128, 16)])
@pytest.mark.parametrize("kernel", ["sm90", "portable"])
def test_out_of_range_blocks_skipped_on_deepseek_shapes(
    monkeypatch, kernel, num_heads_q, page_block_size, bad
):
    """Both CUDA kernels on the DeepSeek head dims (576/512) skip the tokens of a live block id
    outside [0, num_blocks). Hopper kernel on 64-token pages (TMA; split schedule at 16 query rows,
    seesaw at 128): the out-of-bounds box reads zeros and the valid flags mask the tokens (a whole
    64-token tile, which the unmasked-tile path must not take); on 16-token pages its cp.async
    gather reads nothing for them; the portable kernel likewise. Sequence 0 loses its first page,
    1 a middle one, 2 its last, partly filled one; 3 keeps all. Without the causal mask that equals
    the sequences with those pages taken out of the table, which the float64 reference gives."""
    if kernel == "sm90" and not hopper_available():
        pytest.skip("needs an sm_90 GPU and the sm_90a build")
    page = page_block_size
    inp = make_decode_inputs(
        batch=4,
        num_heads_q=num_heads_q,
        page_block_size=page,
        dtype=torch.bfloat16,
        device="cuda",
        lengths=[300, 640, 200, 64],
        max_seqlen=640,
        seed=seed_for("out-of-range-blocks", kernel, num_heads_q, page, bad),
    )
    bad_id = {"num_blocks": inp.k_cache.shape[0], "negative": -1, "junk": JUNK_BLOCK_ID}[bad]
    lens = inp.lengths()
    dropped = {0: 0, 1: 3, 2: (lens[2] - 1) // page}  # sequence -> the table column made invalid
    table = inp.block_table.clone()
    kept = inp.block_table.clone()
    for i, col in dropped.items():
        table[i, col] = bad_id
        kept[i, col:-1] = inp.block_table[i, col + 1 :]
        lens[i] -= min(page, lens[i] - col * page)
    assert lens[2] % page == 0 and lens[1] == 640 - page
    out, lse = run_with(monkeypatch, dataclasses.replace(inp, block_table=table), FLASHMLA_KERNEL=kernel)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    expect = dataclasses.replace(
        inp, block_table=kept, cache_seqlens=torch.tensor(lens, dtype=torch.int32, device="cuda")
    )
    check_against_reference(expect, out, lse)


@requires_hopper
@DTYPES
@pytest.mark.parametrize(
    "num_heads_q,seq_len_q,head_dim,page_block_size,causal,softmax_scale",
    [(128, 1, 576, 64, False, None), (128, 2, 576, 64, True, None), (64, 1, 576, 64, False, 1.0),
     (96, 1, 576, 128, False, None), (16, 3, 576, 16, True, None), (128, 1, 512, 64, False, None),
     (32, 1, 512, 32, False, 1.0), (1, 1, 576, 64, False, None)],
)  # fmt: skip
def test_hopper_schedules_agree(
    monkeypatch, dtype, num_heads_q, seq_len_q, head_dim, page_block_size, causal, softmax_scale
):
    """The Hopper kernel's two consumer schedules (FLASHMLA_SM90_SEESAW: seesaw = each warpgroup the
    scores of every other 64-token tile; 0 = both split each tile by tokens) on the same inputs: varlen
    with an empty row and odd tile counts (a last pair of one tile), NaN past every length, TMA pages
    (64, 128) and cp.async gathers (16, 32), head_dim 576 (P in the dead rope slice) and 512 (P slots of
    their own), causal s_q > 1, softmax_scale=1 (maxima jump mid-sequence: the lazy rescale's moves on
    both warpgroups). Both match the float64 reference and each other; the seesaw is bitwise
    deterministic; the default is the seesaw above 64 query rows on TMA pages, else split; a bad value
    raises."""
    inp = make_decode_inputs(
        batch=6,
        seq_len_q=seq_len_q,
        num_heads_q=num_heads_q,
        head_dim=head_dim,
        page_block_size=page_block_size,
        dtype=dtype,
        device="cuda",
        max_seqlen=1500,
        causal=causal,
        softmax_scale=softmax_scale,
        seed=seed_for("sm90-schedules", dtype, num_heads_q, seq_len_q, head_dim, page_block_size, causal),
    )
    seesaw = run_with(monkeypatch, inp, FLASHMLA_KERNEL="sm90", FLASHMLA_SM90_SEESAW="1")
    split = run_with(monkeypatch, inp, FLASHMLA_KERNEL="sm90", FLASHMLA_SM90_SEESAW="0")
    check_pair_against_reference(inp, seesaw, split)
    again = run_with(monkeypatch, inp, FLASHMLA_KERNEL="sm90", FLASHMLA_SM90_SEESAW="1")
    assert_bitwise_equal(again[0], seesaw[0])
    assert_bitwise_equal(again[1], seesaw[1])
    # Unset: the seesaw above 64 query rows per KV head (mla_cuda.cu kSeesawMinRows) on TMA pages, else split.
    default = run_with(monkeypatch, inp, FLASHMLA_KERNEL="sm90", FLASHMLA_SM90_SEESAW="")
    expected = seesaw if num_heads_q * seq_len_q > 64 and page_block_size % 64 == 0 else split
    assert_bitwise_equal(default[0], expected[0])
    assert_bitwise_equal(default[1], expected[1])
    with pytest.raises(RuntimeError, match="FLASHMLA_SM90_SEESAW must be 0 or 1"):
        run_with(monkeypatch, inp, FLASHMLA_SM90_SEESAW="2")
