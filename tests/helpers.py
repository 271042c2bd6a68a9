"""Shared input builders and comparison helpers for the flashmla_ops tests.

`make_decode_inputs` builds the adversarial decode inputs every test uses (DESIGN.md §2):
lengths drawn at random, including 0 and non-multiples of the page size; a block table that is a
shuffled permutation of block ids, whose entries past each sequence's last live block are junk
(in-range ids of other sequences' blocks and 2147480000); and a cache whose slots that hold no
live token are NaN, so that any read of a dead slot poisons the result.
"""

import contextlib
import dataclasses
import math
from typing import List, Optional, Sequence

import pytest
import torch

import flashmla_ops
from flashmla_ops.reference import mla_decode_reference

JUNK_BLOCK_ID = 2147480000  # what FlashMLA's own tests put in unused block-table entries

LOW_PRECISION = (torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------
# Devices and dtypes
# ----------------------------------------------------------------------------------------------


def cuda_usable() -> bool:
    return torch.cuda.is_available() and flashmla_ops.build_info()["cuda"]


requires_cuda = pytest.mark.skipif(
    not cuda_usable(), reason="needs a CUDA GPU and flashmla_ops built with its CUDA kernels"
)

CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])
DEVICES = ["cpu", CUDA]


def dtypes_for(device: str) -> List[torch.dtype]:
    """The dtypes a device's kernel supports: fp32 only on CPU."""
    if device == "cuda":
        return [torch.bfloat16, torch.float16]
    return [torch.float32, torch.bfloat16, torch.float16]


def device_dtype_params(cpu_dtypes=None, cuda_dtypes=None):
    """pytest params of (device, dtype) pairs, the CUDA ones marked to skip without a GPU."""
    cpu_dtypes = dtypes_for("cpu") if cpu_dtypes is None else cpu_dtypes
    cuda_dtypes = dtypes_for("cuda") if cuda_dtypes is None else cuda_dtypes
    params = [pytest.param("cpu", dt, id=f"cpu-{dtype_name(dt)}") for dt in cpu_dtypes]
    params += [
        pytest.param("cuda", dt, id=f"cuda-{dtype_name(dt)}", marks=[pytest.mark.cuda, requires_cuda])
        for dt in cuda_dtypes
    ]
    return params


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def seed_for(*parts) -> int:
    """A stable seed from a test's parameters (Python's hash() of str is salted per process)."""
    text = "|".join(str(p) for p in parts)
    seed = 0
    for ch in text.encode():
        seed = (seed * 131 + ch) % (2**31 - 1)
    return seed


