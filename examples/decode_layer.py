"""A small absorbed-MLA decode layer over the paged cache, and a multi-step decode loop.

DeepSeek-V2-Lite's attention in miniature (random weights): hidden 256, 16 query heads, latent
(kv_lora_rank) 512, rope dims 64, nope dims 128, v dims 128. The cache holds one 576-wide row per
token: the RMS-normed latent kv_c (512) then the roped key part k_pe (64).

Weight absorption: kv_b_proj maps the latent to per-head K_nope (W_UK) and V (W_UV). Since
q_nope · (W_UK kv_c) = (q_nope W_UK) · kv_c, the query is moved into latent space instead
(q_latent = q_nope @ W_UK, 512 per head) and concatenated with the roped q_pe: a 576-wide query
attends over the 576-wide cache rows with one KV head (MQA), and V = the first 512 channels of
the row. The attention output (512 per head) is mapped back with W_UV, then o_proj.

RoPE: real rotate-half rotary embedding (base 10000) of q_pe and k_pe at the new token's position
cache_seqlens - 1, computed inside the step from the lengths.

Run: PYTHONPATH=. python examples/decode_layer.py
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import nn

import flashmla_ops


@dataclass
class MLAConfig:
    hidden_size: int = 256
    num_heads: int = 16
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6

    @property
    def cache_head_dim(self) -> int:  # one cache row: latent then rope part (576)
        return self.kv_lora_rank + self.qk_rope_head_dim


def rotate_half_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding of x (..., tokens, [heads,] d) at integer positions (tokens,), rotate-half form."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (tokens, d/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
    if x.dim() == 3:  # (tokens, heads, d)
        cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class MLADecodeLayer(nn.Module):
    """One decode step of absorbed MLA over a paged cache (num_heads_k = 1, head_dim 576, dv 512)."""

    def __init__(self, config: Optional[MLAConfig] = None):
        super().__init__()
        c = config or MLAConfig()
        self.config = c
        self.q_proj = nn.Linear(
            c.hidden_size, c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim), bias=False
        )
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(c.kv_lora_rank, eps=c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            c.kv_lora_rank, c.num_heads * (c.qk_nope_head_dim + c.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(c.num_heads * c.v_head_dim, c.hidden_size, bias=False)
        # The scale of the unabsorbed model (its q·k has nope + rope dims); absorption keeps the scores.
        self.softmax_scale = (c.qk_nope_head_dim + c.qk_rope_head_dim) ** -0.5

    def absorbed_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """W_UK (heads, nope, latent) and W_UV (heads, v, latent), views of kv_b_proj's weight."""
        c = self.config
        w = self.kv_b_proj.weight.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]

    def project_kv(self, x: torch.Tensor, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The cache entries of tokens x (n, hidden) at positions (n,): kv_c (n, 512), k_pe (n, 64)."""
        c = self.config
        kv_c, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(kv_c), rotate_half_rope(k_pe, positions, c.rope_theta)

    def project_q(self, x: torch.Tensor, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """q_nope (n, heads, 128) and roped q_pe (n, heads, 64) of tokens x (n, hidden)."""
        c = self.config
        q = self.q_proj(x).view(-1, c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        return q_nope, rotate_half_rope(q_pe, positions, c.rope_theta)

    def forward(
        self,
        hidden: torch.Tensor,  # (batch, 1, hidden): the new token of each sequence
        k_cache: torch.Tensor,  # (num_blocks, page_block_size, 1, 576), updated in place
        block_table: torch.Tensor,  # (batch, max_num_blocks_per_seq) int32
        cache_seqlens: torch.Tensor,  # (batch,) int32, lengths including the new token
        slot_mapping: torch.Tensor,  # (batch,) int64, the new token's flat cache slot (-1 skips)
    ) -> torch.Tensor:
        c = self.config
        batch = hidden.shape[0]
        x = hidden[:, 0]
        positions = cache_seqlens - 1
        q_nope, q_pe = self.project_q(x, positions)
        kv_c, k_pe = self.project_kv(x, positions)
        flashmla_ops.write_kvcache(kv_c, k_pe, k_cache, slot_mapping)

        w_uk, w_uv = self.absorbed_weights()
        q_latent = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)
        q = torch.cat([q_latent, q_pe], dim=-1).unsqueeze(1)  # (batch, 1, heads, 576)
        # Metadata is rebuilt from the new lengths inside the step (on device, no host sync).
        metadata, num_splits = flashmla_ops.get_mla_metadata(cache_seqlens, c.num_heads, 1)
        out_latent, _ = flashmla_ops.flash_mla_with_kvcache(
            q,
            k_cache,
            block_table,
            cache_seqlens,
            c.kv_lora_rank,
            metadata,
            num_splits,
            softmax_scale=self.softmax_scale,
            causal=True,
        )
        out = torch.einsum("bhc,hvc->bhv", out_latent[:, 0], w_uv)  # (batch, heads, v)
        return self.o_proj(out.reshape(batch, c.num_heads * c.v_head_dim)).unsqueeze(1)

    def unabsorbed_forward(
        self,
        hidden: torch.Tensor,
        k_cache: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """Plain MLA for checking: per-head K and V decompressed from the cache (already holding the new
        token), softmax attention in float64. Slow; not part of the decode path."""
        c = self.config
        batch = hidden.shape[0]
        positions = cache_seqlens - 1
        q_nope, q_pe = self.project_q(hidden[:, 0], positions)
        w_uk, w_uv = self.absorbed_weights()
        page = k_cache.shape[1]
        outs = []
        for i in range(batch):
            length = int(cache_seqlens[i])
            tokens = torch.arange(length, device=hidden.device)
            rows = k_cache[block_table[i, tokens // page].long(), tokens % page, 0].double()  # (L, 576)
            kv_c, k_pe = rows.split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
            k_nope = torch.einsum("hnc,lc->hln", w_uk.double(), kv_c)
            v = torch.einsum("hvc,lc->hlv", w_uv.double(), kv_c)
            scores = (
                torch.einsum("hn,hln->hl", q_nope[i].double(), k_nope)
                + torch.einsum("hr,lr->hl", q_pe[i].double(), k_pe)
            ) * self.softmax_scale
            outs.append(torch.einsum("hl,hlv->hv", scores.softmax(-1), v))
        out = torch.stack(outs).to(hidden.dtype)
        return self.o_proj(out.reshape(batch, c.num_heads * c.v_head_dim)).unsqueeze(1)


@dataclass
class PagedBatch:
    """A batch of sequences in a paged cache: each owns distinct random blocks of k_cache."""

    k_cache: torch.Tensor  # (num_blocks, page_block_size, 1, 576)
    block_table: torch.Tensor  # (batch, max_num_blocks_per_seq) int32
    lengths: torch.Tensor  # (batch,) int32, tokens already in the cache

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """Flat cache slots (int64) of token `positions[i]` of each sequence i."""
        page = self.k_cache.shape[1]
        pos = positions.long()
        blocks = self.block_table.long().gather(1, (pos // page)[:, None])[:, 0]
        return blocks * page + pos % page


def make_paged_batch(
    config: MLAConfig,
    prompt_lengths: List[int],
    max_len: int,
    page_block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> PagedBatch:
    """An empty-but-NaN cache with blocks for max_len tokens per sequence, handed out in random order."""
    batch = len(prompt_lengths)
    blocks_per_seq = -(-max_len // page_block_size)
    num_blocks = batch * blocks_per_seq + 2  # two spare blocks that no sequence owns
    k_cache = torch.full(
        (num_blocks, page_block_size, 1, config.cache_head_dim), float("nan"), dtype=dtype, device=device
    )  # unwritten slots are NaN: they must never be read
    block_table = torch.randperm(num_blocks)[: batch * blocks_per_seq].view(batch, blocks_per_seq)
    return PagedBatch(
        k_cache,
        block_table.to(device=device, dtype=torch.int32),
        torch.tensor(prompt_lengths, dtype=torch.int32, device=device),
    )


@torch.no_grad()
def prefill_cache(layer: MLADecodeLayer, cache: PagedBatch, prompts: List[torch.Tensor]) -> None:
    """Writes the cache entries of each sequence's prompt (L_i, hidden) at positions 0..L_i-1."""
    xs, positions, slots = [], [], []
    for i, prompt in enumerate(prompts):
        pos = torch.arange(prompt.shape[0], device=prompt.device)
        xs.append(prompt)
        positions.append(pos)
        row = cache.block_table[i].long()
        page = cache.k_cache.shape[1]
        slots.append(row[pos // page] * page + pos % page)
    kv_c, k_pe = layer.project_kv(torch.cat(xs), torch.cat(positions))
    flashmla_ops.write_kvcache(kv_c, k_pe, cache.k_cache, torch.cat(slots))


def decode_step_inputs(cache: PagedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cache_seqlens, slot_mapping) of the next step: each sequence appends one token."""
    slot_mapping = cache.slots(cache.lengths)
    return cache.lengths + 1, slot_mapping


@torch.no_grad()
def decode(step, cache: PagedBatch, hidden_steps: List[torch.Tensor]) -> List[torch.Tensor]:
    """Runs `step` (the layer, compiled or exported) once per (batch, 1, hidden) input; lengths grow by one
    each step and cache.k_cache is updated in place."""
    outputs = []
    for hidden in hidden_steps:
        cache_seqlens, slot_mapping = decode_step_inputs(cache)
        outputs.append(step(hidden, cache.k_cache, cache.block_table, cache_seqlens, slot_mapping))
        cache.lengths = cache_seqlens
    return outputs


def make_decode_problem(
    device: str, prompt_lengths: List[int], steps: int, seed: int = 0
) -> Tuple[MLADecodeLayer, PagedBatch, List[torch.Tensor]]:
    """A random layer (float32 on CPU, bf16 on CUDA, whose kernels take 16-bit types), a paged cache
    prefilled with random prompts of the given lengths (room for `steps` more tokens each), and the
    hidden states of `steps` decode steps."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(seed)
    config = MLAConfig()
    layer = MLADecodeLayer(config).to(device=device, dtype=dtype).eval()
    cache = make_paged_batch(config, prompt_lengths, max(prompt_lengths) + steps, dtype=dtype, device=device)
    prefill_cache(
        layer, cache, [torch.randn(n, config.hidden_size, dtype=dtype, device=device) for n in prompt_lengths]
    )
    hidden_steps = [
        torch.randn(len(prompt_lengths), 1, config.hidden_size, dtype=dtype, device=device)
        for _ in range(steps)
    ]
    return layer, cache, hidden_steps


def main(device: Optional[str] = None) -> None:
    device = device or ("cuda" if torch.cuda.is_available() and flashmla_ops.build_info()["cuda"] else "cpu")
    steps = 8
    layer, cache, hidden_steps = make_decode_problem(device, [5, 17, 40], steps)
    dtype = hidden_steps[0].dtype
    step = torch.compile(layer, fullgraph=True)
    outputs = decode(step, cache, hidden_steps)
    with torch.no_grad():
        check = layer.unabsorbed_forward(hidden_steps[-1], cache.k_cache, cache.block_table, cache.lengths)
    err = (outputs[-1].float() - check.float()).abs().max().item()
    print(
        f"{device} {dtype}: {steps} steps, lengths now {cache.lengths.tolist()}, "
        f"last step vs unabsorbed MLA: max abs diff {err:.2e}"
    )


if __name__ == "__main__":
    main()
