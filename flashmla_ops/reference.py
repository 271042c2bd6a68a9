"""A readable pure-PyTorch implementation of the operators' semantics (DESIGN.md §2).

Slow (a Python loop over the batch) and meant for tests and for reading: any dtype, any device;
``compute_dtype=torch.float64`` gives the reference the tests compare against.
"""

from typing import Optional, Tuple

import torch


def mla_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    compute_dtype: Optional[torch.dtype] = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Returns (out, softmax_lse) like flash_mla_with_kvcache, computed in `compute_dtype`.

    With compute_dtype=None every step runs in q's dtype (scores, softmax and the product with V
    all rounded there), which is what a plain low-precision PyTorch implementation would give.
    out is returned in compute_dtype (q's dtype when None), softmax_lse in float32.
    """
    batch, seqlen_q, num_heads_q, head_dim = q.shape
    page = k_cache.shape[1]
    num_heads_k = k_cache.shape[2]
    group = num_heads_q // num_heads_k
    scale = head_dim ** (-0.5) if softmax_scale is None else softmax_scale
    dtype = compute_dtype or q.dtype
    out = torch.zeros(batch, seqlen_q, num_heads_q, head_dim_v, dtype=dtype, device=q.device)
    lse = torch.full((batch, num_heads_q, seqlen_q), float("inf"), dtype=torch.float32, device=q.device)
    lengths = cache_seqlens.tolist()
    for i in range(batch):
        length = lengths[i]
        if length == 0:
            continue
        tokens = torch.arange(length, device=q.device)
        blocks = block_table[i, tokens // page].long()
        kv = k_cache[blocks, tokens % page].to(dtype)  # (length, h_k, d): only live tokens are read
        k = kv.repeat_interleave(group, dim=1).transpose(0, 1)  # (h_q, length, d)
        v = k[..., :head_dim_v]
        qi = q[i].to(dtype).transpose(0, 1)  # (h_q, s_q, d)
        scores = (qi @ k.transpose(1, 2)) * scale  # (h_q, s_q, length)
        if causal:
            last_visible = length - seqlen_q + torch.arange(seqlen_q, device=q.device)  # per query
            hidden = tokens[None, :] > last_visible[:, None]
            scores = scores.masked_fill(hidden[None], float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # (h_q, s_q); -inf where nothing is visible
        seen = torch.isfinite(row_lse)
        probs = torch.where(seen[..., None], torch.exp(scores - row_lse[..., None]), torch.zeros_like(scores))
        out[i] = (probs @ v).transpose(0, 1)
        lse[i] = torch.where(seen, row_lse, torch.full_like(row_lse, float("inf"))).float()
    return out, lse
