"""The public API: a drop-in for FlashMLA's ``get_mla_metadata`` and ``flash_mla_with_kvcache``."""

from typing import Optional, Tuple

import torch


def get_mla_metadata(
    cache_seqlens: torch.Tensor, num_heads_per_head_k: int, num_heads_k: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Splits the decode work of a batch among the device's workers.

    Args:
        cache_seqlens: (batch,) int32, the number of tokens each sequence has in the cache, on the
            device that will run the attention.
        num_heads_per_head_k: seq_len_q * num_heads_q // num_heads_k, the query rows sharing one KV head.
        num_heads_k: number of KV heads (1 for DeepSeek MLA).

    Returns:
        ``(tile_scheduler_metadata, num_splits)``: int32 tensors of shapes (num_sm_parts, 8) and
        (batch + 1,) on the device of ``cache_seqlens``. Their shape depends only on shapes and the
        device (num_sm_parts = SM count / (num_heads_k * ceil(num_heads_per_head_k / 64)) on CUDA, the
        intra-op thread count on CPU); their values depend on the lengths. Computed on the device
        without host synchronisation, so a decode step including this call can be captured in a
        CUDA graph.

    The metadata is valid only for the lengths it was built from: rebuild it whenever
    ``cache_seqlens`` change (calling it inside the compiled/captured decode step does that). On CPU,
    metadata that does not match the lengths raises an error. On CUDA it cannot be checked without a
    host sync: every read stays inside the tensors (no illegal memory access), but the results are
    unspecified (tokens may be missed or output rows left unwritten).
    """
    return torch.ops.flashmla.get_mla_metadata.default(cache_seqlens, num_heads_per_head_k, num_heads_k)


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-head latent attention decoding over a paged KV cache.

    Args:
        q: (batch, seq_len_q, num_heads_q, head_dim), bfloat16, float16 or float32; last dim contiguous.
        k_cache: (num_blocks, page_block_size, num_heads_k, head_dim), same dtype as q. Token t of
            sequence i is ``k_cache[block_table[i, t // page_block_size], t % page_block_size]``.
            V is its first ``head_dim_v`` channels (MLA shares the latent vector between K and V).
        block_table: (batch, max_num_blocks_per_seq) int32. Entries past a sequence's last live
            block are never read and may hold anything.
        cache_seqlens: (batch,) int32 lengths, 0 <= len <= max_num_blocks_per_seq * page_block_size.
            Cache slots past a sequence's length may hold anything, NaN included.
        head_dim_v: channels of V (512 for DeepSeek), 1 <= head_dim_v <= head_dim.
        tile_scheduler_metadata, num_splits: from ``get_mla_metadata`` for these ``cache_seqlens``
            (see its docstring for what happens with stale metadata). Any num_sm_parts >= 1 is
            accepted, so an exported program runs on a GPU with another SM count.
        softmax_scale: scale of q·k before the softmax; default head_dim ** -0.5.
        causal: with seq_len_q > 1, query j of a sequence of length L sees tokens t <= L - seq_len_q + j
            (bottom-right aligned). With seq_len_q == 1 it changes nothing.

    Returns:
        ``(out, softmax_lse)``: out (batch, seq_len_q, num_heads_q, head_dim_v) in q's dtype;
        softmax_lse (batch, num_heads_q, seq_len_q) float32, the natural-log logsumexp of the scaled
        scores. Query head h uses KV head h // (num_heads_q // num_heads_k). A query row that sees no
        token (length 0, or masked away) gets out = 0 and softmax_lse = +inf. Deterministic: the
        same inputs and metadata give bitwise the same outputs.

    Invalid cache contents: on CPU, a negative length, a length beyond the block table's capacity,
    or a live block id outside [0, num_blocks) raises an error. On CUDA these are masked on the
    device, without a host sync: a negative length counts as 0, a length beyond capacity as the
    capacity, and tokens of an out-of-range block are skipped (they never read outside k_cache).
    """
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    return torch.ops.flashmla.fwd_kvcache_mla.default(
        q,
        k_cache,
        None,
        head_dim_v,
        cache_seqlens,
        block_table,
        float(softmax_scale),
        causal,
        tile_scheduler_metadata,
        num_splits,
    )


def write_kvcache(
    kv_c: torch.Tensor, k_pe: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Writes new tokens' latent vectors into the paged cache, in place.

    Args:
        kv_c: (n, d_c) compressed latent vectors (512 for DeepSeek), dtype of k_cache. Any strides.
        k_pe: (n, d_pe) rope part (64 for DeepSeek), dtype of k_cache. Any strides.
        k_cache: (num_blocks, page_block_size, 1, d_c + d_pe), bfloat16, float16 or float32, stride 1 in
            its last dim (dims 0-2 may be strided). Updated in place: token i is written whole, kv_c[i] then
            k_pe[i], at flat slot ``slot_mapping[i] = block * page_block_size + offset``, i.e. into
            ``k_cache[block, offset, 0]``; nothing else changes.
        slot_mapping: (n,) int64 (int32 accepted); -1 skips the token (padding).

    Slots outside ``[-1, num_blocks * page_block_size)``: on CPU every slot is checked first and such a
    slot raises an error, leaving k_cache unchanged. On CUDA they cannot be checked without a host sync,
    so they are skipped on the device: the token is not written and nothing outside k_cache is touched.
    Two tokens with the same slot leave that slot's contents unspecified.

    Runs on the current CUDA stream without host synchronisation, so it can be captured in a CUDA graph.
    Under torch.compile, torch.export and AOTInductor the caller's k_cache is written in place (the op
    declares ``Tensor(a!) k_cache``). With ``mode="reduce-overhead"``, mark the cache static
    (``torch._dynamo.mark_static_address``): CUDA-graph trees capture a step that mutates an input only
    when that input lives at a fixed address, and the replays then write into the caller's cache.
    """
    torch.ops.flashmla.write_kvcache.default(kv_c, k_pe, k_cache, slot_mapping)
