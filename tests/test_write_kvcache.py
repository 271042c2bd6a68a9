"""write_kvcache: the kernels against a Python reference, errors (kernel and fake alike), opcheck,
and in-place behaviour under torch.compile (inductor, and CUDA graphs with a static cache)."""

import re
from typing import List

import expecttest
import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torch._subclasses.fake_tensor import FakeTensorMode

import flashmla_ops

HAVE_CUDA = torch.cuda.is_available() and flashmla_ops.build_info()["cuda"]
requires_cuda = pytest.mark.skipif(not HAVE_CUDA, reason="needs a GPU and the CUDA kernels built")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SLOT_DTYPES = [torch.int64, torch.int32]
D_C, D_PE = 512, 64  # DeepSeek


def reference_write(kv_c, k_pe, k_cache, slot_mapping):
    """What the op must leave in k_cache, computed on a copy, token by token."""
    out = k_cache.clone()
    page = k_cache.shape[1]
    for i, slot in enumerate(slot_mapping.tolist()):
        if slot != -1:
            out[slot // page, slot % page, 0] = torch.cat([kv_c[i], k_pe[i]])
    return out


def make_inputs(
    n,
    num_blocks,
    page,
    d_c=D_C,
    d_pe=D_PE,
    dtype=torch.float32,
    device="cpu",
    slot_dtype=torch.int64,
    skip_every=3,
):
    """Random tokens at distinct random slots (every `skip_every`-th one -1) of a random cache."""
    kv_c = torch.randn(n, d_c, dtype=dtype, device=device)
    k_pe = torch.randn(n, d_pe, dtype=dtype, device=device)
    k_cache = torch.randn(num_blocks, page, 1, d_c + d_pe, dtype=dtype, device=device)
    slots = torch.randperm(num_blocks * page)[:n]
    slots[::skip_every] = -1
    return kv_c, k_pe, k_cache, slots.to(device=device, dtype=slot_dtype)


def check_write(kv_c, k_pe, k_cache, slot_mapping):
    expected = reference_write(kv_c, k_pe, k_cache, slot_mapping)
    ptr = k_cache.data_ptr()
    assert flashmla_ops.write_kvcache(kv_c, k_pe, k_cache, slot_mapping) is None
    assert k_cache.data_ptr() == ptr
    assert torch.equal(k_cache, expected)  # a copy: bitwise equal


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", SLOT_DTYPES)
def test_matches_reference(device, dtype, slot_dtype):
    torch.manual_seed(0)
    check_write(*make_inputs(37, num_blocks=9, page=16, dtype=dtype, device=device, slot_dtype=slot_dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_layouts(device, dtype):
    """Non-contiguous cache (dims 0-2), inputs and slot mapping. The widths and offsets take every CUDA copy
    width: 16 bytes (512 + 64), 8 (12 + 4 in 2-byte types), 4 (6 + 2 in 2-byte types), single elements
    (5 + 3, 8 + 1, channel strides, the cache row at an odd offset)."""
    torch.manual_seed(1)
    n, num_blocks, page = 11, 5, 8
    for d_c, d_pe in ((D_C, D_PE), (12, 4), (6, 2), (5, 3), (8, 1)):
        d = d_c + d_pe
        kv_c, k_pe, _, slots = make_inputs(n, num_blocks, page, d_c, d_pe, dtype, device)
        caches = {
            "contiguous": torch.randn(num_blocks, page, 1, d, dtype=dtype, device=device),
            "one head of two": torch.randn(num_blocks, page, 2, d, dtype=dtype, device=device)[:, :, 1:],
            "blocks interleaved": torch.randn(page, num_blocks, 1, d, dtype=dtype, device=device).transpose(
                0, 1
            ),
            "padded rows": torch.randn(num_blocks, page, 1, d + 8, dtype=dtype, device=device)[
                ..., 3 : 3 + d
            ],
        }
        inputs = {
            "contiguous": (kv_c, k_pe),
            "slices of one projection": tuple(torch.cat([kv_c, k_pe], dim=1).split([d_c, d_pe], dim=1)),
            "channel stride 2": (
                torch.stack([kv_c, kv_c], -1)[..., 0],
                torch.stack([k_pe, k_pe], -1)[..., 1],
            ),
            "transposed": (kv_c.t().contiguous().t(), k_pe.t().contiguous().t()),
        }
        for cache_name, k_cache in caches.items():
            for input_name, (a, b) in inputs.items():
                for slot_mapping in (slots, torch.stack([slots, slots], 1)[:, 0]):
                    try:
                        check_write(a, b, k_cache, slot_mapping)
                    except AssertionError as e:
                        raise AssertionError(
                            f"d_c={d_c} d_pe={d_pe} cache {cache_name}, inputs {input_name}"
                        ) from e


@pytest.mark.parametrize("device", DEVICES)
def test_no_tokens_and_all_skipped(device):
    kv_c, k_pe, k_cache, slots = make_inputs(0, num_blocks=2, page=4, device=device)
    check_write(kv_c, k_pe, k_cache, slots)
    kv_c, k_pe, k_cache, slots = make_inputs(5, num_blocks=2, page=4, device=device)
    check_write(kv_c, k_pe, k_cache, torch.full_like(slots, -1))
    # An empty cache takes only skipped tokens.
    check_write(kv_c, k_pe, k_cache[:0], torch.full_like(slots, -1))


def test_out_of_range_slot_raises_on_cpu_and_leaves_cache_unchanged():
    kv_c, k_pe, k_cache, slots = make_inputs(6, num_blocks=3, page=4)
    before = k_cache.clone()
    for bad in (-2, 12, 2**40):
        slots[4] = bad
        with pytest.raises(
            RuntimeError,
            match=rf"write_kvcache: slot_mapping\[4\] = {bad} is outside \[-1, "
            r"num_blocks \* page_block_size = 12\)",
        ):
            flashmla_ops.write_kvcache(kv_c, k_pe, k_cache, slots)
        assert torch.equal(k_cache, before)


@requires_cuda
@pytest.mark.parametrize("slot_dtype", SLOT_DTYPES)
def test_out_of_range_slot_skipped_on_cuda(slot_dtype):
    """CUDA cannot raise without a host sync: out-of-range slots are skipped, nothing else is touched."""
    torch.manual_seed(2)
    kv_c, k_pe, k_cache, slots = make_inputs(
        8, num_blocks=3, page=4, device="cuda", slot_dtype=slot_dtype, skip_every=8
    )
    # A guard band around the cache: any write out of bounds shows up there.
    storage = torch.randn(5, 4, 1, D_C + D_PE, device="cuda")
    k_cache = storage[1:4]
    before = storage.clone()
    slots[1], slots[2], slots[4] = -2, 12, torch.iinfo(slot_dtype).min
    slots[5] = torch.iinfo(slot_dtype).max
    good = slots.clone()
    good[[1, 2, 4, 5]] = -1
    expected = reference_write(kv_c, k_pe, k_cache, good)
    flashmla_ops.write_kvcache(kv_c, k_pe, k_cache, slots)
    assert torch.equal(k_cache, expected)
    assert torch.equal(storage[0], before[0]) and torch.equal(storage[4], before[4])


def good_args(device="cpu"):
    return dict(
        kv_c=torch.randn(3, 8, device=device),
        k_pe=torch.randn(3, 4, device=device),
        k_cache=torch.randn(2, 4, 1, 12, device=device),
        slot_mapping=torch.tensor([0, -1, 7], device=device),
    )


# (change to good_args, part of the message both the kernel and the fake must give)
BAD_ARGS = [
    (dict(kv_c=torch.randn(3, 8, 1)), "kv_c must have 2 dimensions"),
    (dict(k_pe=torch.randn(12)), "k_pe must have 2 dimensions"),
    (dict(k_cache=torch.randn(8, 1, 12)), "k_cache must have 4 dimensions"),
    (dict(slot_mapping=torch.zeros(3, 1, dtype=torch.long)), "slot_mapping must have 1 dimensions"),
    (
        dict(k_cache=torch.zeros(2, 4, 1, 12, dtype=torch.float64)),
        "k_cache must be bfloat16, float16 or float32",
    ),
    (dict(kv_c=torch.randn(3, 8, dtype=torch.bfloat16)), "kv_c dtype"),
    (dict(k_pe=torch.randn(3, 4, dtype=torch.float16)), "k_pe dtype"),
    (dict(slot_mapping=torch.tensor([0.0, 1.0, 2.0])), "slot_mapping must be int64 or int32"),
    (dict(k_pe=torch.randn(4, 4)), r"k_pe.size\(0\) \(4\) must equal kv_c.size\(0\) \(3\)"),
    (
        dict(slot_mapping=torch.tensor([0, 1])),
        r"slot_mapping.size\(0\) \(2\) must equal kv_c.size\(0\) \(3\)",
    ),
    (dict(k_cache=torch.randn(2, 4, 2, 12)), r"k_cache.size\(2\) \(num_heads_k\) must be 1"),
    (
        dict(k_cache=torch.randn(2, 4, 1, 13)),
        r"k_cache.size\(3\) \(13\) must equal kv_c.size\(1\) \+ k_pe.size\(1\)",
    ),
    (dict(k_cache=torch.randn(2, 4, 1, 24)[..., ::2]), "k_cache must have stride 1 in its last dimension"),
    (dict(slot_mapping=torch.tensor([0, 1, 2], device="meta")), "slot_mapping must be on cpu"),
]


@pytest.mark.parametrize("change,message", BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_bad_arguments(change, message):
    """The CPU kernel and the fake reject the same arguments, naming the same argument."""
    args = {**good_args(), **change}
    if not any(t.is_meta for t in args.values()):
        with pytest.raises(RuntimeError, match=f"write_kvcache: {message}"):
            torch.ops.flashmla.write_kvcache(**args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = {name: mode.from_tensor(t) for name, t in args.items()}
        with pytest.raises(RuntimeError, match=f"write_kvcache: {message}"):
            torch.ops.flashmla.write_kvcache(**fake_args)


@requires_cuda
def test_device_mismatch():
    for name in ("kv_c", "k_pe", "slot_mapping"):
        args = good_args("cuda")
        args[name] = args[name].cpu()
        with pytest.raises(RuntimeError, match=f"write_kvcache: {name} must be on cuda:0"):
            torch.ops.flashmla.write_kvcache(**args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slot_dtype", SLOT_DTYPES)
def test_opcheck(device, dtype, slot_dtype):
    torch.manual_seed(3)
    args = make_inputs(
        9, num_blocks=3, page=8, d_c=32, d_pe=8, dtype=dtype, device=device, slot_dtype=slot_dtype
    )
    torch.library.opcheck(torch.ops.flashmla.write_kvcache.default, args)


def step(x, k_cache, slot_mapping):
    """A decode-step fragment: the new tokens' entries are computed, then written into the cache."""
    kv = x * 2.0 + 1.0
    flashmla_ops.write_kvcache(kv[:, :D_C], kv[:, D_C:], k_cache, slot_mapping)
    return kv.sum()


def generated_code_summary(code: str, input_names: List[str], cache_shape) -> str:
    """The lines of the wrapper's `call` (inductor's generated host code) that touch the cache or call
    flashmla ops, with graph inputs renamed to `input_names` and buffer numbers dropped; then how many
    buffers of the cache's shape the code allocates (a whole-cache copy would need one)."""
    unpack = re.search(r"^\s*(\w+(?:, \w+)*),? = args$", code, re.M)
    graph_inputs = unpack.group(1).split(", ")
    rename = dict(zip(graph_inputs, input_names))
    cache_name = graph_inputs[input_names.index("k_cache")]
    lines = []
    for line in code[unpack.end() :].splitlines():
        line = line.strip()
        if line.startswith("return "):  # the end of `call`
            break
        touches_cache = re.search(rf"\b{cache_name}\b", line) and not re.match(
            r"(assert_size_stride|del )", line
        )
        if touches_cache or "torch.ops.flashmla" in line:
            line = re.sub(r"\b\w+\b", lambda m: rename.get(m.group(0), m.group(0)), line)
            lines.append(re.sub(r"\bbuf\d+\b", "buf", line))
    allocations = re.findall(r"empty_strided_\w+\(" + re.escape(str(tuple(cache_shape))), code)
    lines.append(f"cache-shaped allocations: {len(allocations)}")
    return "\n".join(lines)


class TestCompile(expecttest.TestCase):
    def run_inductor(self, device):
        torch._dynamo.reset()
        torch.manual_seed(4)
        kv_c, k_pe, k_cache, slots = make_inputs(6, num_blocks=3, page=4, device=device)
        x = torch.cat([kv_c, k_pe], dim=1)
        expected = reference_write(kv_c * 2.0 + 1.0, k_pe * 2.0 + 1.0, k_cache, slots)
        ptr = k_cache.data_ptr()
        compiled = torch.compile(step, backend="inductor", fullgraph=True, dynamic=False)
        _, codes = run_and_get_code(compiled, x, k_cache, slots)
        # The caller's cache itself was written: same storage, right values.
        self.assertEqual(k_cache.data_ptr(), ptr)
        torch.testing.assert_close(k_cache, expected, rtol=0, atol=0)
        (code,) = codes
        return generated_code_summary(code, ["x", "k_cache", "slot_mapping"], k_cache.shape)

    def test_inductor_writes_in_place_cpu(self):
        self.assertExpectedInline(
            self.run_inductor("cpu"),
            """\
torch.ops.flashmla.write_kvcache.default(buf, buf, k_cache, slot_mapping)
cache-shaped allocations: 0""",
        )

    @requires_cuda
    def test_inductor_writes_in_place_cuda(self):
        self.assertExpectedInline(
            self.run_inductor("cuda"),
            """\
torch.ops.flashmla.write_kvcache.default(buf, buf, k_cache, slot_mapping)
cache-shaped allocations: 0""",
        )


@requires_cuda
def test_cuda_graph_replays_write_the_right_slots():
    """mode="reduce-overhead" with the cache marked static: each replay writes that call's slots into the
    caller's cache (the cache is not copied into or out of the graph's pool)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(5)
    num_blocks, page, n = 6, 16, 4
    k_cache = torch.randn(num_blocks, page, 1, D_C + D_PE, dtype=torch.bfloat16, device="cuda")
    torch._dynamo.mark_static_address(k_cache)
    ptr = k_cache.data_ptr()
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)
    for i in range(6):
        x = torch.randn(n, D_C + D_PE, dtype=torch.bfloat16, device="cuda")
        slots = torch.randperm(num_blocks * page, device="cuda")[:n]
        slots[i % n] = -1
        kv = x * 2.0 + 1.0
        expected = reference_write(kv[:, :D_C], kv[:, D_C:], k_cache, slots)
        compiled(x, k_cache, slots)
        torch.cuda.synchronize()
        assert k_cache.data_ptr() == ptr
        assert torch.equal(k_cache, expected), f"call {i}"
    assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], "the step was not CUDA-graphed"
