"""Fake (meta) implementations: shapes from shapes, never tensor values.

They repeat the shape rules of csrc/mla_shapes.cpp so that torch.compile / torch.export see the same
errors and the same output shapes as the kernels; tests/test_shapes.py holds the two equal.
"""

import math

import torch

ROWS_PER_WORKER_TILE = 64  # csrc/schedule.h kRowsPerWorkerTile
METADATA_WIDTH = 8  # csrc/schedule.h kMetadataWidth


def num_sm_parts(device: torch.device, num_heads_per_head_k: int, num_heads_k: int) -> int:
    """Workers in the schedule on `device`; must match the C++ kernels (tested)."""
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = num_heads_k * math.ceil(num_heads_per_head_k / ROWS_PER_WORKER_TILE)
        return max(1, sm_count // tiles)
    return max(1, torch.get_num_threads())


@torch.library.register_fake("flashmla::get_mla_metadata")
def _get_mla_metadata_fake(cache_seqlens, num_heads_per_head_k, num_heads_k):
    torch._check(cache_seqlens.dim() == 1, lambda: "get_mla_metadata: cache_seqlens must have 1 dimension")
    torch._check(cache_seqlens.dtype == torch.int32, lambda: "get_mla_metadata: cache_seqlens must be int32")
    torch._check(
        cache_seqlens.shape[0] >= 1,
        lambda: "get_mla_metadata: cache_seqlens is empty; the batch must not be empty",
    )
    torch._check(num_heads_per_head_k >= 1, lambda: "get_mla_metadata: num_heads_per_head_k must be >= 1")
    torch._check(num_heads_k >= 1, lambda: "get_mla_metadata: num_heads_k must be >= 1")
    parts = num_sm_parts(cache_seqlens.device, num_heads_per_head_k, num_heads_k)
    batch = cache_seqlens.shape[0]
    metadata = cache_seqlens.new_empty((parts, METADATA_WIDTH))
    num_splits = cache_seqlens.new_empty((batch + 1,))
    return metadata, num_splits


def check_fwd_shapes(
    q,
    k_cache,
    v_cache,
    head_dim_v,
    cache_seqlens,
    block_table,
    tile_scheduler_metadata,
    num_splits,
    softmax_scale=None,
):
    """The shape rules of csrc/mla_shapes.cpp check_fwd_args, as torch._check (symbolic-safe)."""
    torch._check(
        q.dtype in (torch.bfloat16, torch.float16, torch.float32),
        lambda: f"flash_mla_with_kvcache: q must be bfloat16, float16 or float32, got {q.dtype}",
    )
    torch._check(
        k_cache.dtype == q.dtype,
        lambda: f"flash_mla_with_kvcache: k_cache dtype ({k_cache.dtype}) must equal q dtype ({q.dtype})",
    )
    torch._check(v_cache is None, lambda: "flash_mla_with_kvcache: v_cache must be None")
    for t, name, rank in (
        (q, "q", 4),
        (k_cache, "k_cache", 4),
        (block_table, "block_table", 2),
        (cache_seqlens, "cache_seqlens", 1),
        (tile_scheduler_metadata, "tile_scheduler_metadata", 2),
        (num_splits, "num_splits", 1),
    ):
        torch._check(t.dim() == rank, lambda: f"flash_mla_with_kvcache: {name} must have {rank} dimensions")
    for t, name in (
        (block_table, "block_table"),
        (cache_seqlens, "cache_seqlens"),
        (tile_scheduler_metadata, "tile_scheduler_metadata"),
        (num_splits, "num_splits"),
    ):
        torch._check(t.dtype == torch.int32, lambda: f"flash_mla_with_kvcache: {name} must be int32")
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    num_blocks, page_block_size, num_heads_k = k_cache.shape[:3]
    torch._check(
        batch >= 1, lambda: "flash_mla_with_kvcache: q has batch size 0; the batch must not be empty"
    )
    torch._check(seqlen_q >= 1, lambda: "flash_mla_with_kvcache: q must have seq_len_q >= 1")
    torch._check(num_heads_q >= 1, lambda: "flash_mla_with_kvcache: q must have num_heads_q >= 1")
    torch._check(head_dim >= 1, lambda: "flash_mla_with_kvcache: q must have head_dim >= 1")
    torch._check(
        k_cache.shape[3] == head_dim, lambda: "flash_mla_with_kvcache: k_cache head_dim must equal q head_dim"
    )
    torch._check(
        num_blocks >= 1 and page_block_size >= 1,
        lambda: "flash_mla_with_kvcache: k_cache must have num_blocks >= 1 and page_block_size >= 1",
    )
    torch._check(
        num_heads_k >= 1, lambda: "flash_mla_with_kvcache: num_heads_q must be a multiple of num_heads_k"
    )
    torch._check(
        num_heads_q % num_heads_k == 0,
        lambda: "flash_mla_with_kvcache: num_heads_q must be a multiple of num_heads_k",
    )
    torch._check(
        1 <= head_dim_v <= head_dim, lambda: "flash_mla_with_kvcache: head_dim_v must be in [1, head_dim]"
    )
    torch._check(
        q.stride(3) == 1, lambda: "flash_mla_with_kvcache: q must have stride 1 in its last dimension"
    )
    torch._check(
        k_cache.stride(3) == 1,
        lambda: "flash_mla_with_kvcache: k_cache must have stride 1 in its last dimension",
    )
    torch._check(
        block_table.shape[0] == batch, lambda: "flash_mla_with_kvcache: block_table batch size mismatch"
    )
    torch._check(
        block_table.shape[1] >= 1, lambda: "flash_mla_with_kvcache: block_table must have at least one column"
    )
    torch._check(
        cache_seqlens.shape[0] == batch, lambda: "flash_mla_with_kvcache: cache_seqlens size mismatch"
    )
    torch._check(num_splits.shape[0] == batch + 1, lambda: "flash_mla_with_kvcache: num_splits size mismatch")
    torch._check(
        tile_scheduler_metadata.shape[0] >= 1 and tile_scheduler_metadata.shape[1] == METADATA_WIDTH,
        lambda: "flash_mla_with_kvcache: tile_scheduler_metadata must have shape (num_sm_parts >= 1, 8)",
    )
    if softmax_scale is not None:
        torch._check(
            softmax_scale > 0 and math.isfinite(softmax_scale),
            lambda: "flash_mla_with_kvcache: softmax_scale must be positive and finite",
        )
    torch._check(
        block_table.shape[1] * page_block_size < 2**31,
        lambda: (
            "flash_mla_with_kvcache: block_table capacity (max_num_blocks_per_seq * page_block_size) "
            "must be < 2^31"
        ),
    )
    return batch, seqlen_q, num_heads_q


@torch.library.register_fake("flashmla::fwd_kvcache_mla")
def _fwd_kvcache_mla_fake(
    q,
    k_cache,
    v_cache,
    head_dim_v,
    cache_seqlens,
    block_table,
    softmax_scale,
    causal,
    tile_scheduler_metadata,
    num_splits,
):
    batch, seqlen_q, num_heads_q = check_fwd_shapes(
        q,
        k_cache,
        v_cache,
        head_dim_v,
        cache_seqlens,
        block_table,
        tile_scheduler_metadata,
        num_splits,
        softmax_scale,
    )
    out = q.new_empty((batch, seqlen_q, num_heads_q, head_dim_v))
    lse = q.new_empty((batch, num_heads_q, seqlen_q), dtype=torch.float32)
    return out, lse


def check_write_kvcache_args(kv_c, k_pe, k_cache, slot_mapping):
    """The rules of csrc/write_kvcache_shapes.cpp check_write_kvcache_args, as torch._check."""
    for t, name, rank, shape in (
        (kv_c, "kv_c", 2, "(num_tokens, d_c)"),
        (k_pe, "k_pe", 2, "(num_tokens, d_pe)"),
        (k_cache, "k_cache", 4, "(num_blocks, page_block_size, 1, d_c + d_pe)"),
        (slot_mapping, "slot_mapping", 1, "(num_tokens,)"),
    ):
        torch._check(
            t.dim() == rank,
            lambda: f"write_kvcache: {name} must have {rank} dimensions {shape}, got shape {tuple(t.shape)}",
        )
    dtype = k_cache.dtype
    torch._check(
        dtype in (torch.bfloat16, torch.float16, torch.float32),
        lambda: f"write_kvcache: k_cache must be bfloat16, float16 or float32, got {dtype}",
    )
    for t, name in ((kv_c, "kv_c"), (k_pe, "k_pe")):
        torch._check(
            t.dtype == dtype,
            lambda: f"write_kvcache: {name} dtype ({t.dtype}) must equal k_cache dtype ({dtype})",
        )
    torch._check(
        slot_mapping.dtype in (torch.int64, torch.int32),
        lambda: f"write_kvcache: slot_mapping must be int64 or int32, got {slot_mapping.dtype}",
    )
    for t, name in ((kv_c, "kv_c"), (k_pe, "k_pe"), (slot_mapping, "slot_mapping")):
        torch._check(
            t.device == k_cache.device,
            lambda: (
                f"write_kvcache: {name} must be on {k_cache.device} (the device of k_cache), got {t.device}"
            ),
        )
    n = kv_c.shape[0]
    torch._check(
        k_pe.shape[0] == n,
        lambda: f"write_kvcache: k_pe.size(0) ({k_pe.shape[0]}) must equal kv_c.size(0) ({n})",
    )
    torch._check(
        slot_mapping.shape[0] == n,
        lambda: (
            f"write_kvcache: slot_mapping.size(0) ({slot_mapping.shape[0]}) must equal kv_c.size(0) ({n})"
        ),
    )
    torch._check(
        k_cache.shape[2] == 1,
        lambda: f"write_kvcache: k_cache.size(2) (num_heads_k) must be 1, got shape {tuple(k_cache.shape)}",
    )
    torch._check(
        k_cache.shape[3] == kv_c.shape[1] + k_pe.shape[1],
        lambda: (
            f"write_kvcache: k_cache.size(3) ({k_cache.shape[3]}) must equal kv_c.size(1) + "
            f"k_pe.size(1) ({kv_c.shape[1]} + {k_pe.shape[1]})"
        ),
    )
    torch._check(
        k_cache.stride(3) == 1,
        lambda: f"write_kvcache: k_cache must have stride 1 in its last dimension, got {k_cache.stride(3)}",
    )


@torch.library.register_fake("flashmla::write_kvcache")
def _write_kvcache_fake(kv_c, k_pe, k_cache, slot_mapping):
    # Slot values (range, -1) are the kernels' business: a fake never reads values.
    check_write_kvcache_args(kv_c, k_pe, k_cache, slot_mapping)
    return None
