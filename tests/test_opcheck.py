"""torch.library.opcheck on every operator, dtype and device we support (DESIGN.md §3).

opcheck runs all its default test_utils: test_schema (no undeclared mutation or aliasing),
test_autograd_registration, test_faketensor (the fake agrees with the kernel's output metadata) and
test_aot_dispatch_dynamic (the op traces under AOTAutograd with dynamic shapes).

The inputs are the usual poisoned ones: NaN in dead cache slots works here because the kernels
never read those slots, so every output opcheck compares is NaN-free, and test_schema's check for
mutated inputs compares NaN with NaN as equal. (If that ever changed, the builder's poison=False
gives finite junk instead.)
"""

import pytest
import torch

import flashmla_ops
from helpers import DEVICES, device_dtype_params, make_decode_inputs, num_threads, seed_for

# (num_heads_k, page_block_size, seq_len_q, causal, lengths): every value of each parameter
# appears, and with others, instead of the full product (opcheck is slow-ish on 2 cores).
CASES = [
    pytest.param(1, 1, 1, False, None, id="hk1-page1-sq1"),
    pytest.param(2, 16, 2, True, None, id="hk2-page16-sq2-causal"),
    pytest.param(1, 64, 5, True, [0, 3, 64, 129], id="hk1-page64-sq5-causal-short"),
    pytest.param(2, 1, 5, False, None, id="hk2-page1-sq5"),
    pytest.param(1, 16, 2, False, [17, 0, 1, 40], id="hk1-page16-sq2"),
    pytest.param(2, 64, 1, True, None, id="hk2-page64-sq1-causal"),
]


def small_inputs(device, dtype, num_heads_k, page_block_size, seq_len_q, causal, lengths):
    return make_decode_inputs(
        batch=4,
        seq_len_q=seq_len_q,
        num_heads_q=2 * num_heads_k,
        num_heads_k=num_heads_k,
        head_dim=40,
        head_dim_v=32,
        page_block_size=page_block_size,
        dtype=dtype,
        device=device,
        max_seqlen=150,
        lengths=lengths,
        causal=causal,
        seed=seed_for("opcheck", device, dtype, num_heads_k, page_block_size, seq_len_q, causal),
    )


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("num_heads_k,page_block_size,seq_len_q,causal,lengths", CASES)
def test_opcheck_fwd_kvcache_mla(device, dtype, num_heads_k, page_block_size, seq_len_q, causal, lengths):
    inp = small_inputs(device, dtype, num_heads_k, page_block_size, seq_len_q, causal, lengths)
    assert 0 in inp.lengths() and any(n % page_block_size for n in inp.lengths()) or page_block_size == 1
    torch.library.opcheck(torch.ops.flashmla.fwd_kvcache_mla.default, inp.op_args())


@pytest.mark.parametrize(
    "device,dtype", device_dtype_params(cpu_dtypes=[torch.bfloat16], cuda_dtypes=[torch.bfloat16])
)
def test_opcheck_fwd_kvcache_mla_deepseek(device, dtype):
    inp = make_decode_inputs(
        batch=3,
        seq_len_q=2,
        num_heads_q=16,
        dtype=dtype,
        device=device,
        max_seqlen=130,
        causal=True,
        seed=seed_for("opcheck-ds", device, dtype),
    )
    torch.library.opcheck(torch.ops.flashmla.fwd_kvcache_mla.default, inp.op_args())


@pytest.mark.parametrize(
    "device,dtype", device_dtype_params(cpu_dtypes=[torch.float32], cuda_dtypes=[torch.bfloat16])
)
def test_opcheck_fwd_kvcache_mla_other_num_sm_parts(device, dtype):
    """Metadata with another worker count than the device's own is a valid input too (§2)."""
    inp = small_inputs(device, dtype, 2, 16, 2, True, None)
    if device == "cpu":
        with num_threads(5):
            metadata = inp.metadata()
        assert metadata[0].shape[0] == 5
    else:
        # The CUDA worker count comes from the SM count; CPU-built metadata of 5 workers, moved to the
        # GPU, describes the same lengths.
        with num_threads(5):
            md, splits = make_cpu_metadata(inp)
        metadata = (md.to(device), splits.to(device))
    torch.library.opcheck(torch.ops.flashmla.fwd_kvcache_mla.default, inp.op_args(metadata))


def make_cpu_metadata(inp):
    return flashmla_ops.get_mla_metadata(inp.cache_seqlens.cpu(), inp.num_heads_per_head_k, inp.num_heads_k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "lengths,num_heads_per_head_k,num_heads_k",
    [
        ([0, 5, 64, 65, 300], 16, 1),
        ([1], 128, 1),
        ([7, 0, 0], 10, 2),
        ([4096, 1, 8191, 0], 256, 1),
    ],
)
def test_opcheck_get_mla_metadata(device, lengths, num_heads_per_head_k, num_heads_k):
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    torch.library.opcheck(
        torch.ops.flashmla.get_mla_metadata.default, (lens, num_heads_per_head_k, num_heads_k)
    )
