"""The ops trace: torch.compile(fullgraph=True) with aot_eager and inductor, dynamic batch without
recompiles, torch.export (also with a dynamic batch, and run where the worker count differs from
the one at export time), and the schemas pinned with expecttest.
"""

import io
import unittest

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import flashmla_ops
from helpers import DEVICES, device_dtype_params, make_decode_inputs, num_threads, seed_for

try:
    import expecttest

    SchemaTestCase = expecttest.TestCase
except ImportError:  # the GPU machine's image has no expecttest: compare the same strings plainly

    class SchemaTestCase(unittest.TestCase):
        def assertExpectedInline(self, actual, expect, skip=0):
            self.assertEqual(actual, expect)


# Small odd shapes that still hit every path: 2 KV heads, seq_len_q 2 (causal), page 16.
S_Q, H_Q, H_K, D, DV, PAGE = 2, 4, 2, 40, 32, 16


def small_inputs(batch, device, dtype, seed, **kwargs):
    return make_decode_inputs(
        batch=batch,
        seq_len_q=S_Q,
        num_heads_q=H_Q,
        num_heads_k=H_K,
        head_dim=D,
        head_dim_v=DV,
        page_block_size=PAGE,
        dtype=dtype,
        device=device,
        max_seqlen=50,
        causal=True,
        seed=seed,
        **kwargs,
    )


def decode_step(q, k_cache, block_table, cache_seqlens):
    """One decode step: metadata for the current lengths, then attention, as a model would call them."""
    md, splits = flashmla_ops.get_mla_metadata(cache_seqlens, S_Q * H_Q // H_K, H_K)
    return flashmla_ops.flash_mla_with_kvcache(
        q, k_cache, block_table, cache_seqlens, DV, md, splits, causal=True
    )


def decode_step_with_epilogue(q, k_cache, block_table, cache_seqlens, w_o):
    """decode_step with ordinary ops around it, so inductor generates kernels that feed and consume
    the custom ops' tensors."""
    out, lse = decode_step(q * 0.5 + 0.25, k_cache, block_table, cache_seqlens)
    return torch.nn.functional.silu(out.float().flatten(2) @ w_o), lse.clamp(max=1e4) * 2


def graph_targets(gm: torch.fx.GraphModule):
    return {node.target for node in gm.graph.nodes if node.op == "call_function"}


def assert_outputs_equal(got, want, exact=True):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.device == w.device
        if exact:
            torch.testing.assert_close(g, w, rtol=0, atol=0)  # +inf lse compares equal to +inf
        else:  # inductor's own kernels (silu, the fused q scaling) may round differently from eager
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize(
    "device,dtype",
    device_dtype_params(cpu_dtypes=[torch.float32, torch.bfloat16], cuda_dtypes=[torch.bfloat16]),
)
def test_compile_fullgraph(backend, device, dtype, fresh_dynamo):
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(decode_step, backend=counter, fullgraph=True)
    # New lengths (and cache contents) every step, same shapes (9 live blocks + 3 spare):
    # values are not guarded, so there is no recompile.
    for step, lengths in enumerate(([0, 17, 50, 33], [16, 1, 49, 40], [50, 0, 20, 35])):
        inp = small_inputs(
            4, device, dtype, seed_for("compile", backend, device, dtype, step), lengths=lengths
        )
        assert inp.k_cache.shape[0] == 12
        args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens)
        got = compiled(*args)
        assert_outputs_equal(got, decode_step(*args))  # the same kernel runs: bitwise equal
    assert counter.frame_count == 1
    targets = graph_targets(counter.graphs[0])
    assert torch.ops.flashmla.get_mla_metadata.default in targets
    assert torch.ops.flashmla.fwd_kvcache_mla.default in targets


@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_with_epilogue(device, fresh_dynamo):
    dtype = torch.bfloat16
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(decode_step_with_epilogue, backend=counter, fullgraph=True)
    w_o = (torch.randn(H_Q * DV, 24, generator=torch.Generator().manual_seed(7)) * 0.05).to(device)
    inp = small_inputs(3, device, dtype, seed_for("epilogue", device))
    args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens, w_o)
    got = compiled(*args)
    want = decode_step_with_epilogue(*args)
    assert_outputs_equal(got, want, exact=False)
    assert torch.isfinite(got[0]).all()
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_compile_dynamic_batch_no_recompile(backend, device, fresh_dynamo):
    """dynamic=True: one compile serves batch sizes 3, 6 and 7.

    Batch sizes 0 and 1 specialize, and so does a first batch size equal to another size that gets
    specialized (duck sizing: e.g. batch == seq_len_q, whose value reaches an int argument), so the
    first batch is 3, a size no other dimension has here (the cache has >= 17 blocks).
    """
    dtype = torch.bfloat16
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(decode_step, backend=counter, fullgraph=True, dynamic=True)
    for batch in (3, 6, 7):
        inp = small_inputs(batch, device, dtype, seed_for("dynamic", backend, device, batch), spare_blocks=17)
        assert 3 not in (S_Q, H_Q, H_K, D, PAGE, *inp.block_table.shape[1:], inp.k_cache.shape[0])
        args = (inp.q, inp.k_cache, inp.block_table, inp.cache_seqlens)
        got = compiled(*args)
        assert_outputs_equal(got, decode_step(*args))
        assert counter.frame_count == 1, f"recompiled for batch {batch}"
    # The graph really is symbolic in the batch.
    example_q = [
        n.meta["example_value"]
        for n in counter.graphs[0].graph.nodes
        if n.op == "placeholder"
        and isinstance(n.meta.get("example_value"), torch.Tensor)
        and n.meta["example_value"].dim() == 4
        and n.meta["example_value"].dtype == dtype
    ][0]
    assert isinstance(example_q.shape[0], torch.SymInt)


