"""One DeepSeek-shaped decode call per case, for ncu (scripts/gpu_run.sh profile stage).

python scripts/profile_decode.py h_q s_q [s_k] [varlen]

varlen: lengths as benchmarks/bench_decode.py draws them (max(N(s_k, s_k / 2), s_q), random.seed(0)),
so that the cut sequences' partial results and the combine kernel show in the profile; else every
length is s_k.
"""

import random
import sys

import torch

import flashmla_ops

h_q, s_q = int(sys.argv[1]), int(sys.argv[2])
s_k = int(sys.argv[3]) if len(sys.argv) > 3 else 4096
varlen = len(sys.argv) > 4 and sys.argv[4] == "varlen"
b, d, dv, page = 128, 576, 512, 64
if varlen:
    random.seed(0)
    lengths = [int(max(random.normalvariate(s_k, s_k / 2), s_q)) for _ in range(b)]
else:
    lengths = [s_k] * b
lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
blocks = (max(lengths) + page - 1) // page
table = torch.randperm(b * blocks, device="cuda").view(b, blocks).int()
k = torch.randn(b * blocks, page, 1, d, device="cuda", dtype=torch.bfloat16)
q = torch.randn(b, s_q, h_q, d, device="cuda", dtype=torch.bfloat16)
md, ns = flashmla_ops.get_mla_metadata(lens, s_q * h_q, 1)
for _ in range(3):
    flashmla_ops.flash_mla_with_kvcache(q, k, table, lens, dv, md, ns, causal=True)
torch.cuda.synchronize()
