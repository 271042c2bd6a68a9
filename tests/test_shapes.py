"""The Python fakes (flashmla_ops/fake.py) give the same outputs' metadata as the real kernels.

For many shapes, each op is run for real and under FakeTensorMode on fakes of the same inputs; the
outputs must agree in shape, dtype, device and strides. The metadata's num_sm_parts, computed in
Python by flashmla_ops.fake.num_sm_parts, must equal the size(0) the kernel returns.
"""

import itertools

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import flashmla_ops
import flashmla_ops.fake
from helpers import DEVICES, device_dtype_params, make_decode_inputs, num_threads, seed_for


def run_fake(op, args):
    """Runs `op` under a fresh FakeTensorMode on fakes of the tensors in `args`."""
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return op(*fake_args)


def assert_same_meta(real, fake):
    assert len(real) == len(fake)
    for r, f in zip(real, fake):
        assert tuple(f.shape) == tuple(r.shape), (f.shape, r.shape)
        assert f.dtype == r.dtype
        assert f.device == r.device
        assert f.stride() == r.stride()


# (batch, seq_len_q, num_heads_q, num_heads_k, head_dim, head_dim_v, page_block_size, max_seqlen)
FWD_SHAPES = [
    (1, 1, 16, 1, 576, 512, 64, 100),
    (4, 2, 128, 1, 576, 512, 64, 200),
    (3, 1, 64, 1, 576, 512, 64, 65),
    (2, 5, 6, 2, 40, 32, 16, 50),
    (5, 3, 4, 4, 40, 40, 1, 20),
    (3, 2, 3, 1, 8, 1, 7, 30),
    (7, 1, 1, 1, 64, 16, 64, 1),
    (2, 4, 130, 2, 72, 64, 32, 90),  # more rows per KV head than one CUDA worker tile holds
]


@pytest.mark.parametrize("device,dtype", device_dtype_params())
@pytest.mark.parametrize("shape", FWD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
def test_fwd_fake_matches_kernel(device, dtype, shape, causal):
    b, s_q, h_q, h_k, d, dv, page, max_len = shape
    inp = make_decode_inputs(
        batch=b,
        seq_len_q=s_q,
        num_heads_q=h_q,
        num_heads_k=h_k,
        head_dim=d,
        head_dim_v=dv,
        page_block_size=page,
        dtype=dtype,
        device=device,
        max_seqlen=max_len,
        causal=causal,
        seed=seed_for("shapes", device, dtype, shape, causal),
    )
    op = torch.ops.flashmla.fwd_kvcache_mla.default
    args = inp.op_args()
    real = op(*args)
    fake = run_fake(op, args)
    assert_same_meta(real, fake)
    assert tuple(real[0].shape) == (b, s_q, h_q, dv) and tuple(real[1].shape) == (b, h_q, s_q)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 2, 9, 130])
@pytest.mark.parametrize(
    "num_heads_per_head_k,num_heads_k",
    [(1, 1), (16, 1), (64, 1), (65, 1), (128, 1), (256, 1), (10, 2), (128, 2), (300, 3)],
)
def test_metadata_fake_matches_kernel(device, batch, num_heads_per_head_k, num_heads_k):
    lens = torch.arange(batch, dtype=torch.int32, device=device) * 37 % 500
    op = torch.ops.flashmla.get_mla_metadata.default
    real = op(lens, num_heads_per_head_k, num_heads_k)
    fake = run_fake(op, (lens, num_heads_per_head_k, num_heads_k))
    assert_same_meta(real, fake)
    parts = flashmla_ops.fake.num_sm_parts(lens.device, num_heads_per_head_k, num_heads_k)
    assert real[0].shape == (parts, 8)
    assert real[1].shape == (batch + 1,)


@pytest.mark.parametrize("threads", [1, 2, 3, 7, 16])
def test_cpu_num_sm_parts_is_thread_count(threads):
    lens = torch.tensor([0, 100, 3], dtype=torch.int32)
    with num_threads(threads):
        md, splits = flashmla_ops.get_mla_metadata(lens, 16, 1)
        fake = run_fake(torch.ops.flashmla.get_mla_metadata.default, (lens, 16, 1))
        parts = flashmla_ops.fake.num_sm_parts(torch.device("cpu"), 16, 1)
    assert parts == threads
    assert md.shape == fake[0].shape == (threads, 8)
    assert splits.shape == fake[1].shape == (4,)


@pytest.mark.parametrize("device", DEVICES)
def test_metadata_shape_does_not_depend_on_lengths(device):
    """The metadata's shape depends only on shapes and the device, never on the length values."""
    shapes = set()
    for lengths in ([0, 0, 0], [1, 2, 3], [5000, 0, 70000], [64, 128, 192]):
        lens = torch.tensor(lengths, dtype=torch.int32, device=device)
        md, splits = flashmla_ops.get_mla_metadata(lens, 64, 1)
        shapes.add((tuple(md.shape), tuple(splits.shape)))
    assert len(shapes) == 1


@pytest.mark.parametrize("device", DEVICES)
def test_fake_under_symbolic_batch(device):
    """The fakes work with a symbolic batch (as under torch.compile(dynamic=True) / export)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    inp = make_decode_inputs(
        batch=3,
        seq_len_q=2,
        num_heads_q=4,
        num_heads_k=2,
        head_dim=40,
        head_dim_v=32,
        page_block_size=16,
        dtype=torch.bfloat16,
        device=device,
        max_seqlen=40,
        seed=seed_for("symbolic", device),
    )
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    with FakeTensorMode(shape_env=ShapeEnv()) as mode:

        def dyn(t):
            ctx = StatelessSymbolicContext(
                dynamic_sizes=[DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (t.dim() - 1)
            )
            return mode.from_tensor(t, symbolic_context=ctx, source=ConstantSource(f"t{id(t)}"))

        q, table, lens = dyn(inp.q), dyn(inp.block_table), dyn(inp.cache_seqlens)
        k_cache = mode.from_tensor(inp.k_cache)
        md, splits = torch.ops.flashmla.get_mla_metadata.default(
            lens, inp.num_heads_per_head_k, inp.num_heads_k
        )
        out, lse = torch.ops.flashmla.fwd_kvcache_mla.default(
            q, k_cache, None, 32, lens, table, 0.1, True, md, splits
        )
    assert isinstance(out.shape[0], torch.SymInt) and isinstance(lse.shape[0], torch.SymInt)
    assert isinstance(splits.shape[0], torch.SymInt)
    assert out.shape[1:] == (2, 4, 32) and lse.shape[1:] == (4, 2)
    assert out.shape[0].node.expr == q.shape[0].node.expr
    assert splits.shape[0].node.expr == (q.shape[0] + 1).node.expr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_num_sm_parts_cuda_formula():
    """flashmla_ops.fake.num_sm_parts on CUDA: SM count / (num_heads_k * ceil(rows / 64)), at least 1
    (the rule documented in get_mla_metadata's docstring; the kernel's agreement is checked above)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dev = torch.device("cuda", 0)
    for rows, hk in itertools.product([1, 64, 65, 128, 129, 256, 100000], [1, 2, 3]):
        want = max(1, sms // (hk * -(-rows // 64)))
        assert flashmla_ops.fake.num_sm_parts(dev, rows, hk) == want