# ----------------------------------------------------------------------------------------------
# torch.export
# ----------------------------------------------------------------------------------------------

HIDDEN = 48


class DecodeModule(torch.nn.Module):
    """A q projection (a weight inside the module), then metadata and MLA attention."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(1234)
        self.w_q = torch.nn.Parameter(
            (torch.randn(HIDDEN, H_Q * D, generator=g) * HIDDEN**-0.5).to(dtype), requires_grad=False
        )

    def forward(self, x, k_cache, block_table, cache_seqlens):
        q = (x @ self.w_q).unflatten(-1, (H_Q, D))  # (batch, s_q, h_q, d)
        md, splits = flashmla_ops.get_mla_metadata(cache_seqlens, S_Q * H_Q // H_K, H_K)
        return flashmla_ops.flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, DV, md, splits, causal=True
        )


def module_inputs(batch, device, dtype, seed):
    inp = small_inputs(batch, device, dtype, seed, spare_blocks=17)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, S_Q, HIDDEN, generator=g).to(device=device, dtype=dtype)
    return (x, inp.k_cache, inp.block_table, inp.cache_seqlens), inp


@pytest.mark.parametrize(
    "device,dtype",
    device_dtype_params(cpu_dtypes=[torch.float32, torch.bfloat16], cuda_dtypes=[torch.bfloat16]),
)
def test_export_static(device, dtype):
    model = DecodeModule(dtype).to(device)
    args, _ = module_inputs(3, device, dtype, seed_for("export", device, dtype))
    ep = torch.export.export(model, args)
    targets = graph_targets(ep.graph_module)
    assert torch.ops.flashmla.get_mla_metadata.default in targets
    assert torch.ops.flashmla.fwd_kvcache_mla.default in targets
    assert_outputs_equal(ep.module()(*args), model(*args))
    # New lengths and cache contents of the same shapes.
    args2, _ = module_inputs(3, device, dtype, seed_for("export2", device, dtype))
    if args2[1].shape == args[1].shape and args2[2].shape == args[2].shape:
        assert_outputs_equal(ep.module()(*args2), model(*args2))


@pytest.mark.parametrize(
    "device,dtype", device_dtype_params(cpu_dtypes=[torch.bfloat16], cuda_dtypes=[torch.bfloat16])
)
def test_export_dynamic_batch(device, dtype):
    model = DecodeModule(dtype).to(device)
    args, _ = module_inputs(3, device, dtype, seed_for("export-dyn", device))
    batch = torch.export.Dim("batch", min=2, max=4096)
    num_blocks = torch.export.Dim("num_blocks", min=2)
    dynamic_shapes = {
        "x": {0: batch},
        "k_cache": {0: num_blocks},
        "block_table": {0: batch},
        "cache_seqlens": {0: batch},
    }
    ep = torch.export.export(model, args, dynamic_shapes=dynamic_shapes)
    runner = ep.module()
    for b in (2, 3, 5, 11):
        args_b, inp = module_inputs(b, device, dtype, seed_for("export-dyn", device, b))
        got = runner(*args_b)
        assert got[0].shape == (b, S_Q, H_Q, DV) and got[1].shape == (b, H_Q, S_Q)
        assert_outputs_equal(got, model(*args_b))


def test_export_runs_with_another_worker_count():
    """An exported program runs where the device has another worker count than at export time (on CPU,
    the thread count): the metadata's num_sm_parts is whatever get_mla_metadata returns at run time."""
    dtype = torch.float32
    model = DecodeModule(dtype)
    with num_threads(2):
        args, _ = module_inputs(4, "cpu", dtype, seed_for("export-workers"))
        ep = torch.export.export(model, args)
    for threads in (1, 3, 5):
        with num_threads(threads):
            got = ep.module()(*args)
            want = model(*args)
        assert_outputs_equal(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_export_save_load_roundtrip(device):
    """A saved ExportedProgram loads (the ops resolve by name) and runs like the module."""
    dtype = torch.bfloat16
    model = DecodeModule(dtype).to(device)
    args, _ = module_inputs(3, device, dtype, seed_for("export-save", device))
    ep = torch.export.export(model, args)
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert_outputs_equal(loaded.module()(*args), model(*args))


# ----------------------------------------------------------------------------------------------
# Schemas, pinned
# ----------------------------------------------------------------------------------------------


class TestSchemas(SchemaTestCase):
    def test_get_mla_metadata_schema(self):
        self.assertExpectedInline(
            str(torch.ops.flashmla.get_mla_metadata.default._schema),
            """flashmla::get_mla_metadata(Tensor cache_seqlens, int num_heads_per_head_k, int num_heads_k) -> (Tensor, Tensor)""",
        )

    def test_fwd_kvcache_mla_schema(self):
        self.assertExpectedInline(
            str(torch.ops.flashmla.fwd_kvcache_mla.default._schema),
            """flashmla::fwd_kvcache_mla(Tensor q, Tensor k_cache, Tensor? v_cache, int head_dim_v, Tensor cache_seqlens, Tensor block_table, float softmax_scale, bool causal, Tensor tile_scheduler_metadata, Tensor num_splits) -> (Tensor, Tensor)""",
        )

    def test_write_kvcache_schema(self):
        self.assertExpectedInline(
            str(torch.ops.flashmla.write_kvcache.default._schema),
            """flashmla::write_kvcache(Tensor kv_c, Tensor k_pe, Tensor(a!) k_cache, Tensor slot_mapping) -> ()""",
        )

    def test_no_other_ops(self):
        """Every op of the library is pinned above."""
        names = sorted(s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("flashmla::"))
        self.assertEqual(
            names, ["flashmla::fwd_kvcache_mla", "flashmla::get_mla_metadata", "flashmla::write_kvcache"]
        )
