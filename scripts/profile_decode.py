"""One DeepSeek-shaped decode call per case, for ncu (scripts/gpu_run.sh profile stage).

python scripts/profile_decode.py h_q s_q [s_k]
"""

import sys

import torch

import flashmla_ops

h_q, s_q = int(sys.argv[1]), int(sys.argv[2])
s_k = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
b, d, dv, page = 128, 576, 512, 64
lens = torch.full((b,), s_k, dtype=torch.int32, device="cuda")
blocks = s_k // page
table = torch.randperm(b * blocks, device="cuda").view(b, blocks).int()
k = torch.randn(b * blocks, page, 1, d, device="cuda", dtype=torch.bfloat16)
q = torch.randn(b, s_q, h_q, d, device="cuda", dtype=torch.bfloat16)
md, ns = flashmla_ops.get_mla_metadata(lens, s_q * h_q, 1)
for _ in range(3):
    flashmla_ops.flash_mla_with_kvcache(q, k, table, lens, dv, md, ns, causal=True)
torch.cuda.synchronize()
