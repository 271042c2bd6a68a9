"""Portable-kernel configuration sweep (GPU machine): every configuration on the rows that pick it.

Each configuration (MG, MW, N, STAGES, WN) of csrc/cuda/decode_portable_launch.cuh is forced through
FLASHMLA_PORTABLE_CONFIG, checked for correctness (a b=128 DeepSeek row against the fp32 reference,
NaN cache tails, shuffled pages; and an odd varlen fp16 row: page 16, s_q 3, causal, against float64)
and timed (CUDA-graph replay, median, attention only) on b=128, d=576, dv=512, page 64 rows.

python scripts/tune_portable.py --out out/tune      writes tune.json and prints a table
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common as C

CONFIGS = [
    (1, 1, 64, 2, 8), (1, 1, 32, 4, 4), (1, 1, 32, 3, 4),
    (2, 2, 64, 2, 8), (2, 2, 32, 4, 4),
    (4, 2, 64, 2, 4), (4, 2, 32, 2, 4),
]  # fmt: skip
# (h_q, s_q, s_k, varlen): the grid's memory-bound rows and one compute-bound row.
ROWS = [(16, 1, 4096, False), (16, 1, 8192, False), (16, 1, 8192, True), (16, 2, 4096, False), (32, 1, 4096, False),
        (64, 1, 4096, False), (32, 2, 8192, True), (128, 1, 4096, False)]  # fmt: skip


def launcher_mg(rows: int) -> int:
    """The 16-row groups per block the launcher picks for `rows` query rows per KV head."""
    return 1 if rows <= 16 else (2 if rows <= 32 else 4)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="out/tune")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    os.environ["FLASHMLA_KERNEL"] = "portable"
    import flashmla_ops  # noqa: F401

    results = []
    for h_q, s_q, s_k, varlen in ROWS:
        seqlens = C.make_seqlens(128, s_k, s_q, varlen)
        inp = C.build_inputs(128, s_q, h_q, seqlens)
        odd = C.build_inputs(5, 3, h_q, [3, 77, 300, 129, 5], page=16, dtype=torch.float16, seed=1)
        for cfg in CONFIGS:
            # Every configuration is correct for any rows; time it where the launcher would pick its MG,
            # and with twice the launcher's MG (padded rows: more warps per block).
            if cfg[0] not in (launcher_mg(h_q * s_q), 2 * launcher_mg(h_q * s_q)):
                continue
            os.environ["FLASHMLA_PORTABLE_CONFIG"] = ",".join(map(str, cfg))
            rec = {"h_q": h_q, "s_q": s_q, "s_k": s_k, "varlen": varlen, "config": cfg}
            try:
                check_odd = C.spot_check(odd, *C.decode_step(odd)(), compute_dtype=torch.float64)
                us, _, (out, lse), _graph = C.time_cuda_graph(
                    C.decode_step(inp, include_metadata=False), args.iters
                )
                check = C.spot_check(inp, out, lse)
                rec.update(
                    us=us,
                    gbs=C.bytes_moved(128, s_q, h_q, seqlens) / us / 1e3,
                    ok=check["ok"] and check_odd["ok"],
                    err=check["out_err"],
                    err_odd=check_odd["out_err"],
                )
            except Exception as e:  # noqa: BLE001  (a config that does not fit or fails: record it)
                rec.update(error=str(e)[:200])
            results.append(rec)
            print(rec, flush=True)
        del inp
        torch.cuda.empty_cache()
    os.environ.pop("FLASHMLA_PORTABLE_CONFIG", None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tune.json").write_text(json.dumps(results, indent=1))
    print("\n| h_q | s_q | s_k | varlen | config | us | GB/s | ok |")
    for r in results:
        print(f"| {r['h_q']} | {r['s_q']} | {r['s_k']} | {r['varlen']} | {r['config']} | "
              f"{r.get('us', float('nan')):.1f} | {r.get('gbs', 0):.0f} | {r.get('ok', r.get('error'))} |")  # fmt: skip


if __name__ == "__main__":
    main()