@contextlib.contextmanager
def num_threads(n: int):
    """Temporarily sets torch's intra-op thread count (on CPU, the metadata's num_sm_parts)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DecodeInputs:
    q: torch.Tensor  # (batch, seq_len_q, num_heads_q, head_dim)
    k_cache: torch.Tensor  # (num_blocks, page_block_size, num_heads_k, head_dim)
    block_table: torch.Tensor  # (batch, max_num_blocks_per_seq) int32
    cache_seqlens: torch.Tensor  # (batch,) int32
    head_dim_v: int
    causal: bool = False
    softmax_scale: Optional[float] = None

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def seq_len_q(self) -> int:
        return self.q.shape[1]

    @property
    def num_heads_q(self) -> int:
        return self.q.shape[2]

    @property
    def num_heads_k(self) -> int:
        return self.k_cache.shape[2]

    @property
    def page_block_size(self) -> int:
        return self.k_cache.shape[1]

    @property
    def num_heads_per_head_k(self) -> int:
        return self.seq_len_q * self.num_heads_q // self.num_heads_k

    @property
    def scale(self) -> float:
        return self.q.shape[-1] ** -0.5 if self.softmax_scale is None else self.softmax_scale

    def lengths(self) -> List[int]:
        return self.cache_seqlens.tolist()

    def to(self, device) -> "DecodeInputs":
        return dataclasses.replace(
            self,
            q=self.q.to(device),
            k_cache=self.k_cache.to(device),
            block_table=self.block_table.to(device),
            cache_seqlens=self.cache_seqlens.to(device),
        )

    def metadata(self):
        return flashmla_ops.get_mla_metadata(self.cache_seqlens, self.num_heads_per_head_k, self.num_heads_k)

    def run(self, metadata=None):
        """The kernel: flash_mla_with_kvcache with metadata built now (or the given one)."""
        md, splits = self.metadata() if metadata is None else metadata
        return flashmla_ops.flash_mla_with_kvcache(
            self.q,
            self.k_cache,
            self.block_table,
            self.cache_seqlens,
            self.head_dim_v,
            md,
            splits,
            softmax_scale=self.softmax_scale,
            causal=self.causal,
        )

    def op_args(self, metadata=None):
        """Positional arguments of torch.ops.flashmla.fwd_kvcache_mla."""
        md, splits = self.metadata() if metadata is None else metadata
        return (
            self.q,
            self.k_cache,
            None,
            self.head_dim_v,
            self.cache_seqlens,
            self.block_table,
            float(self.scale),
            self.causal,
            md,
            splits,
        )

    def reference(self, compute_dtype: Optional[torch.dtype] = torch.float64):
        return mla_decode_reference(
            self.q,
            self.k_cache,
            self.block_table,
            self.cache_seqlens,
            self.head_dim_v,
            softmax_scale=self.softmax_scale,
            causal=self.causal,
            compute_dtype=compute_dtype,
        )

    def visible_counts(self) -> torch.Tensor:
        """(batch, num_heads_q, seq_len_q) int64: how many tokens each query row sees (§2)."""
        lens = self.cache_seqlens.to("cpu", torch.int64)[:, None]
        s_q = self.seq_len_q
        if self.causal:
            j = torch.arange(s_q)[None, :]
            counts = (lens - s_q + j + 1).clamp(min=0).minimum(lens)
        else:
            counts = lens.expand(-1, s_q)
        return counts[:, None, :].expand(-1, self.num_heads_q, -1).contiguous()


def make_decode_inputs(
    batch: int = 3,
    seq_len_q: int = 1,
    num_heads_q: int = 16,
    num_heads_k: int = 1,
    head_dim: int = 576,
    head_dim_v: int = 512,
    page_block_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    max_seqlen: int = 200,
    lengths: Optional[Sequence[int]] = None,
    causal: bool = False,
    softmax_scale: Optional[float] = None,
    seed: Optional[int] = None,
    poison: bool = True,
    include_zero_length: bool = True,
    spare_blocks: int = 3,
    extra_table_columns: int = 1,
) -> DecodeInputs:
    """Random decode inputs (see the module docstring).

    lengths: explicit lengths, else drawn in [0, max_seqlen] with one 0 (if include_zero_length and
        batch >= 2), one max_seqlen and at least one that is not a multiple of the page size.
    poison: fill the cache slots that hold no live token with NaN; with poison=False they hold large
        finite junk instead (for checks that compare tensors with == and so cannot take NaN).
    The block table has ceil(max_seqlen / page) + extra_table_columns columns (independent of the
    drawn lengths, so shapes depend only on the arguments and the batch size); the cache holds the
    live blocks plus `spare_blocks` unused ones (>= 2 blocks in all, so no size is 0 or 1 when
    compiled with dynamic shapes).
    """
    gen = torch.Generator().manual_seed(0 if seed is None else seed)
    page = page_block_size
    if lengths is None:
        lens = torch.randint(0, max_seqlen + 1, (batch,), generator=gen).tolist()
        if batch >= 2:
            lens[-1] = max_seqlen
        if include_zero_length and batch >= 2:
            lens[0] = 0
        if batch >= 3 and all(n % page == 0 for n in lens):  # keep a partial last block around
            lens[1] = max(1, max_seqlen - 1) if max_seqlen % page != 1 else max_seqlen - 2
    else:
        lens = [int(n) for n in lengths]
        assert len(lens) == batch
    max_blocks_per_seq = max(1, math.ceil(max(lens + [max_seqlen]) / page) + extra_table_columns)
    live_blocks = [math.ceil(n / page) for n in lens]
    num_blocks = max(2, sum(live_blocks) + spare_blocks)

    # Shuffled block ids: the live blocks of all sequences get a random permutation of the ids.
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.empty(batch, max_blocks_per_seq, dtype=torch.int32)
    live_mask = torch.zeros(num_blocks, page, dtype=torch.bool)  # slots that hold a live token
    next_id = 0
    for i, n in enumerate(lens):
        for j in range(max_blocks_per_seq):
            if j < live_blocks[i]:
                block = int(perm[next_id])
                next_id += 1
                block_table[i, j] = block
                live_mask[block, : min(page, n - j * page)] = True
            elif (i + j) % 2 == 0:  # junk past the end: a far-out-of-range id ...
                block_table[i, j] = JUNK_BLOCK_ID
            else:  # ... or an in-range id (some other sequence's block, or a spare one)
                block_table[i, j] = int(torch.randint(0, num_blocks, (1,), generator=gen))

    head_dims = (num_blocks, page, num_heads_k, head_dim)
    k_cache = torch.randn(head_dims, generator=gen, dtype=torch.float32)
    dead = ~live_mask[:, :, None, None].expand(head_dims)
    if poison:
        k_cache[dead] = float("nan")
    else:
        k_cache[dead] = 1e4 * torch.randn(int(dead.sum()), generator=gen)  # finite, but would dominate
    q = torch.randn(batch, seq_len_q, num_heads_q, head_dim, generator=gen, dtype=torch.float32)
    return DecodeInputs(
        q=q.to(device=device, dtype=dtype),
        k_cache=k_cache.to(device=device, dtype=dtype),
        block_table=block_table.to(device),
        cache_seqlens=torch.tensor(lens, dtype=torch.int32, device=device),
        head_dim_v=head_dim_v,
        causal=causal,
        softmax_scale=softmax_scale,
    )


# ----------------------------------------------------------------------------------------------
# Comparisons
# ----------------------------------------------------------------------------------------------


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def rounding_slack(dtype: torch.dtype, magnitude: float) -> float:
    """About one to two units in the last place of `dtype` at `magnitude` (FlashAttention's fwd_atol)."""
    return torch.finfo(dtype).eps * magnitude


def check_empty_rows(inp: DecodeInputs, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Rows that see tokens: finite lse. Rows that see none: lse exactly +inf, out exactly 0."""
    seen = inp.visible_counts() > 0  # (b, h_q, s_q)
    lse = lse.cpu()
    out = out.cpu()
    assert torch.isfinite(lse[seen]).all(), "softmax_lse must be finite where a row sees tokens"
    assert (lse[~seen] == float("inf")).all(), "softmax_lse must be +inf where a row sees no token"
    empty_out = out.permute(0, 2, 1, 3)[~seen]  # out is (b, s_q, h_q, dv)
    assert (empty_out == 0).all(), "out must be exactly 0 where a row sees no token"
    assert not torch.isnan(out).any(), "out must not contain NaN (dead cache slots were read)"


def check_against_reference(
    inp: DecodeInputs, out: torch.Tensor, lse: torch.Tensor, ref=None, ref_low=None
) -> None:
    """Compares a kernel's (out, lse) with the float64 reference (see tests/test_correctness.py).

    fp32: max |out - ref| <= 1e-5 * max |ref| (+1e-7), lse to 1e-5 relative.
    bf16/fp16, FlashAttention-style: max |out - ref| <= 2 * max |ref_low - ref| + rounding slack,
    ref_low being the same reference computed entirely in the low precision.
    """
    assert out.shape == (inp.batch, inp.seq_len_q, inp.num_heads_q, inp.head_dim_v)
    assert lse.shape == (inp.batch, inp.num_heads_q, inp.seq_len_q)
    assert out.dtype == inp.q.dtype and lse.dtype == torch.float32
    assert out.device == inp.q.device and lse.device == inp.q.device
    check_empty_rows(inp, out, lse)
    ref_out, ref_lse = inp.reference() if ref is None else ref
    seen = inp.visible_counts() > 0
    lse_c, ref_lse_c = lse.cpu().double(), ref_lse.cpu().double()
    lse_err = (lse_c[seen] - ref_lse_c[seen]).abs()
    lse_mag = ref_lse_c[seen].abs() + 1.0
    out_err = max_abs(out, ref_out)
    ref_mag = ref_out.abs().max().item() if ref_out.numel() else 0.0
    if inp.q.dtype == torch.float32:
        assert out_err <= 1e-5 * ref_mag + 1e-7, f"fp32 out error {out_err:.3g} vs max |ref| {ref_mag:.3g}"
        assert (lse_err <= 1e-5 * lse_mag).all(), f"fp32 lse error {lse_err.max().item():.3g}"
        return
    low_out, _ = inp.reference(compute_dtype=None) if ref_low is None else ref_low
    low_err = max_abs(low_out, ref_out)
    bound = 2 * low_err + rounding_slack(inp.q.dtype, max(ref_mag, 1e-3))
    assert out_err <= bound, (
        f"{dtype_name(inp.q.dtype)} out error {out_err:.4g} exceeds 2 x low-precision reference error "
        f"{low_err:.4g} + slack (bound {bound:.4g})"
    )
    # The scores are products of exactly representable low-precision values accumulated in fp32:
    # lse is as accurate as in fp32 up to accumulation order.
    assert (lse_err <= 2e-4 * lse_mag).all(), f"lse error {lse_err.max().item():.3g}"


def assert_kernels_agree(inp: DecodeInputs, a, b, ref, ref_low) -> None:
    """Two kernels' (out, lse) on the same inputs agree with the FlashAttention-style bound of
    check_against_reference (twice the low-precision reference error plus rounding, b standing in for
    the reference); rows that see no token have identical lse, the others agree to 2e-4 relative."""
    low_err = max_abs(ref_low[0], ref[0])
    bound = 2 * low_err + rounding_slack(inp.q.dtype, ref[0].abs().max().item() if ref[0].numel() else 1.0)
    assert max_abs(a[0], b[0]) <= bound
    seen = inp.visible_counts().to(a[1].device) > 0
    assert torch.equal(a[1][~seen], b[1][~seen])
    if seen.any():
        assert max_abs(a[1][seen], b[1][seen]) <= 2e-4 * (b[1][seen].abs().max().item() + 1)


def check_pair_against_reference(inp: DecodeInputs, a, b) -> None:
    """Two kernels' (out, lse) on the same inputs: each against the float64 reference (with the
    low-precision reference's bound, check_against_reference), and against each other
    (assert_kernels_agree)."""
    ref = inp.reference()
    ref_low = inp.reference(compute_dtype=None)
    check_against_reference(inp, *a, ref=ref, ref_low=ref_low)
    check_against_reference(inp, *b, ref=ref, ref_low=ref_low)
    assert_kernels_agree(inp, a, b, ref, ref_low)


def check_schedule_invariants(md: torch.Tensor, splits: torch.Tensor, lengths) -> None:
    """The layout of csrc/schedule.h: every token of every sequence is covered exactly once. Checked on
    token ranges, so lengths near INT_MAX cost no more than short ones: in worker order, the pieces of a
    sequence are numbered 0, 1, ... and each starts where the one before it ended, from 0 to its length
    (a negative length counts as 0)."""
    md, splits = md.tolist(), splits.tolist()
    batch = len(lengths)
    live = [max(int(n), 0) for n in lengths]
    assert splits[0] == 0
    assert all(splits[i + 1] - splits[i] >= 1 for i in range(batch))
    assert splits[batch] <= batch + len(md) - 1
    pieces = [0] * batch
    covered_to = [0] * batch  # where the next piece of each sequence must start
    for begin_b, begin_t, end_b, end_t, begin_split, *rest in md:
        assert rest == [0, 0, 0]
        for b in range(begin_b, end_b + 1):
            t0 = begin_t if b == begin_b else 0
            t1 = end_t if b == end_b else live[b]
            assert t0 == covered_to[b] and t0 <= t1 <= live[b], "a token is missed or covered twice"
            assert (begin_split if b == begin_b else 0) == pieces[b]
            pieces[b] += 1
            covered_to[b] = t1
    assert covered_to == live, "a sequence's tail is not covered"
    assert pieces == [splits[i + 1] - splits[i] for i in range(batch)]


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    # View as integers so that NaN == NaN and -0.0 != +0.0 count as the bits they are.
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.contiguous().view(int_dtype), b.contiguous().view(int_dtype)), "not bitwise equal"
